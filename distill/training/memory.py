"""The accelerator memory of a training step, measured without the accelerator (``distill/plan_memory.py``).

The step runs on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and storages but no
data, so a full-size model costs no memory and an operation no arithmetic) or on real CPU tensors (the tests), and
three pieces make what is counted what a CUDA device would hold:

- :class:`AllocationTracker`: a dispatch mode that sees every storage the step creates and when it is freed (the
  CUDA caching allocator's ``max_memory_allocated``: block sizes rounded up to 512 bytes, no fragmentation), each
  labelled by kind (parameters, gradients, optimiser states, activations, ...). It keeps the peak under several
  *views* at once: a view weighs the kinds (8-bit Adam's states are ~1/4 of Adam's, a bf16 EMA half of an fp32 one, a
  CPU EMA none), so one trace answers for every combination of the levers that only change the size of tensors that
  live through the step.
- :func:`cuda_autocast`: autocast as CUDA applies it. CPU autocast casts matmuls and convolutions to bf16 as CUDA does,
  but not CUDA's float32 list (group / layer norm, softmax, sums, exp, pow, the losses): on CUDA their outputs are
  float32, twice the bytes, and a UNet's saved norm outputs are a good share of its activations. A function mode
  casts those ops' inputs to float32 while CPU autocast is on; CPU autocast itself (its matmul / conv casts, its
  cache of cast weights, nested ``enabled=False`` regions) does the rest.
- :class:`TraceAccelerator`: the few Accelerator methods :class:`distill.training.loop.TrainLoop` calls, for one
  process, without reading a value back (fake tensors have none).

Attention: PyTorch on a GPU runs ``scaled_dot_product_attention`` in a fused kernel (flash, or memory-efficient for
float32) that keeps the output and a float32 log-sum-exp per query, never the [N, heads, L, L] weights; on the CPU the
same call picks the fused CPU flash kernel, which keeps the same two tensors, and :func:`fused_attention` pins that
choice. Where the code asks for the math kernel (R1's double backward: ``sdpa_kernel(SDPBackend.MATH)``) the GPU
materialises the weights too, and so does the trace.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


def allocated_bytes(nbytes: int) -> int:
    """Bytes a CUDA allocation of ``nbytes`` counts in ``torch.cuda.max_memory_allocated``."""
    return -(-int(nbytes) // BLOCK) * BLOCK


def tensor_bytes(tensors: Iterable[torch.Tensor], *, dtype: torch.dtype | None = None) -> int:
    """Allocated bytes of ``tensors`` (each its own allocation), floating ones counted in ``dtype`` when given."""
    total = 0
    for t in tensors:
        size = (torch.finfo(dtype).bits // 8) if dtype is not None and t.is_floating_point() else t.element_size()
        total += allocated_bytes(t.numel() * size)
    return total


# --------------------------------------------------------------------------------------------------------------
# What is counted


@dataclass
class Peak:
    """The highest total a view reached, where, and every kind's bytes at that moment."""

    total: int = 0
    where: str = ""
    kinds: dict[str, int] = field(default_factory=dict)


class AllocationTracker(TorchDispatchMode):
    """``with tracker:`` counts the storages every operation creates until they are freed, each under a kind:
    tensors that exist before are registered with :meth:`label`; a new one takes :attr:`kind` (``activations``) in a
    forward, ``temporaries`` during a backward, ``optimizer_temporaries`` inside ``optimizer.step()`` (its states are
    relabelled after the step by the caller's ``on_optimizer_step``), and a gradient accumulated into ``param.grad``
    becomes ``gradients`` (or what :meth:`watch_gradients` names). ``views``: name -> {kind: weight} (weight 1 unless
    given); :attr:`peaks` holds, per view, the peak of every :meth:`section` (a step). ``fake_only``: count fake
    tensors only (real ones in a fake trace are small host-side helpers, as a CPU random draw)."""

    def __init__(
        self,
        views: dict[str, dict[str, float]] | None = None,
        *,
        fake_only: bool = True,
        on_optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None,
    ):
        super().__init__()
        self.views = views or {"total": {}}
        self.fake_only = fake_only
        self.on_optimizer_step = on_optimizer_step
        self.bytes: dict[str, int] = {}
        self.held: dict[str, int] = {}  # the most each kind held at once
        self.phase_peaks: dict[str, dict[tuple[str, str], int]] = {name: {} for name in self.views}
        self.totals = dict.fromkeys(self.views, 0.0)
        self.peaks: dict[str, dict[str, Peak]] = {name: {} for name in self.views}
        self.kind = "activations"
        self.where = ""
        self.section_name = ""
        self._storages = WeakIdKeyDictionary()  # storage -> [bytes, kind, weakref keeping the free callback]
        self._in_optimizer = False
        self._hooks: list = []

    # -- bookkeeping
    def _add(self, kind: str, delta: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + delta
        if delta > 0 and self.bytes[kind] > self.held.get(kind, 0):
            self.held[kind] = self.bytes[kind]
        for name, weights in self.views.items():
            self.totals[name] += weights.get(kind, 1.0) * delta

    def _check_peaks(self) -> None:
        key = (self.section_name, self.where)
        for name, total in self.totals.items():
            peak = self.peaks[name].get(self.section_name)
            if peak is None or total > peak.total:
                self.peaks[name][self.section_name] = Peak(int(round(total)), self._where(), dict(self.bytes))
            phases = self.phase_peaks[name]
            if total > phases.get(key, -1):  # each phase's own peak (where a step's memory goes)
                phases[key] = int(round(total))

    def _where(self) -> str:
        if self._in_optimizer:
            what = "optimiser step"
        elif torch._C._current_graph_task_id() != -1:
            what = "backward"
        else:
            what = self.kind if self.kind != "activations" else "forward"
        return f"{self.where}, {what}" if self.where else what

    def _freed(self, info: list, _ref) -> None:
        self._add(info[1], -info[0])

    def _register(self, storage, kind: str) -> None:
        info = self._storages.get(storage)
        size = allocated_bytes(storage.nbytes())
        if info is not None:
            if info[1] != kind:
                self._add(info[1], -info[0])
                self._add(kind, info[0])
                info[1] = kind
            if info[0] != size:  # resized in place
                self._add(info[1], size - info[0])
                info[0] = size
            return
        info = [size, kind, None]
        info[2] = weakref.ref(storage, lambda ref, info=info: self._freed(info, ref))
        self._storages[storage] = info
        self._add(kind, size)

    @staticmethod
    def _storages_of(t: torch.Tensor) -> list:
        if t.layout is not torch.strided:
            return []
        return [t.untyped_storage()]

    def label(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        """Count ``tensors`` (parameters, buffers, states) under ``kind`` from now on."""
        for t in tensors:
            if t is None:
                continue
            for st in self._storages_of(t):
                self._register(st, kind)

    def label_module(self, module: torch.nn.Module | None, kind: str, frozen_kind: str | None = None) -> None:
        """A module's parameters and buffers under ``kind``; ``frozen_kind``: its parameters that do not train."""
        if module is None:
            return
        for p in module.parameters():
            self.label([p], kind if p.requires_grad or frozen_kind is None else frozen_kind)
        self.label(module.buffers(), kind)

    def watch_gradients(self, params: Iterable[torch.nn.Parameter], kind: str = "gradients") -> None:
        """Count each parameter's accumulated gradient under ``kind``."""
        for p in params:
            if p.requires_grad:
                self._hooks.append(
                    p.register_post_accumulate_grad_hook(lambda p, kind=kind: self.label([p.grad], kind))
                )

    def virtual(self, kind: str, nbytes: int) -> contextlib.AbstractContextManager:
        """Bytes a variant of the step holds during a block but the traced one does not (e.g. a bf16 EMA's cast
        copies): counted under ``kind``, which only the views of that variant weigh."""

        @contextlib.contextmanager
        def hold():
            self._add(kind, nbytes)
            self._check_peaks()
            try:
                yield
            finally:
                self._add(kind, -nbytes)

        return hold()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Peaks from here on are recorded under ``name`` (a step), starting from what is held now."""
        previous = self.section_name
        self.section_name = name
        self._check_peaks()
        try:
            yield
        finally:
            self.section_name = previous

    @contextlib.contextmanager
    def labelled(self, kind: str) -> Iterator[None]:
        """New tensors of the block (outside backward and optimiser steps) count under ``kind``."""
        previous, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = previous

    # -- the mode
    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(opt, args, kwargs):
            self._in_optimizer = True

        def post(opt, args, kwargs):
            self._in_optimizer = False
            if self.on_optimizer_step is not None:
                self.on_optimizer_step(opt)

        self._hooks += [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _NO_ALLOCATION:
            return func(*args, **(kwargs or {}))
        fast = _FAST_FAKE.get(func) if self.fake_only else None
        out = fast(*args, **(kwargs or {})) if fast is not None else func(*args, **(kwargs or {}))
        if self._in_optimizer:
            kind = "optimizer_temporaries"
        elif torch._C._current_graph_task_id() != -1:
            kind = "temporaries"
        else:
            kind = self.kind
        added = False
        for t in _tensors(out):
            if self.fake_only and not _is_fake(t):
                continue
            for st in self._storages_of(t):
                if st not in self._storages or self._storages[st][0] != allocated_bytes(st.nbytes()):
                    self._register(st, self._storages[st][1] if st in self._storages else kind)
                    added = True
        if added:
            self._check_peaks()
        return out


def _like(t: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
    return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted and t is not None else None


def _group_norm_backward(grad_out, input, mean, rstd, weight, n, c, hxw, group, output_mask):
    return _like(input, output_mask[0]), _like(weight, output_mask[1]), _like(weight, output_mask[2])


def _layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    return _like(input, output_mask[0]), _like(weight, output_mask[1]), _like(bias, output_mask[2])


# Ops that allocate nothing (metadata queries): passed straight through.
_NO_ALLOCATION = frozenset({torch.ops.prim.device.default})
# Fake tensors only: the norms' backward has no meta kernel and torch decomposes it into tens of ops, most of a small
# model's trace time; its outputs (the gradients, shaped as the input, weight and bias) are made directly.
_FAST_FAKE = {
    torch.ops.aten.native_group_norm_backward.default: _group_norm_backward,
    torch.ops.aten.native_layer_norm_backward.default: _layer_norm_backward,
}


def _tensors(out) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _tensors(o)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# --------------------------------------------------------------------------------------------------------------
# CUDA's autocast on the CPU

# torch's CUDA autocast policy (aten/src/ATen/autocast_mode.cpp; the lists of torch/testing/_internal/
# autocast_test_lists.py): ops run in float32 whatever their inputs ...
CUDA_FP32_OPS = frozenset(
    {
        "acos",
        "asin",
        "cosh",
        "erfinv",
        "exp",
        "expm1",
        "log",
        "log10",
        "log2",
        "log1p",
        "reciprocal",
        "rsqrt",
        "sinh",
        "tan",
        "pow",
        "__pow__",
        "softplus",
        "layer_norm",
        "rms_norm",
        "group_norm",
        "frobenius_norm",
        "nuclear_norm",
        "cosine_similarity",
        "poisson_nll_loss",
        "cosine_embedding_loss",
        "nll_loss",
        "nll_loss2d",
        "hinge_embedding_loss",
        "kl_div",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "mse_loss",
        "margin_ranking_loss",
        "multilabel_margin_loss",
        "soft_margin_loss",
        "triplet_margin_loss",
        "multi_margin_loss",
        "binary_cross_entropy_with_logits",
        "dist",
        "pdist",
        "cdist",
        "renorm",
        "logsumexp",
    }
)
# ... ops whose result is float32 when an input is bf16 / fp16 (their dtype argument set to float32) ...
CUDA_FP32_OUTPUT_OPS = frozenset(
    {"softmax", "log_softmax", "cumprod", "cumsum", "prod", "sum", "norm", "linalg_vector_norm", "linalg_matrix_norm"}
)
# ... and ops cast to bf16 / fp16 on CUDA that CPU autocast leaves alone (it covers conv, linear, (b)mm, matmul,
# baddbmm, addmm, scaled_dot_product_attention itself).
CUDA_LOW_PRECISION_OPS = frozenset(
    {"addmv", "addr", "mv", "einsum", "chain_matmul", "linalg_multi_dot", "linalg_vecdot", "__matmul__"}
)


class _CudaAutocastPolicy(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if torch.is_autocast_enabled("cpu"):
            low = torch.get_autocast_dtype("cpu")
            if name in CUDA_FP32_OPS:
                args, kwargs = _cast((args, kwargs), (torch.bfloat16, torch.float16), torch.float32)
            elif name in CUDA_FP32_OUTPUT_OPS and kwargs.get("dtype") is None and name != "norm":
                if any(isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args[:1]):
                    kwargs = {**kwargs, "dtype": torch.float32}
            elif name == "norm" and any(
                isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args[:1]
            ):
                args = (args[0].float(), *args[1:])
            elif name in CUDA_LOW_PRECISION_OPS:
                args, kwargs = _cast((args, kwargs), (torch.float32,), low)
        return func(*args, **kwargs)


def _cast(tree, from_dtypes, to_dtype):
    def one(x):
        if isinstance(x, torch.Tensor) and x.dtype in from_dtypes:
            return x.to(to_dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(one(v) for v in x)
        if isinstance(x, dict):
            return {k: one(v) for k, v in x.items()}
        return x

    return one(tree)


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While CPU autocast is on inside this block, ops follow CUDA's autocast lists (float32 norms, softmax, ...)."""
    with _CudaAutocastPolicy():
        yield


def cuda_autocast(mixed_precision: str | None) -> contextlib.AbstractContextManager:
    """The autocast a CUDA run's ``accelerator.autocast()`` opens, on CPU tensors (inside
    :func:`cuda_autocast_policy`)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Attention as a GPU runs it: a fused kernel (the CPU flash kernel keeps what CUDA's flash / memory-efficient
    kernels keep); a block that asks for the math kernel (R1) still gets it."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
        yield


# --------------------------------------------------------------------------------------------------------------
# The loop's accelerator, for one traced process


class _SkipNaNCheck:
    """Stands in for a GradScaler: ``TrainLoop.phase`` then leaves the non-finite check (a read of the gradient norm,
    which a fake tensor does not have) to it."""


class TraceAccelerator:
    """What :class:`distill.training.loop.TrainLoop` and :class:`distill.training.gan_step.GANStep` call on an
    Accelerator, for one process of a CUDA run: autocast as CUDA's (:func:`cuda_autocast`), a plain backward,
    foreach clipping (CUDA's default), no DDP, nothing logged, and reductions that read no value back."""

    process_index = 0
    num_processes = 1
    is_main_process = True
    scaler = _SkipNaNCheck()

    def __init__(self, mixed_precision: str | None):
        self.mixed_precision = mixed_precision or "no"
        self.trackers: list = []

    def autocast(self):
        return cuda_autocast(self.mixed_precision)

    def backward(self, loss):
        # loss.backward() itself, but not through torch's function modes: a mode is off while it handles a call, and
        # the backward recomputes checkpointed blocks, which must see the CUDA autocast policy as their forward did.
        from torch.autograd.graph import _engine_run_backward

        _engine_run_backward(
            (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True
        )

    def no_sync(self, model):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm, foreach=True)

    def reduce(self, tensor, reduction="mean"):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return torch.zeros(tuple(tensor.shape))

    def unwrap_model(self, model):
        return model

    def register_for_checkpointing(self, *objects):
        pass

    def log(self, *args, **kwargs):
        pass

    def print(self, *args, **kwargs):
        pass

    def wait_for_everyone(self):
        pass


def use_foreach(*optimizers) -> None:
    """Torch's Adam runs its foreach implementation on CUDA tensors (its default there) and the per-tensor one on
    the CPU; the foreach one holds a full-size temporary (sqrt of the second moments) during the step."""
    for opt in optimizers:
        if opt is None:
            continue
        opt.defaults["foreach"] = True
        for group in opt.param_groups:
            group["foreach"] = True
