"""The memory planner (distill/plan_memory.py, distill/distillation/memory_plan.py, distill/training/memory.py) on tiny
teachers: what it plans on fake tensors against the bytes the same steps allocate on real CPU tensors."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import run_script
from torch.utils._python_dispatch import TorchDispatchMode

PLAN = ["--lpips_network", "random", "--r1_gamma", "1e-5", "--batch_size", "4", "--gradient_accumulation_steps", "2"]


def _config(teacher, *extra):
    from distill.core.config import parse_config
    from distill.distillation import memory_plan as mp
    from distill.distillation.students import apply_teacher_defaults
    from distill.plan_memory import PlanConfig, check

    cfg = parse_config(PlanConfig, ["--teacher", str(teacher), *PLAN, *extra])
    check(cfg)
    apply_teacher_defaults(cfg, family="sd")
    return cfg, *mp.levers_of(cfg)


class LiveBytes(TorchDispatchMode):
    """An allocation counter written apart from the planner's: the bytes of every storage alive, from the tensors
    given at the start and every operation's outputs, freed with their storage; ``peak``: the most at once."""

    def __init__(self, existing):
        super().__init__()
        self.seen, self.now, self.peak = set(), 0, 0
        for t in existing:
            self._count(t)

    def _count(self, t):
        st = t.untyped_storage()
        if id(st) in self.seen:
            return
        n = -(-st.nbytes() // 512) * 512  # CUDA's 512-byte blocks, which the planner counts in
        self.seen.add(id(st))
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, id(st), n)

    def _free(self, key, n):
        self.seen.discard(key)
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout is torch.strided:
                self._count(t)
        return out


def _persistent(run):
    p = run.parts.teacher.pipe
    modules = [run.student, run.discriminator, run.ema.model, p.vae, p.text_encoder, run.lpips]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return tensors + [
        v
        for opt in (run.opt_g, run.opt_d)
        for s in opt.state.values()
        for k, v in s.items()
        if torch.is_tensor(v) and k != "step"
    ]  # Adam's step counters live on the host on a GPU


@pytest.fixture(scope="module")
def plan_and_real_run(sd15_teacher):
    """The planner's trace (fake tensors) and the same three steps on real CPU tensors, with what they allocated."""
    from distill.distillation import memory_plan as mp
    from distill.training.memory import allocated_bytes

    cfg, levers, size = _config(sd15_teacher, "--mixed_precision", "bf16")
    plan = mp.trace(cfg, teacher=str(sd15_teacher), architecture=None, resolution=32, levers=levers)
    real = {"grads_g": {}, "grads_d": {}, "peaks": {}}
    with mp.open_run(
        cfg, teacher=str(sd15_teacher), architecture=None, resolution=32, levers=levers, fake=False
    ) as run:
        for key, model in (("grads_g", run.student), ("grads_d", run.discriminator)):
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(
                    lambda p, key=key: real[key].__setitem__(id(p), allocated_bytes(p.grad.nbytes))
                )
        for name, step in (("first", 0), ("no R1", 1), ("R1", 16)):
            counter = LiveBytes(_persistent(run))  # everything alive at the step's start
            with counter:
                run.step(name, step)
            real["peaks"][name] = counter.peak
        real["params_g"] = sum(allocated_bytes(p.nbytes) for p in run.student.parameters())
        real["params_d"] = sum(allocated_bytes(p.nbytes) for p in run.discriminator.parameters())
        real["ema"] = sum(allocated_bytes(t.nbytes) for t in (*run.ema.model.parameters(), *run.ema.model.buffers()))
        for key, opt in (("opt_g", run.opt_g), ("opt_d", run.opt_d)):
            real[key] = sum(allocated_bytes(v.nbytes) for s in opt.state.values() for k, v in s.items() if k != "step")
    return plan, size, real


def test_parameters_gradients_and_optimizer_states_are_the_bytes_of_a_real_run(plan_and_real_run):
    plan, _, real = plan_and_real_run
    held = plan.held
    assert held["parameters_g"] == real["params_g"] and held["parameters_d"] == real["params_d"]
    assert held["gradients_g"] == sum(real["grads_g"].values()) and held["gradients_d"] == sum(real["grads_d"].values())
    assert held["optimizer_g"] == real["opt_g"] and held["optimizer_d"] == real["opt_d"]
    assert held["ema"] == real["ema"]
    # Adam: two fp32 moments per trained weight; 8-bit Adam's layout is the planner's arithmetic (sizes).
    assert real["opt_g"] == 2 * real["params_g"] and plan.sizes["adam_g"] == real["opt_g"]
    assert plan.sizes["adam8bit_g"] < real["opt_g"] / 2


def test_the_planned_peak_of_each_step_is_the_real_runs(plan_and_real_run):
    """Within 2 %: the fake trace and the real CPU run allocate the same tensors (the planner counts CUDA's fused
    attention, which on the CPU is the fused CPU kernel as well)."""
    plan, size, real = plan_and_real_run
    planned = {s.name.split(" (")[0]: s.peak.total for s in plan.steps[size.key()]}
    pairs = [
        (planned["first step"], real["peaks"]["first"]),
        (planned["a step without R1"], real["peaks"]["no R1"]),
        (planned["step 16"], real["peaks"]["R1"]),
    ]
    for plan_bytes, real_bytes in pairs:
        assert plan_bytes == pytest.approx(real_bytes, rel=0.02), pairs
    assert planned["step 16"] > planned["a step without R1"]  # R1's double backward costs memory


def test_a_lora_student_on_the_shared_base_is_planned_as_a_real_run_holds_it(sd15_teacher):
    """``student_lora_rank`` with D on the shared base: the plan holds the UNet's weights once (``shared_base``, the
    bytes of the real run's base), the student's and D's parameters, gradients and Adam states are the adapters' (and
    D's heads') bytes of the real run, exactly, and the step with R1 peaks within 2 % of it."""
    from distill.distillation import memory_plan as mp
    from distill.training.memory import allocated_bytes

    cfg, levers, size = _config(sd15_teacher, "--student_lora_rank", "4", "--d_lora_rank", "4")
    plan = mp.trace(cfg, teacher=str(sd15_teacher), architecture=None, resolution=32, levers=levers)
    with mp.open_run(
        cfg, teacher=str(sd15_teacher), architecture=None, resolution=32, levers=levers, fake=False
    ) as run:
        roles = {id(q) for m in (run.student, run.discriminator) for q in m.parameters()}
        base = run.parts.shared.unet
        assert run.discriminator.unet is base  # one UNet: the student's base is D's backbone
        base_bytes = sum(allocated_bytes(q.nbytes) for q in base.parameters() if id(q) not in roles)
        base_bytes += sum(allocated_bytes(b.nbytes) for b in base.buffers())
        run.step("first", 0)
        counter = LiveBytes([*_persistent(run), *(q for q in base.parameters() if id(q) not in roles)])
        with counter:
            run.step("R1", 16)
        real = {
            "parameters_g": sum(allocated_bytes(q.nbytes) for q in run.student.parameters()),
            "parameters_d": sum(allocated_bytes(q.nbytes) for q in run.discriminator.parameters() if q.requires_grad),
            "optimizer_g": sum(
                allocated_bytes(v.nbytes) for st in run.opt_g.state.values() for k, v in st.items() if k != "step"
            ),
        }
    held = plan.held
    assert held["shared_base"] == base_bytes and held["parameters_g"] == real["parameters_g"]
    assert held["parameters_d"] == real["parameters_d"] and held["optimizer_g"] == real["optimizer_g"]
    assert real["parameters_g"] < base_bytes / 10  # the student is its adapter: the UNet is not copied
    planned = {s.name.split(" (")[0]: s.peak.total for s in plan.steps[size.key()]}
    assert planned["step 16"] == pytest.approx(counter.peak, rel=0.02)


def test_cuda_autocast_policy_on_the_cpu():
    """Under the planner's autocast, ops take CUDA's dtypes: matmuls / convs bf16, norms, softmax and sums float32."""
    import torch.nn.functional as F

    from distill.training.memory import cuda_autocast, cuda_autocast_policy

    x, w = torch.randn(2, 8, 4, 4), torch.randn(8, 8, 3, 3)
    with cuda_autocast_policy(), cuda_autocast("bf16"):
        c = F.conv2d(x, w, padding=1)
        assert c.dtype == torch.bfloat16 and F.linear(torch.randn(3, 8), torch.randn(4, 8)).dtype == torch.bfloat16
        assert F.group_norm(c, 2).dtype == torch.float32 and F.layer_norm(c, (4,)).dtype == torch.float32
        assert (
            c.softmax(-1).dtype == torch.float32 and c.sum().dtype == torch.float32 and c.exp().dtype == torch.float32
        )
        assert torch.einsum("ij,jk->ik", torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.bfloat16
        with torch.autocast("cpu", enabled=False):  # a region that turns autocast off (the fp32 UNet student, R1)
            assert F.group_norm(c, 2).dtype == torch.bfloat16 and F.conv2d(x, w).dtype == torch.float32
    assert F.group_norm(c, 2).dtype == torch.bfloat16  # outside: nothing changes


def test_attention_is_the_fused_kernel_except_where_the_math_one_is_asked_for():
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from distill.training.memory import fused_attention

    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with FakeTensorMode():
        q = torch.randn(2, 4, 1024, 40)  # [N, heads, L, d]: the LxL weights would be 32 MB
        with fused_attention(), Ops():
            F.scaled_dot_product_attention(q, q, q)
            fused = list(ops)
            ops.clear()
            with sdpa_kernel(SDPBackend.MATH):  # R1
                F.scaled_dot_product_attention(q, q, q)
    assert any("flash_attention" in op for op in fused) and not any("softmax" in op for op in fused)
    assert any("softmax" in op for op in ops)


def test_levers_suggested_under_a_budget_are_the_plans_of_those_levers(sd15_teacher, capsys):
    """With --gpu_memory the planner lists each lever's peak and the smallest sets that fit; a listed set, applied as
    config keys, plans the peak it was listed with, and it fits."""
    import re

    from distill.distillation import memory_plan as mp

    # One trace lever left to try (d_gradient_checkpointing); MSE, no R1: fewer operations to trace.
    extra = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--regression", "mse", "--r1_gamma", "0"]
    cfg, levers, size = _config(sd15_teacher, *extra)
    base = mp.trace(cfg, teacher=str(sd15_teacher), architecture=None, resolution=32, levers=levers, steps="peak")
    lowest = mp.trace(
        cfg,
        teacher=str(sd15_teacher),
        architecture=None,
        resolution=32,
        steps="peak",
        levers=mp.TraceLevers(gradient_checkpointing=True, d_gradient_checkpointing=True, d_lora_rank=0),
    )
    cheapest = mp.SizeLevers("adam8bit", "cpu", "fp32", "bf16")
    budget = (base.peak(size).total + lowest.peak(cheapest).total) / 2 / 0.95  # between the config and every lever
    capsys.readouterr()
    code, err = run_script(
        "plan_memory.py",
        ["--teacher", sd15_teacher, *PLAN, *extra, "--gpu_memory", f"{budget / 1e9:.6f}", "--lever_d_lora_rank", "0"],
    )
    out = capsys.readouterr().out
    assert code == 0, err
    assert re.search(r"none \(as configured\)\s+\S+\s+does not fit", out), out
    assert "smallest sets of levers that fit:" in out, out
    first = out.split("smallest sets of levers that fit:\n")[1].splitlines()[0]
    listed = re.match(r"\s*\+ (.*?)\s{2,}(\S+)\s+fits$", first)
    assert listed, first
    # The listed set as config keys: its plan (from the trace of its computation levers) is the listed peak, and fits.
    keys = {
        k: v
        for name in listed.group(1).split(", ")
        for k, v in mp.available_levers(cfg, family="sd", lora_rank=0)[name].items()
    }
    flags = [x for k, v in keys.items() for x in (f"--{k}", str(v).lower())]
    t, s = mp.levers_of(_config(sd15_teacher, *extra, *flags)[0])
    planned = {levers: base, lowest.levers: lowest}[t].peak(s).total
    assert planned <= 0.95 * budget
    assert listed.group(2) == f"{planned / 1e9:.3g}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "BAD_YAML"], "is not valid YAML"),
        (["--architecture", "sd9"], "unknown architecture 'sd9'"),
        (["--teacher", "someone/some-model"], "cannot tell the architecture of teacher 'someone/some-model'"),
        (["--architecture", "sd15", "--batch_size", "0"], "batch_size must be positive"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("batch_size: [1,\n")
    args = [str(tmp_path / "bad.yaml") if a == "BAD_YAML" else a for a in args]
    code, err = run_script("plan_memory.py", args, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
