"""LoRA on one shared frozen UNet (peft): the UNet student as the teacher's UNet plus a LoRA adapter, trained beside a
discriminator that is the same UNet with its own adapter, so that the UNet's weights are held once.

:class:`SharedBase` holds the frozen UNet and its named adapters (``student``, ``disc``:
``unet.add_adapter(LoraConfig(...), adapter_name=...)``). A role is a module that registers only its own trainable
tensors (its adapter's LoRA weights, a D's heads) and holds the base as a plain attribute, so that its ``parameters()``,
``state_dict()``, optimiser, EMA and DDP wrapper see the role alone (DDP syncs only what trains; a checkpoint holds the
adapters, not the UNet). A role's forward first makes its adapter the active one (:meth:`SharedBase.activate`). peft's
``set_adapter`` also turns the inactive adapters' ``requires_grad`` off and the active one's on, which would undo what
the trainer decided (D frozen in the G phase, while G's gradient flows through D's forward): :meth:`SharedBase.activate`
puts every adapter's ``requires_grad`` back as it was, so one backward reaches exactly the tensors the trainer left
trainable. A gradient-checkpointed block recomputes under the adapter it ran with (:meth:`SharedBase.checkpoint_role`):
the backward of G's loss recomputes D's blocks, then G's.

:class:`LoRAStudent` is the UNet student on the shared base; :meth:`LoRAStudent.merged` gives today's ``UNetStudent``
(its adapter merged into a copy of the base, for the exported pipeline) and :func:`save_lora` the adapter alone as a
diffusers LoRA file, which a stock ``StableDiffusion(XL)Pipeline`` of the teacher loads with ``load_lora_weights`` and
runs in one trailing DDIM step (``students/stock.py``), as LCM-LoRA is used.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from .unet_student import UNetStudent, unet_x0

STUDENT_ADAPTER = "student"
DISC_ADAPTER = "disc"
# The student's adapter: LCM-LoRA's targets (diffusers' train_lcm_distill_lora_sd*.py), every attention projection, the
# transformers' projections and feed-forwards, the resnets' convs and time projections, the resamplers' convs: a
# one-step student moves the whole UNet away from a denoiser at t = 999, not only its attention.
STUDENT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
# The discriminator's adapter: the attention projections, as d_lora_rank on a copied backbone has always done.
DISC_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name (what load_lora_weights(dir) reads)


class _Recompute:
    """The context a checkpointed block's recomputation runs in: its role's adapter active (+ ``extra``, e.g. the
    attention kernels of the forward), the previous adapter back afterwards. Re-enterable: R1's double backward
    recomputes a block twice with the same context."""

    def __init__(self, base: "SharedBase", role: str, extra):
        self.base, self.role, self.extra, self.stack = base, role, extra, []

    def __enter__(self):
        self.stack.append(self.base.active)
        self.base.activate(self.role)
        if self.extra is not None:
            self.extra.__enter__()
        return self

    def __exit__(self, *exc):
        previous = self.stack.pop()
        if self.extra is not None:
            self.extra.__exit__(*exc)
        if previous is not None:
            self.base.activate(previous)
        return False


class SharedBase:
    """One frozen diffusers UNet with named LoRA adapters (peft), one per role. Never copied: ``copy.deepcopy`` of a
    role
    (the EMA student) shares it. ``dtype``: the frozen weights' (``hold_in``); the adapters stay fp32."""

    def __init__(self, unet):
        self.unet = unet.requires_grad_(False).eval()
        self.active: str | None = None
        self.params: dict[str, dict[str, nn.Parameter]] = {}  # adapter -> {qualified name in the UNet: LoRA tensor}
        self._checkpointed: dict[str, Callable | None] = {}  # role -> factory of an extra recompute context
        self._layers: list = []  # the UNet's peft layers (what activate switches)

    def __deepcopy__(self, memo):
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def add_adapter(self, name: str, *, rank: int, targets, init="gaussian") -> dict[str, nn.Parameter]:
        """Add LoRA adapter ``name`` (rank ``rank``, alpha = rank: scale 1, the diffusers LoRA format's default, so the
        file needs no alpha entries) on the modules named by ``targets``; returns its tensors by qualified name."""
        from peft import LoraConfig

        if self.dtype != torch.float32:
            raise ValueError(
                "add the adapters before holding the base in a lower precision (hold_in): they train in fp32"
            )
        with warnings.catch_warnings():  # peft's note that a second adapter joins the first: here by design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.unet.add_adapter(
                LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=init, target_modules=list(targets)),
                adapter_name=name,
            )
        marks = (f".lora_A.{name}.", f".lora_B.{name}.")
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        self.params[name] = {n: p for n, p in self.unet.named_parameters() if any(m in n for m in marks)}
        if not self.params[name]:
            raise ValueError(f"no module of the UNet matches the LoRA targets {list(targets)}")
        for params in self.params.values():  # diffusers' add_adapter activated the new one (peft froze the others)
            for p in params.values():
                p.requires_grad_(True)
        self.active = None
        return self.params[name]

    def hold_in(self, dtype: torch.dtype) -> None:
        """Cast the frozen weights (not the adapters) to ``dtype``."""
        lora = {id(p) for params in self.params.values() for p in params.values()}
        for p in self.unet.parameters():
            if id(p) not in lora and p.is_floating_point():
                p.data = p.data.to(dtype)

    def _lora_tensors(self) -> list[nn.Parameter]:
        return [p for params in self.params.values() for p in params.values()]

    def activate(self, name: str) -> None:
        """Make adapter ``name`` the one the UNet's forward applies, leaving every adapter's ``requires_grad`` as it
        was."""
        if self.active == name:
            return
        saved = [(p, p.requires_grad) for p in self._lora_tensors()]
        for layer in self._layers:
            layer.set_adapter(name)
        for p, flag in saved:
            p.requires_grad_(flag)
        self.active = name

    @contextlib.contextmanager
    def plain(self):
        """The teacher's UNet for the block: every adapter off (the teacher's own ODE solves)."""
        saved = [(p, p.requires_grad) for p in self._lora_tensors()]
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()
            for p, flag in saved:
                p.requires_grad_(flag)
            self.active = None

    def checkpoint_role(self, role: str, recompute_context: Callable | None = None) -> None:
        """Gradient checkpointing of the UNet's blocks while ``role``'s adapter is active (the other roles' forwards are
        not checkpointed unless they ask too); ``recompute_context()``, called at each checkpointed forward, gives an
        extra re-enterable context for its recomputation."""
        self._checkpointed[role] = recompute_context
        if not self.unet.is_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)

    def is_checkpointed(self, role: str) -> bool:
        return role in self._checkpointed

    def _checkpoint(self, module, *args):
        role = self.active
        if role not in self._checkpointed:
            return module(*args)
        make = self._checkpointed[role]
        recompute = _Recompute(self, role, make() if make is not None else None)
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recompute)
        )


def _key(name: str, adapter: str) -> str:
    """A LoRA tensor's name in its role's ParameterDict: the peft state-dict name (adapter dropped), dots as slashes."""
    return name.replace(f".{adapter}.", ".").replace(".", "/")


class AdapterTensors(nn.Module):
    """A role's LoRA tensors of adapter ``adapter`` as its own parameters (``self.lora``), by peft state-dict name. The
    live role registers the base's tensors themselves; a deep copy (the EMA) holds copies, which its forward substitutes
    for
    the base's (``torch.func.functional_call``)."""

    def __init__(self, base: SharedBase, adapter: str, params: dict[str, nn.Parameter]):
        super().__init__()
        self.base, self.name = base, adapter
        self.lora = nn.ParameterDict({_key(n, adapter): p for n, p in params.items()})
        self._names = {_key(n, adapter): n for n in params}  # -> qualified name in the UNet

    def is_live(self) -> bool:
        """Whether this module's tensors are the base's own (the trained role), not copies (its EMA)."""
        key = next(iter(self.lora))
        return self.lora[key] is self.base.params[self.name][self._names[key]]

    def run_base(self, *args, **kwargs):
        """The base UNet's forward with this adapter active and this module's LoRA tensors in it."""
        self.base.activate(self.name)
        if self.is_live():
            return self.base.unet(*args, **kwargs)
        tensors = {self._names[k]: p for k, p in self.lora.items()}
        return torch.func.functional_call(self.base.unet, tensors, args, kwargs, strict=False)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as ``peft.get_peft_model_state_dict(unet, adapter_name=...)`` gives it (the adapter name
        dropped)."""
        return {k.replace("/", "."): p.detach() for k, p in self.lora.items()}


class LoRAStudent(nn.Module):
    """The UNet student on a :class:`SharedBase`: the frozen teacher UNet + the ``student`` adapter, evaluated once at
    ``timestep`` on the noise and read as x0, as ``UNetStudent`` (at initialisation the adapter is zero: the teacher's
    own
    one-step estimate). Its parameters are the adapter's alone."""

    _supports_gradient_checkpointing = True

    def __init__(
        self,
        base: SharedBase,
        *,
        rank: int,
        timestep: int,
        alpha_cumprod: float,
        prediction_type: str,
        precision: str = "fp32",
        targets=STUDENT_LORA_TARGETS,
        adapter: str = STUDENT_ADAPTER,
    ):
        super().__init__()
        params = base.add_adapter(adapter, rank=rank, targets=targets, init=True)
        self.adapter = AdapterTensors(base, adapter, params)
        self.config = SimpleNamespace(
            timestep=int(timestep),
            alpha_cumprod=float(alpha_cumprod),
            prediction_type=prediction_type,
            precision=precision,
            rank=int(rank),
        )

    @classmethod
    def from_teacher(
        cls, base: SharedBase, scheduler, *, rank: int, timestep: int = 999, precision: str = "fp32"
    ) -> "LoRAStudent":
        """The student adapter on ``base`` (the teacher's UNet); ``scheduler`` gives alpha-bar(t), as
        ``UNetStudent.from_teacher``."""
        return cls(
            base,
            rank=rank,
            timestep=timestep,
            alpha_cumprod=float(scheduler.alphas_cumprod[timestep]),
            prediction_type=scheduler.config.get("prediction_type", "epsilon"),
            precision=precision,
        )

    @property
    def base(self) -> SharedBase:
        return self.adapter.base

    @property
    def latent_channels(self) -> int:
        return int(self.base.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.base.unet.config.sample_size)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base.is_checkpointed(self.adapter.name)

    def enable_gradient_checkpointing(self) -> None:
        self.base.checkpoint_role(self.adapter.name)

    def forward(
        self, noise: torch.Tensor, prompt_embeds: torch.Tensor, added_cond_kwargs: dict | None = None
    ) -> torch.Tensor:
        return unet_x0(
            self.adapter.run_base, noise, prompt_embeds, added_cond_kwargs, config=self.config, dtype=self.base.dtype
        )

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """This student's adapter in peft's state-dict format (the EMA copy's values when this is the EMA)."""
        return self.adapter.peft_state_dict()

    @torch.no_grad()
    def merged(self, device: torch.device | str = "cpu") -> UNetStudent:
        """Today's ``UNetStudent``: this adapter (its values: the EMA's for the EMA copy) merged into a copy of the base
        made on ``device`` (the CPU by default: no accelerator memory), the other adapters dropped."""
        unet = self.base.unet
        memo = {}
        for t in (*unet.parameters(), *unet.buffers()):
            placed = t.detach().to(device, copy=True)
            memo[id(t)] = nn.Parameter(placed, requires_grad=False) if isinstance(t, nn.Parameter) else placed
        copied = copy.deepcopy(unet, memo)
        own = dict(copied.named_parameters())
        for key, p in self.adapter.lora.items():
            own[self.adapter._names[key]].copy_(p.detach().to(device))
        copied.fuse_lora(adapter_names=[self.adapter.name])
        copied.unload_lora()
        copied.disable_gradient_checkpointing()
        cfg = self.config
        return UNetStudent.around(
            copied.requires_grad_(False),
            timestep=cfg.timestep,
            alpha_cumprod=cfg.alpha_cumprod,
            prediction_type=cfg.prediction_type,
            precision=cfg.precision,
        )


def save_lora(
    student: LoRAStudent, directory: str | os.PathLike, *, sdxl: bool, scheduler_config: dict | None = None
) -> Path:
    """The student's adapter alone as a diffusers LoRA file (``directory/pytorch_lora_weights.safetensors``, the format
    of ``StableDiffusion(XL)Pipeline.save_lora_weights``) and, with the teacher's ``scheduler_config``, the one-step
    DDIM scheduler that reproduces the student in a stock pipeline (``directory/scheduler``; left out, with a warning,
    for a student the stock step cannot reproduce):

        pipe = StableDiffusionPipeline.from_pretrained(teacher)
        pipe.load_lora_weights(directory)
        pipe.scheduler = DDIMScheduler.from_pretrained(directory, subfolder="scheduler")
        image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0).images[0]
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .stock import one_step_scheduler

    out = Path(directory)
    # peft's key names (lora_A / lora_B), which load_lora_weights reads as they are. The older "lora.down" names
    # (diffusers.utils.convert_state_dict_to_diffusers) lost the attention projections on load in diffusers 0.42 (the
    # tiny SD1.5 student: 94 of its 158 tensors loaded, the stock latents 1.8 % away from the merged student's).
    layers = {k: v.to("cpu").contiguous() for k, v in student.lora_state_dict().items()}
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipeline.save_lora_weights(str(out), unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    if scheduler_config is not None:
        try:
            one_step_scheduler(student, scheduler_config=scheduler_config).save_pretrained(str(out / "scheduler"))
        except ValueError as exc:
            warnings.warn(f"the LoRA in {out} has no one-step scheduler: {exc}")
    return out
