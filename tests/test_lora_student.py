"""LoRA on one shared frozen base (issue 30): the UNet student as the teacher's UNet + a LoRA adapter and the
teacher-UNet D as the same UNet with its own adapter (students/lora.py, distill/discriminators/unet.py); training,
resume, the base
held once, both exports (the merged pipeline, the LoRA file a stock pipeline loads), bad input."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
from conftest import accelerate_launch, run_script
from safetensors.torch import load_file

from students import OneStepGANPipeline, encode_text
from teachers import load_teacher

PROMPTS = ["a red apple", "a photo of a cat"]
TRAIN = [
    "--lpips_network",
    "random",
    "--batch_size",
    4,
    "--holdout",
    8,
    "--r1_interval",
    2,
    "--report_to",
    "none",
    "--learning_rate_d",
    "1e-4",
]
LORA = ["--student_lora_rank", 4, "--d_lora_rank", 4]


def _cond(pipe, prompts, size=32):
    return encode_text(
        prompts,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        resolution=(size, size),
    )


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.rstrip().splitlines()[-1].split("\r")[-1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _roles(teacher_dir, *, heads=("before", "skip", "after", "final")):
    """A LoRA student and a D on one shared base, both adapters moved off zero (so each forward depends on its own)."""
    from distill.discriminators import UNetDiscriminator
    from students.lora import LoRAStudent, SharedBase

    teacher = load_teacher(str(teacher_dir))
    base = SharedBase(teacher.pipe.unet)
    student = LoRAStudent.from_teacher(base, teacher.pipe.scheduler, rank=4)
    disc = UNetDiscriminator(None, heads=heads, shared_base=base, lora_rank=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in [*student.named_parameters(), *disc.adapter.named_parameters()]:
            if "lora_B" in name:
                p.normal_(std=0.05)
        for conv in (disc.noise_conv, *disc.input_convs):
            conv.weight.normal_(std=0.1)
    return teacher, base, student, disc


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _phases(base, student, disc, cond, z, x):
    """The shared GAN step's two phases by hand: G through a frozen D, then D (+ R1) on the detached fake. Returns each
    phase's gradients of (student, D) and the base's."""
    from distill.losses.gan import r1_penalty

    d_params = [p for p in disc.parameters() if p.requires_grad]
    out = {}
    for p in d_params:  # the G phase: D frozen, as GANStep does it
        p.requires_grad_(False)
    fake = student(z, cond.prompt_embeds)
    sum(l.mean() for l in disc(fake, z, cond.prompt_embeds)).backward()
    out["g"] = (_grads(student), _grads(disc))
    for p in d_params:
        p.requires_grad_(True)
    student.zero_grad(set_to_none=True)
    loss = sum(
        l.mean() for l in disc(torch.cat([x, fake.detach()]), torch.cat([z, z]), torch.cat([cond.prompt_embeds] * 2))
    )
    (loss + r1_penalty(disc, x[:1], noise=z[:1], prompt_embeds=cond.prompt_embeds[:1])).backward()
    out["d"] = (_grads(student), _grads(disc))
    out["base"] = [n for n, p in base.unet.named_parameters() if p.grad is not None and "lora_" not in n]
    disc.zero_grad(set_to_none=True)
    return out


def test_roles_share_one_base_each_through_its_adapter(sd15_teacher):
    """Each role's forward applies its own adapter only; the G phase's backward (through the frozen D) reaches the
    student's adapter alone, the D phase's (with R1's double backward) D's adapter, heads and convs alone, never the
    base; gradient checkpointing of both roles (each block recomputed under its role's adapter) gives the same
    gradients."""
    teacher, base, student, disc = _roles(sd15_teacher)
    unet = teacher.pipe.unet
    assert (
        base.unet is unet
        and disc.unet is unet
        and not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    )
    # A role's parameters are its own tensors: the adapter (and D's heads / convs), never the base's weights.
    base_ids = {id(p) for n, p in unet.named_parameters() if "lora_" not in n}
    assert not base_ids & {id(p) for p in [*student.parameters(), *disc.parameters()]}
    assert all(k.startswith("adapter.lora.") for k in student.state_dict())
    assert {k.split(".")[0] for k in disc.state_dict()} == {"noise_conv", "input_convs", "heads", "adapter"}
    cond = _cond(teacher.pipe, PROMPTS)
    gen = torch.Generator().manual_seed(1)
    z, x = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        g, d = student(z, cond.prompt_embeds), disc(x, z, cond.prompt_embeds)
        with base.plain():
            teacher_eps = unet(z, torch.full((2,), 999), encoder_hidden_states=cond.prompt_embeds).sample
        for name, p in disc.adapter.named_parameters():  # D's adapter moves: G's output does not, D's does
            p.add_(0.1)
        assert torch.equal(student(z, cond.prompt_embeds), g)
        assert not torch.allclose(disc(x, z, cond.prompt_embeds)[0], d[0])
        for name, p in disc.adapter.named_parameters():
            p.sub_(0.1)
    cfg = student.config
    teacher_x0 = (z - (1 - cfg.alpha_cumprod) ** 0.5 * teacher_eps) / cfg.alpha_cumprod**0.5
    assert _rel(g, teacher_x0) > 1e-2  # the student's adapter is on in its forward

    plain = _phases(base, student, disc, cond, z, x)
    g_student, g_disc = plain["g"]
    assert set(g_student) == {n for n, _ in student.named_parameters()} and all(
        v.abs().sum() > 0 for v in g_student.values()
    )
    assert not g_disc and not plain["base"]
    d_student, d_disc = plain["d"]
    assert not d_student and set(d_disc) == {n for n, p in disc.named_parameters()}
    assert all(v.abs().sum() > 0 for n, v in d_disc.items() if n.startswith(("adapter", "heads")))
    # peft's set_adapter would have turned the inactive adapter off: every adapter is trainable still.
    assert all(p.requires_grad for p in [*student.parameters(), *disc.parameters()])

    student.enable_gradient_checkpointing()
    disc.enable_gradient_checkpointing()
    assert student.is_gradient_checkpointing and disc.is_gradient_checkpointing
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    try:
        again = _phases(base, student, disc, cond, z, x)
    finally:
        torch.utils.checkpoint.checkpoint = checkpoint
    assert calls and not again["base"]
    for phase in ("g", "d"):
        for ours, theirs in zip(again[phase], plain[phase]):
            assert ours.keys() == theirs.keys()
            for n in ours:
                torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-7)


def test_d_on_a_shared_base_keeps_only_the_layers_its_heads_read(sd15_teacher):
    """Heads that stop before the last up block: D's adapter tensors there get no gradient, so they are not D's (DDP
    without find_unused_parameters would stop), and the base keeps every layer (the student runs them)."""
    teacher, base, student, disc = _roles(sd15_teacher, heads=("before", "skip"))
    unet = teacher.pipe.unet
    assert unet.conv_out is not None and len(unet.up_blocks) == 2
    cond = _cond(teacher.pipe, PROMPTS)
    sum(l.sum() for l in disc(torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), cond.prompt_embeds)).backward()
    assert [n for n, p in disc.named_parameters() if p.grad is None] == []
    idle = [n for n, p in base.params["disc"].items() if not p.requires_grad]
    assert idle and all(n.startswith("up_blocks.1.") for n in idle)
    assert all(p.requires_grad for p in student.parameters())  # the student's adapter in that block still trains


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_the_lora_file_loads_into_a_stock_pipeline_as_the_merged_student(tiny_teacher_factory, tmp_path, family):
    """students.lora.save_lora: a stock StableDiffusion(XL)Pipeline of the teacher with load_lora_weights and the saved
    one-step DDIM scheduler gives the merged student's latents (v-prediction and SDXL teachers; the SD1.5 case runs
    on a trained student below)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from students.lora import save_lora

    teacher_dir = tiny_teacher_factory(family)
    teacher, base, student, _ = _roles(teacher_dir)
    ema = copy.deepcopy(student)  # an EMA-like copy: its own tensors, the base shared
    assert ema.base is base and not ema.adapter.is_live() and student.adapter.is_live()
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(1.5)
    save_lora(ema, tmp_path / "lora", sdxl=family == "sdxl", scheduler_config=dict(teacher.pipe.scheduler.config))
    merged = OneStepGANPipeline(
        student=ema.merged(),
        vae=teacher.pipe.vae,
        text_encoder=teacher.pipe.text_encoder,
        tokenizer=teacher.pipe.tokenizer,
        text_encoder_2=getattr(teacher.pipe, "text_encoder_2", None),
        tokenizer_2=getattr(teacher.pipe, "tokenizer_2", None),
    )
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = merged(PROMPTS, latents=z, output_type="latent").images
    with torch.no_grad():
        cond = _cond(teacher.pipe, PROMPTS)
        torch.testing.assert_close(ema(z, cond.prompt_embeds, cond.added_cond_kwargs()), expected, rtol=1e-4, atol=1e-5)
    stock = DiffusionPipeline.from_pretrained(teacher_dir)
    stock.scheduler = DDIMScheduler.from_pretrained(tmp_path / "lora", subfolder="scheduler")
    call = dict(latents=z, num_inference_steps=1, guidance_scale=0.0, output_type="latent")
    without = stock(PROMPTS, **call).images
    stock.load_lora_weights(tmp_path / "lora")
    got = stock(PROMPTS, **call).images
    assert _rel(got, expected) <= 1e-4 < 1e-2 < _rel(without, expected)


def _spy_parts(monkeypatch) -> list:
    from distill.distillation import setup

    built, build = [], setup.build_student
    monkeypatch.setattr(setup, "build_student", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    return built


def test_lora_student_trains_resumes_exactly_and_exports_both_ways(
    pairs_dir, sd15_teacher, tmp_path, capsys, monkeypatch
):
    """Through the CLI: a 4-step run equals 2 steps + a resume of 2, bit for bit on both adapters, D's heads and the EMA
    (a checkpoint holds those, not the UNet); the final pipeline is the EMA adapter merged into the base and reloads;
    its lora/ folder loaded into a stock pipeline of the teacher gives the merged student's latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    built = _spy_parts(monkeypatch)
    common = [
        "--pairs",
        pairs_dir,
        "--checkpointing_steps",
        2,
        "--validation_steps",
        2,
        *TRAIN,
        *LORA,
        "--learning_rate_g",
        "3e-3",
        "--ema_half_life_kimg",
        "0.004",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, err = run_script("train_student.py", [*common, "--output_dir", straight, "--max_train_steps", 4], capsys)
    assert code == 0, err
    assert run_script("train_student.py", [*common, "--output_dir", resumed, "--max_train_steps", 2], capsys)[0] == 0
    code, err = run_script("train_student.py", [*common, "--output_dir", resumed, "--max_train_steps", 4], capsys)
    assert code == 0, err
    assert [r["step"] for r in _stats(resumed) if "g_lpips" in r] == [1, 2, 3, 4]
    assert all("d_real" in r and "g_adv" in r for r in _stats(straight) if "g_lpips" in r)
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = (load_file(run / "checkpoints" / "checkpoint-4" / name) for run in (straight, resumed))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), name
    student_state = load_file(straight / "checkpoints" / "checkpoint-4" / "model.safetensors")
    d_state = load_file(straight / "checkpoints" / "checkpoint-4" / "model_1.safetensors")
    assert all(k.startswith("adapter.lora.") and "/lora_" in k for k in student_state)
    assert {k.split(".")[0] for k in d_state} == {"noise_conv", "input_convs", "heads", "adapter"}
    assert all("/lora_" in k for k in d_state if k.startswith("adapter."))
    config = (straight / "config.yaml").read_text()
    assert "student_lora_rank: 4" in config and "d_shared_base: true" in config and "learning_rate_g: 0.003" in config

    # The merged pipeline: today's UNetStudent, the EMA adapter merged (not the last live weights).
    parts = built[0]
    ema = copy.deepcopy(parts.student)
    ema_state = load_file(straight / "checkpoints" / "checkpoint-4" / "ema.safetensors")
    ema.load_state_dict(ema_state)
    assert any(not torch.equal(ema_state[k], v) for k, v in student_state.items())  # an average, not the live weights
    pipe = OneStepGANPipeline.from_pretrained(straight / "pipeline")
    assert type(pipe.student).__name__ == "UNetStudent" and not any(
        "lora" in n for n, _ in pipe.student.named_parameters()
    )
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    merged = pipe(PROMPTS, latents=z, output_type="latent").images
    cond = pipe.encode_prompt(PROMPTS, (32, 32))
    with torch.no_grad():
        torch.testing.assert_close(ema(z, cond.prompt_embeds), merged, rtol=1e-4, atol=1e-5)
    assert pipe("a cat", output_type="pil").images[0].size == (32, 32)
    assert "## As a LoRA of the teacher" in (straight / "pipeline" / "README.md").read_text()

    # The LoRA alone, in a stock pipeline of the teacher (as LCM-LoRA is used), with the one-step scheduler beside it.
    stock = StableDiffusionPipeline.from_pretrained(sd15_teacher)
    call = dict(latents=z, num_inference_steps=1, guidance_scale=0.0, output_type="latent")
    stock.scheduler = DDIMScheduler.from_pretrained(straight / "pipeline", subfolder="lora/scheduler")
    without = stock(PROMPTS, **call).images
    stock.load_lora_weights(straight / "pipeline", subfolder="lora")
    got = stock(PROMPTS, **call).images
    assert _rel(got, merged) <= 1e-4 < 1e-2 < _rel(without, merged), (_rel(got, merged), _rel(without, merged))


def _copies(weights: list[torch.Tensor]) -> list[int]:
    """For each tensor of ``weights``, how many distinct storages among every live tensor of the process hold its
    values."""
    gc.collect()
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.device.type != "meta":
            by_shape.setdefault(tuple(obj.shape), []).append(obj)
    return [
        len(
            {
                t.untyped_storage().data_ptr()
                for t in by_shape.get(tuple(w.shape), [])
                if torch.equal(t.detach().float(), w.detach().float())
            }
        )
        for w in weights
    ]


def _random_weights(unet) -> list[torch.Tensor]:
    """The base's frozen weights that no other tensor equals by chance (random matrices and kernels, not norms /
    biases)."""
    return [p for n, p in unet.named_parameters() if "lora_" not in n and p.ndim >= 2 and p.float().std() > 0]


@pytest.mark.parametrize("mode", ["unet-lora", "gigagan-lora-d", "unet-full"])
def test_the_base_unet_is_held_once_during_training(pairs_dir, tmp_path, capsys, monkeypatch, mode):
    """Every live tensor of the process counted at the start of training and at each step: a LoRA student with its D, or
    a GAN student's D on the shared base, hold the UNet's weights once (no student, D, EMA or teacher copy); the full
    UNet student (the contrast) holds three (student, its EMA, D)."""
    from distill.training.loop import TrainLoop

    built = _spy_parts(monkeypatch)
    counts = []
    resume, end_step = TrainLoop.resume, TrainLoop.end_step

    def probe() -> list[torch.Tensor]:
        parts = built[0]
        assert parts.teacher.pipe.unet is None  # the teacher's reference goes after setup
        return _random_weights(parts.shared.unet if parts.shared is not None else parts.student.unet)

    monkeypatch.setattr(
        TrainLoop, "resume", lambda self, *a, **k: counts.append(_copies(probe())) or resume(self, *a, **k)
    )
    monkeypatch.setattr(
        TrainLoop, "end_step", lambda self, *a, **k: counts.append(_copies(probe())) or end_step(self, *a, **k)
    )
    args = {
        "unet-lora": LORA,
        "unet-full": [],
        "gigagan-lora-d": [
            "--student",
            "gigagan",
            "--student_size",
            "tiny",
            "--gan_start_step",
            0,
            "--d_lora_rank",
            4,
            "--d_shared_base",
            "true",
        ],
    }[mode]
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            tmp_path / "run",
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            1,
            "--validation_steps",
            1,
            *TRAIN,
            *args,
        ],
        capsys,
    )
    assert code == 0, err
    if mode == "unet-full":  # at the start: the student, its EMA and D (the teacher's released); then they train apart
        assert min(counts[0]) == 3 and built[0].shared is None
        return
    assert len(counts) == 3 and len(counts[0]) > 20 and all(c == [1] * len(counts[0]) for c in counts), counts
    parts = built[0]
    assert parts.discriminator.unet is parts.shared.unet
    if mode == "gigagan-lora-d":
        assert [r["step"] for r in _stats(tmp_path / "run") if "d_real" in r] == [1, 2]


def test_lora_student_memory_options_run(pairs_dir, tmp_path, capsys, monkeypatch):
    """The base in bf16 (the adapters in fp32), bf16 autocast, gradient accumulation, checkpointing in both roles (R1's
    double backward included), validation prompts solved by the teacher (its adapters off), MSE regression."""
    built = _spy_parts(monkeypatch)
    run = tmp_path / "opts"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
            "--validation_steps",
            2,
            *TRAIN,
            *LORA,
            "--gradient_accumulation_steps",
            2,
            "--mixed_precision",
            "bf16",
            "--gradient_checkpointing",
            "true",
            "--d_gradient_checkpointing",
            "true",
            "--lora_base_dtype",
            "bf16",
            "--regression",
            "mse",
            "--validation_prompts",
            "a cat",
            "--num_validation_seeds",
            1,
        ],
        capsys,
    )
    assert code == 0, err
    parts = built[0]
    assert parts.student.is_gradient_checkpointing and parts.discriminator.is_gradient_checkpointing
    assert parts.shared.dtype == torch.bfloat16 and {p.dtype for p in parts.student.parameters()} == {torch.float32}
    stats = [r for r in _stats(run) if "g_mse" in r]
    assert [r["nimg"] for r in stats] == [8, 16] and "d_r1" in stats[0] and all("d_real" in r for r in stats)
    saved = load_file(run / "pipeline" / "student" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # the merged base, as it was held
    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert torch.isfinite(
        pipe(["a cat"], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--student", "gigagan", "--student_lora_rank", 4], "student_lora_rank is for the UNet student"),
        (["--student_lora_rank=-2"], "student_lora_rank must not be negative, got -2"),
        (["--student_lora_rank", 4], "student_lora_rank needs d_lora_rank > 0, got 0"),
        (["--student_lora_rank", 4, "--d_lora_rank=-1"], "student_lora_rank needs d_lora_rank > 0, got -1"),
        (["--student_lora_rank", 4, "--d_lora_rank", 4, "--d_shared_base", "false"], "d_shared_base must be true"),
        (["--d_shared_base", "true"], "d_shared_base needs d_lora_rank > 0, got 0"),
        (["--lora_base_dtype", "bf16"], "lora_base_dtype bf16 is the dtype of the shared frozen UNet"),
        (["--lora_base_dtype", "fp16"], "unknown lora_base_dtype 'fp16'"),
    ],
)
def test_bad_lora_input_is_one_line_before_the_teacher_loads(pairs_dir, tmp_path, capsys, monkeypatch, args, message):
    import distill.distillation.setup as setup

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not load before the config is checked")

    monkeypatch.setattr(setup, "load_teacher", no_teacher)
    code, err = run_script(
        "train_student.py", ["--pairs", pairs_dir, "--output_dir", tmp_path / "x", *TRAIN, *args], capsys
    )
    assert code == 2 and message in _last_line(err), err[-2000:]
    assert not (tmp_path / "x").exists()


def test_two_processes_sync_the_adapters_only(pairs_dir, tmp_path):
    """DDP over 2 CPU processes (gloo): each rank reads other pairs, so the adapters and D's heads stay equal only if
    they are synchronised (checked at every checkpoint); the frozen base is no parameter of either wrapped module."""
    run = tmp_path / "ddp"
    proc = accelerate_launch(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
            "--validation_steps",
            100,
            *TRAIN,
            *LORA,
            "--batch_size",
            2,
        ],
        num_processes=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_file(run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert state and all(k.startswith("adapter.lora.") for k in state)
    assert [r["nimg"] for r in _stats(run) if "g_lpips" in r] == [4, 8]
