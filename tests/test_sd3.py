"""Flow-matching teachers (SD3 form) end to end: loading, pairs, text encoding, the transformer student and
discriminator, training and export, on tiny random SD3 pipelines with and without T5."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import accelerate_launch, run_script
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

from data_gen.noise import noise_for_seed
from distill.discriminators import TransformerDiscriminator
from distill.losses.gan import r1_penalty
from students import OneStepGANPipeline, SD3TransformerStudent, encode_sd3_text
from teachers import load_teacher, solve_ode

PROMPTS = ["a red apple on a table", "a photo of a cat", "a blue car in the rain", "a bowl of soup"]
COMMON = ["--resolution", "32", "--num_inference_steps", "3", "--guidance_scale", "4.0"]


def _diffusers_pipe(path, family: str) -> StableDiffusion3Pipeline:
    """The teacher as a user loads it with diffusers alone (a T5-less folder needs text_encoder_3=None)."""
    kwargs = dict(text_encoder_3=None, tokenizer_3=None) if family == "sd3" else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()  # as inside the pipelines' calls (CPU attention kernels differ with autograd on)
def _encode(pipe, prompts, max_sequence_length=256):
    return encode_sd3_text(
        prompts,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        tokenizer_2=pipe.tokenizer_2,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer_3=pipe.tokenizer_3,
        text_encoder_3=pipe.text_encoder_3,
        max_sequence_length=max_sequence_length,
        joint_attention_dim=pipe.transformer.config.joint_attention_dim,
    )


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("error: "), err
    return last


@pytest.mark.parametrize("family", ["sd3", "sd3-t5"])
def test_teacher_loads_with_its_flow_matching_sampler(tiny_teacher_factory, family):
    path = tiny_teacher_factory(family)
    index = json.loads((path / "model_index.json").read_text())
    if family == "sd3":  # T5 is optional in SD3 but not in the pipeline's signature: a plain reload fails...
        assert index["text_encoder_3"] == [None, None]
        with pytest.raises(ValueError, match="text_encoder_3"):
            StableDiffusion3Pipeline.from_pretrained(path)
    teacher = load_teacher(str(path))  # ...load_teacher passes text_encoder_3=None itself
    assert teacher.family == "sd3" and teacher.prediction_type == "flow_matching"
    assert (teacher.pipe.text_encoder_3 is None) == (family == "sd3")
    assert teacher.latent_shape(32) == (16, 16, 16) and teacher.sample_size == 16
    sched = teacher.pipe.scheduler
    assert (
        type(sched).__name__ == "FlowMatchEulerDiscreteScheduler" and sched.config.shift == 3.0
    )  # its own settings kept
    assert (
        teacher.latent_convention()["shift_factor"] == 0.0609
        and teacher.latent_convention()["scaling_factor"] == 1.5305
    )
    with pytest.raises(
        ValueError, match="scheduler 'ddim' cannot solve a flow-matching teacher's ODE \\(sd3\\): use flow_euler"
    ):
        load_teacher(str(path), scheduler="ddim")


@pytest.mark.parametrize("family", ["sd3", "sd3-t5"])
def test_ode_matches_the_pipeline_with_dynamic_shifting(tiny_teacher_factory, tmp_path, family):
    """A scheduler config with dynamic shifting (SD3.5 / FLUX style) is kept: mu follows the image size."""
    import shutil

    path = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_factory(family), path)
    cfg_path = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    cfg_path.write_text(json.dumps(cfg))
    teacher = load_teacher(str(path))
    assert teacher.pipe.scheduler.config.use_dynamic_shifting
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = solve_ode(
        teacher.pipe,
        prompts=PROMPTS[:2],
        noise=noise,
        num_inference_steps=3,
        guidance_scale=5.0,
        negative_prompt="blurry",
        max_sequence_length=16,
    )
    ref = _diffusers_pipe(path, family)(
        prompt=PROMPTS[:2],
        negative_prompt=["blurry"] * 2,
        latents=noise.clone(),
        num_inference_steps=3,
        guidance_scale=5.0,
        max_sequence_length=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    static = _diffusers_pipe(tiny_teacher_factory(family), family)(
        prompt=PROMPTS[:2],
        negative_prompt=["blurry"] * 2,
        latents=noise.clone(),
        num_inference_steps=3,
        guidance_scale=5.0,
        max_sequence_length=16,
        output_type="latent",
    ).images
    assert (ours - static).abs().max() > 1e-4  # the shift really changed the solve


@pytest.mark.parametrize("family", ["sd3", "sd3-t5"])
def test_pairs_match_the_diffusers_pipeline(tiny_teacher_factory, prompt_file, tmp_path, capsys, family):
    teacher = tiny_teacher_factory(family)
    out = tmp_path / "pairs"
    code, err = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            teacher,
            "--prompts",
            prompt_file,
            "--num_pairs",
            6,
            "--batch_size",
            4,
            "--shard_size",
            4,
            "--output_dir",
            out,
            *COMMON,
        ],
        capsys,
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    # The sampler resolved for the family, the T5 length and the latent convention are recorded.
    assert manifest["config"]["scheduler"] == "flow_euler" and manifest["config"]["max_sequence_length"] == 256
    assert manifest["scheduler_config"]["shift"] == 3.0 and manifest["teacher"]["family"] == "sd3"
    assert manifest["latents"]["scaling_factor"] == 1.5305 and manifest["latents"]["shift_factor"] == 0.0609
    ds = datasets.load_dataset(str(out), split="train").with_format("numpy")
    assert ds.features["target"].shape == (16, 16, 16)
    rows = {int(r["index"]): r for r in ds}
    pipe = _diffusers_pipe(teacher, family)
    for i in (0, 5):
        row = rows[i]
        assert row["prompt"] == PROMPTS[i % 4]
        noise = noise_for_seed(int(row["seed"]), (16, 16, 16), torch.float16)
        np.testing.assert_array_equal(row["noise"], noise.numpy())
        # diffusers' SD3 pipeline returns latents before un-scaling: the same VAE-scaled convention as SD.
        ref = pipe(
            prompt=row["prompt"],
            latents=noise.float()[None],
            num_inference_steps=3,
            guidance_scale=4.0,
            output_type="latent",
        ).images[0]
        np.testing.assert_allclose(row["target"].astype(np.float32), ref.half().float().numpy(), atol=2e-3, rtol=2e-3)


def test_pairs_are_the_same_on_two_processes_and_resume(tiny_teacher_factory, prompt_file, tmp_path, capsys):
    teacher = tiny_teacher_factory("sd3-t5")
    args = [
        "--teacher",
        teacher,
        "--prompts",
        prompt_file,
        "--num_pairs",
        8,
        "--batch_size",
        2,
        "--shard_size",
        2,
        "--max_sequence_length",
        32,
        *COMMON,
    ]
    one = accelerate_launch("generate_pairs.py", [*args, "--output_dir", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch("generate_pairs.py", [*args, "--output_dir", tmp_path / "two"], num_processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = datasets.load_dataset(str(tmp_path / "one"), split="train").with_format("numpy")
    b = datasets.load_dataset(str(tmp_path / "two"), split="train").with_format("numpy")
    assert sorted(a["index"]) == sorted(b["index"]) == list(range(8))
    rows_b = {int(r["index"]): r for r in b}
    for r in a:
        np.testing.assert_array_equal(r["target"], rows_b[int(r["index"])]["target"])
    # Resumable: a lost shard is made again, the others are kept as they were, and the rows are the same.
    data = tmp_path / "two" / "data"
    lost = data / "train-00002-of-00004.parquet"
    lost.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in data.glob("*.parquet")}
    code, err = run_script("generate_pairs.py", [*args, "--output_dir", tmp_path / "two"], capsys)
    assert code == 0, err
    assert {p: (data / p).stat().st_mtime_ns for p in kept} == kept and lost.is_file()
    again = {
        int(r["index"]): r for r in datasets.load_dataset(str(tmp_path / "two"), split="train").with_format("numpy")
    }
    for r in a:
        np.testing.assert_array_equal(r["target"], again[int(r["index"])]["target"])
    # Another T5 length defines other rows: refused, not mixed in.
    code, err = run_script(
        "generate_pairs.py", [*args, "--output_dir", tmp_path / "two", "--max_sequence_length", 16], capsys
    )
    assert code == 2 and "max_sequence_length: 32 -> 16" in _one_error_line(err)


def test_sampler_keys_are_checked_against_the_family(sd15_teacher, tiny_teacher_factory, prompt_file, tmp_path, capsys):
    base = ["--prompts", prompt_file, "--num_pairs", 2, "--resolution", 32, "--num_inference_steps", 2]
    code, err = run_script(
        "generate_pairs.py",
        [*base, "--teacher", tiny_teacher_factory("sd3"), "--scheduler", "dpmpp", "--output_dir", tmp_path / "a"],
        capsys,
    )
    assert (
        code == 2
        and "scheduler 'dpmpp' cannot solve a flow-matching teacher's ODE (sd3): use flow_euler" in _one_error_line(err)
    )
    code, err = run_script(
        "generate_pairs.py",
        [*base, "--teacher", sd15_teacher, "--scheduler", "flow_euler", "--output_dir", tmp_path / "b"],
        capsys,
    )
    assert code == 2 and "use ddim or dpmpp or euler" in _one_error_line(err)
    code, err = run_script(
        "generate_pairs.py",
        [*base, "--teacher", sd15_teacher, "--max_sequence_length", 8, "--output_dir", tmp_path / "c"],
        capsys,
    )
    assert code == 2 and "max_sequence_length is for SD3 teachers" in _one_error_line(err)
    # auto is ddim for SD: the manifest records the resolved name, as before auto existed.
    assert (
        run_script("generate_pairs.py", [*base, "--teacher", sd15_teacher, "--output_dir", tmp_path / "d"], capsys)[0]
        == 0
    )
    config = json.loads((tmp_path / "d" / "manifest.json").read_text())["config"]
    assert config["scheduler"] == "ddim" and config["max_sequence_length"] is None


@pytest.mark.parametrize("family", ["sd3", "sd3-t5"])
def test_text_encoding_matches_the_pipelines_encode_prompt(tiny_teacher_factory, family):
    pipe = _diffusers_pipe(tiny_teacher_factory(family), family)
    for length in (256, 7):
        ours = _encode(pipe, PROMPTS, max_sequence_length=length)
        with torch.no_grad():  # as inside the pipeline's call
            embeds, _, pooled, _ = pipe.encode_prompt(
                PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=length
            )
        assert ours.prompt_embeds.shape == (4, 77 + length, 64) and ours.pooled_prompt_embeds.shape == (4, 64)
        torch.testing.assert_close(ours.prompt_embeds, embeds, rtol=0, atol=0)
        torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, rtol=0, atol=0)
        assert ours.time_ids is None and set(ours.added_cond_kwargs()) >= {"text_embeds"}


@pytest.mark.parametrize("family", ["sd3", "sd3-t5"])
def test_student_starts_as_the_teachers_one_step_estimate(tiny_teacher_factory, family):
    """x0 = noise - v at sigma = 1: exactly the teacher pipeline's own one-Euler-step solve without CFG."""
    pipe = _diffusers_pipe(tiny_teacher_factory(family), family)
    student = SD3TransformerStudent.from_teacher(pipe.transformer, pipe.scheduler)
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = _encode(pipe, PROMPTS[:2])
    with torch.no_grad():
        x0 = student(noise, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs())
    one_step = pipe(
        prompt=PROMPTS[:2], latents=noise.clone(), num_inference_steps=1, guidance_scale=1.0, output_type="latent"
    ).images
    torch.testing.assert_close(x0, one_step, rtol=0, atol=1e-6)
    assert (x0 - noise).abs().mean() > 1e-3
    assert student.latent_channels == 16 and student.sample_size == 16
    with pytest.raises(ValueError, match="pooled prompt embedding"):
        student(noise, cond.prompt_embeds)


def _teacher_block_outputs(transformer, x, cond, timestep: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher transformer's image tokens after every block (forward hooks) and its output."""
    feats = []
    hooks = [b.register_forward_hook(lambda m, i, o: feats.append(o[1])) for b in transformer.transformer_blocks]
    try:
        out = transformer(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=torch.full((x.shape[0],), timestep),
        ).sample
    finally:
        for h in hooks:
            h.remove()
    return feats, out


def test_discriminator_heads_and_zero_initialised_noise_path(tiny_teacher_factory):
    teacher = load_teacher(str(tiny_teacher_factory("sd3")))
    tr = teacher.pipe.transformer
    disc = TransformerDiscriminator(tr, timestep=0, heads=("early", "middle", "late", "final"))
    assert disc.depths == {"early": 0, "middle": 1, "late": 2, "final": -1}
    x, z = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)
    cond = _encode(teacher.pipe, ["a cat", "a dog"])
    with torch.no_grad():
        logits, feats = disc(x, z, cond.prompt_embeds, cond.added_cond_kwargs(), return_features=True)
        ref_feats, ref_out = _teacher_block_outputs(tr, x, cond, 0.0)
    # Three depths on the 8x8 patch grid (16x16 latent, patch 2), then the final head on the 16x16 output.
    assert [tuple(l.shape) for l in logits] == [(2, 1, 8, 8)] * 3 + [(2, 1, 16, 16)]
    # The zero-initialised noise embedding leaves the backbone computing the teacher's features exactly.
    for depth in (0, 1, 2):
        torch.testing.assert_close(feats[depth], ref_feats[depth], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[-1], ref_out, rtol=0, atol=1e-5)
    # ...but it is trainable and the noise reaches every depth once it moves.
    with torch.no_grad():
        disc.noise_embed.weight.normal_()
        moved = disc(x, z, cond.prompt_embeds, cond.added_cond_kwargs(), return_features=True)[1]
    assert all(not torch.allclose(moved[d], feats[d]) for d in (0, 1, 2))
    assert disc.transformer is not tr and len(tr.transformer_blocks) == 3  # the teacher is untouched


def test_discriminator_r1_is_differentiable(tiny_teacher_factory):
    teacher = load_teacher(str(tiny_teacher_factory("sd3-t5")))
    disc = TransformerDiscriminator(teacher.pipe.transformer)
    cond = _encode(teacher.pipe, ["a cat"], max_sequence_length=8)
    x, z = torch.randn(1, 16, 16, 16), torch.randn(1, 16, 16, 16)
    r1 = r1_penalty(disc, x, noise=z, prompt_embeds=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs())
    assert r1.item() > 0
    r1.backward()  # double backward through the joint attention
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.transformer.transformer_blocks.parameters())


@pytest.mark.parametrize("heads", [("early",), ("middle", "late"), ("early", "middle", "late"), ("final",), ("0", "2")])
@pytest.mark.parametrize("mode", ["copy", "lora", "shared"])
def test_discriminator_trains_only_what_its_heads_read(tiny_teacher_factory, heads, mode):
    """Every trainable parameter gets a gradient (DDP without find_unused_parameters needs it): blocks past the
    deepest head are dropped (or frozen on a shared backbone), and so is the last kept block's text output."""
    teacher = load_teacher(str(tiny_teacher_factory("sd3")))
    tr = teacher.pipe.transformer
    disc = TransformerDiscriminator(tr, heads=heads, copy_backbone=mode != "shared")
    if mode == "lora":
        disc.add_lora(2)
    cond = _encode(teacher.pipe, ["a cat", "a dog"], max_sequence_length=4)
    logits = disc(torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16), cond.prompt_embeds, cond.added_cond_kwargs())
    assert len(logits) == len(heads)
    sum(l.sum() for l in logits).backward()
    unused = [n for n, p in disc.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]
    trainable = [n for n, p in disc.named_parameters() if p.requires_grad]
    if mode == "lora":
        assert all("lora" in n or n.startswith(("heads", "noise_embed")) for n in trainable) and any(
            "lora" in n for n in trainable
        )
    deepest = 3 if "final" in heads else max(disc.depths.values()) + 1
    if mode == "shared":
        assert disc.transformer is tr and len(tr.transformer_blocks) == 3
        tr.requires_grad_(False)  # the session-scoped teacher is shared with other tests
    else:
        assert len(disc.transformer.transformer_blocks) == deepest and (disc.transformer.proj_out is not None) == (
            "final" in heads
        )


def test_discriminator_rejects_unknown_heads(tiny_teacher_factory):
    tr = load_teacher(str(tiny_teacher_factory("sd3"))).pipe.transformer
    with pytest.raises(
        ValueError, match="unknown transformer discriminator head 'before'; choose from early, middle, late, final"
    ):
        TransformerDiscriminator(tr, heads=("before",))


@pytest.fixture(scope="module")
def sd3_pairs(tiny_teacher_factory, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-pairs") / "pairs"
    code, err = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            tiny_teacher_factory("sd3"),
            "--prompts",
            prompt_file,
            "--num_pairs",
            24,
            "--resolution",
            32,
            "--num_inference_steps",
            3,
            "--batch_size",
            8,
            "--max_sequence_length",
            8,
            "--output_dir",
            out,
        ],
    )
    assert code == 0, err
    return out


TRAIN = [
    "--student",
    "transformer",
    "--lpips_network",
    "random",
    "--batch_size",
    4,
    "--holdout",
    8,
    "--r1_interval",
    2,
    "--ema_half_life_kimg",
    0,
    "--report_to",
    "none",
    "--learning_rate_g",
    "1e-4",
    "--learning_rate_d",
    "1e-4",
]


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_training_lowers_heldout_lpips_and_the_export_reproduces_the_student(
    sd3_pairs, tiny_teacher_factory, tmp_path, capsys
):
    run = tmp_path / "run"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            sd3_pairs,
            "--output_dir",
            run,
            "--max_train_steps",
            8,
            "--checkpointing_steps",
            8,
            "--validation_steps",
            8,
            *TRAIN,
        ],
        capsys,
    )
    assert code == 0, err
    val = [r for r in _stats(run) if "val_lpips" in r]
    assert [r["step"] for r in val] == [0, 8] and val[-1]["val_lpips"] < val[0]["val_lpips"]
    train = [r for r in _stats(run) if "g_lpips" in r]
    assert len(train) == 8 and all(k in train[0] for k in ("g_adv", "d_real", "d_fake", "d_mismatch", "d_r1"))
    assert "d_heads: early,middle,late" in (run / "config.yaml").read_text()  # the transformer D's default heads
    # The export reloads (with this project, and with diffusers alone) and reproduces the trained EMA student.
    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    remote = DiffusionPipeline.from_pretrained(run / "pipeline", trust_remote_code=True)
    assert type(pipe.student).__name__ == "SD3TransformerStudent" and pipe.is_sd3 and pipe.text_encoder_3 is None
    assert pipe.config.max_sequence_length == 8
    ckpt = SD3TransformerStudent.from_pretrained(run / "checkpoints" / "checkpoint-8" / "pipeline" / "student")
    z = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    a = pipe(["a cat", "a dog"], latents=z, output_type="latent").images
    torch.testing.assert_close(a, remote(["a cat", "a dog"], latents=z, output_type="latent").images, rtol=0, atol=0)
    teacher = _diffusers_pipe(tiny_teacher_factory("sd3"), "sd3")
    cond = _encode(teacher, ["a cat", "a dog"], max_sequence_length=8)
    with torch.no_grad():
        torch.testing.assert_close(a, ckpt(z, cond.prompt_embeds, cond.added_cond_kwargs()), rtol=0, atol=1e-6)
    # SD3's encode_prompt output goes in as prompt_embeds + pooled_prompt_embeds, like the teacher pipeline's.
    with torch.no_grad():
        embeds, _, pooled, _ = teacher.encode_prompt(
            ["a cat", "a dog"], None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=8
        )
    torch.testing.assert_close(
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=z, output_type="latent").images, a
    )
    with pytest.raises(ValueError, match="this is an SD3 student: pass pooled_prompt_embeds"):
        pipe(prompt_embeds=embeds, latents=z)
    assert pipe("a cat", output_type="pil").images[0].size == (32, 32)


def test_t5_teacher_trains_with_lora_and_exports_its_t5(tiny_teacher_factory, prompt_file, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    assert (
        run_script(
            "generate_pairs.py",
            [
                "--teacher",
                tiny_teacher_factory("sd3-t5"),
                "--prompts",
                prompt_file,
                "--num_pairs",
                12,
                "--max_sequence_length",
                8,
                "--output_dir",
                pairs,
                *COMMON,
            ],
            capsys,
        )[0]
        == 0
    )
    run = tmp_path / "run"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
            "--validation_steps",
            100,
            *TRAIN,
            "--d_lora_rank",
            2,
            "--gradient_checkpointing",
            "--mixed_precision",
            "bf16",
            "--d_heads",
            "early,late",
        ],
        capsys,
    )
    assert code == 0, err
    assert all("d_real" in r for r in _stats(run) if "g_lpips" in r)
    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel" and type(pipe.tokenizer_3).__name__ == "T5Tokenizer"
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    teacher = _diffusers_pipe(tiny_teacher_factory("sd3-t5"), "sd3-t5")
    cond = _encode(teacher, ["a cat"], max_sequence_length=8)
    with torch.no_grad():
        ref = pipe.student(z, cond.prompt_embeds, cond.added_cond_kwargs())
    torch.testing.assert_close(pipe("a cat", latents=z, output_type="latent").images, ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "sd3-t5"])
def test_stored_prompt_embeds_are_sd3_conditioning_and_train_like_encoding(
    tiny_teacher_factory, prompt_file, tmp_path, capsys, family
):
    """--store_prompt_embeds with an SD3 teacher stores encode_sd3_text's output (CLIP + T5 / zero tokens, both pooled
    projections), and training on them gives the losses of encoding the prompts per step (to float16 rounding)."""
    stats = {}
    for name in ("encoded", "stored"):
        pairs = tmp_path / f"pairs-{name}"
        args = [
            "--teacher",
            tiny_teacher_factory(family),
            "--prompts",
            prompt_file,
            "--num_pairs",
            12,
            "--batch_size",
            6,
            "--max_sequence_length",
            8,
            "--output_dir",
            pairs,
            *COMMON,
        ] + (["--store_prompt_embeds"] if name == "stored" else [])
        assert run_script("generate_pairs.py", args, capsys)[0] == 0
        if name == "stored":
            manifest = json.loads((pairs / "manifest.json").read_text())
            assert manifest["prompt_embeds"]["columns"] == {"prompt_embeds": [77 + 8, 64], "pooled_prompt_embeds": [64]}
            rows = datasets.load_dataset(str(pairs), split="train").with_format("torch")
            ref = _encode(
                _diffusers_pipe(tiny_teacher_factory(family), family), list(rows["prompt"][:3]), max_sequence_length=8
            )
            torch.testing.assert_close(rows["prompt_embeds"][:3], ref.prompt_embeds.half().float(), rtol=0, atol=0)
            torch.testing.assert_close(
                rows["pooled_prompt_embeds"][:3], ref.pooled_prompt_embeds.half().float(), rtol=0, atol=0
            )
        run = tmp_path / name
        code, err = run_script(
            "train_student.py",
            [
                "--pairs",
                pairs,
                "--output_dir",
                run,
                "--max_train_steps",
                2,
                "--checkpointing_steps",
                2,
                "--validation_steps",
                100,
                *TRAIN,
            ],
            capsys,
        )
        assert code == 0, err
        stats[name] = [r for r in _stats(run) if "g_lpips" in r]
    assert len(stats["stored"]) == len(stats["encoded"]) == 2
    for a, b in zip(stats["encoded"], stats["stored"]):
        assert a.keys() == b.keys()
        for key in a.keys() - {"step_time"}:  # (the steps' wall-clock seconds differ)
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-9), key


def test_two_process_training_keeps_replicas_identical(sd3_pairs, tmp_path):
    """DDP (no find_unused_parameters) with the transformer D: its dropped blocks and frozen text outputs."""
    run = tmp_path / "ddp"
    res = accelerate_launch(
        "train_student.py",
        [
            "--pairs",
            sd3_pairs,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
            "--validation_steps",
            100,
            *TRAIN,
            "--d_heads",
            "early,middle",
        ],
        num_processes=2,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["nimg"] for r in _stats(run) if "g_lpips" in r] == [8, 16]


def test_a_unet_student_for_sd3_pairs_is_one_line(sd3_pairs, tmp_path, capsys):
    code, err = run_script(
        "train_student.py", ["--pairs", sd3_pairs, "--output_dir", tmp_path / "x", "--student", "unet"], capsys
    )
    assert (
        code == 2
        and "student 'unet' is built for sd/sdxl teachers, but the pairs' teacher is sd3: use --student transformer"
        in _one_error_line(err)
    )


def test_onestep_speed_benchmark_runs_an_sd3_teacher():
    import os
    import subprocess
    import sys

    from conftest import ROOT

    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "onestep_speed.py"),
            "--family",
            "sd3",
            "--batch_size",
            "2",
            "--repeats",
            "1",
            "--steps",
            "2",
            "--max_sequence_length",
            "8",
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("speedup=") and float(last.split()[0].split("=")[1]) > 1, res.stdout


def test_sd3_digits_teacher_script_trains_saves_and_resumes(tmp_path, capsys):
    """The flow-matching digits teacher's trainer at a tiny size: checkpoints, a pipeline diffusers loads, resume."""
    out = tmp_path / "teacher"
    common = [
        "--config",
        "configs/digits/teacher_sd3.yaml",
        "--output_dir",
        out,
        "--batch_size",
        "2",
        "--num_layers",
        "1",
        "--checkpoint_every",
        "2",
        "--warmup_steps",
        "1",
    ]
    code, err = run_script("digits/train_teacher_sd3.py", [*common, "--steps", "3"], capsys)
    assert code == 0, err[-2000:]
    assert (out / "checkpoints" / "step-000002" / "model_index.json").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "pipeline", text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.dtype == torch.float32  # stored as fp16, loaded as fp32
    before = torch.load(out / "train_state.pt", weights_only=True)

    code, err = run_script("digits/train_teacher_sd3.py", [*common, "--steps", "4"], capsys)
    assert code == 0, err[-2000:]
    after = torch.load(out / "train_state.pt", weights_only=True)
    assert before["step"] == 3 and after["step"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(before["ema"], after["ema"]))
