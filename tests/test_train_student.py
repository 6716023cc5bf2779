"""distill/train_student.py through its CLI (stage two): training and what a run writes, the config's defaults,
resume, the exported student under evaluation, bad input and faults. Its units are tested by room: the teacher-UNet D
and GAN terms in test_unet_discriminator.py, distill/distillation/ in test_distillation.py, the UNet student in
test_unet_student.py, the EMA in test_training_ema.py, the pipeline in test_pipeline_call.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch, run_script
from conftest import text_conditioning as _cond
from safetensors.torch import load_file

from students import OneStepGANPipeline
from teachers import load_teacher

TRAIN = [
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


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.rstrip().splitlines()[-1].split("\r")[-1]


def _spy_parts(monkeypatch) -> list:
    """The Parts every train_student run in this test builds (``setup.build_student`` wrapped)."""
    from distill.distillation import setup

    built, build = [], setup.build_student
    monkeypatch.setattr(setup, "build_student", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    return built


def _check_pictures(run: Path, *, teacher_size: tuple[int, int]) -> None:
    """Validation grids (the teacher's once, teacher over student every validation) and the run's curves."""
    from PIL import Image

    with Image.open(run / "samples" / "teacher.png") as teacher:
        assert teacher.size == teacher_size
    for png in sorted((run / "samples").glob("step-*.png")):
        with Image.open(png) as grid:
            assert grid.size == (teacher_size[0], 2 * teacher_size[1] + 4)  # teacher grid, 4 px gap, student grid
    with Image.open(run / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size[0] > 1000


def _check_card(folder: Path, pairs: Path, *, images_seen: int, steps: int) -> None:
    import hashlib

    import yaml
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert (
        meta["pipeline_tag"] == "text-to-image"
        and meta["library_name"] == "diffusers"
        and "diffusion2gan" in meta["tags"]
    )
    assert "base_model" not in meta and "license" not in meta  # a local random teacher: no hub id, no known licence
    front = (folder / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front) == meta
    sha = hashlib.sha256((pairs / "manifest.json").read_bytes()).hexdigest()
    assert f"| pairs manifest sha256 | `{sha}` |" in card.text and "24 pairs" in card.text
    assert f"| training images seen | {images_seen} ({steps} steps) |" in card.text
    assert "lpips_network: random" in card.text and "Not evaluated yet" in card.text and "CC BY-NC" not in card.text
    assert "![teacher (top) and one-step student (bottom)" in card.text and (folder / "samples.png").is_file()


# ------------------------------------------------------------------------------------------------
# Training: losses fall, every option runs, what a run writes (stats, grids, card, pipeline).


def test_training_lowers_heldout_lpips_and_exports_pipeline(pairs_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            run,
            "--max_train_steps",
            8,
            "--checkpointing_steps",
            4,
            "--validation_steps",
            8,
            *TRAIN,
        ],
        capsys,
    )
    assert code == 0, err
    val = [r for r in _stats(run) if "val_lpips" in r]
    assert [r["step"] for r in val] == [0, 8]
    assert val[-1]["val_lpips"] < val[0]["val_lpips"]
    train = [r for r in _stats(run) if "g_lpips" in r]
    assert len(train) == 8 and all(k in train[0] for k in ("g_adv", "d_real", "d_fake", "d_mismatch", "d_r1", "nimg"))
    assert (run / "samples" / "step-000008.png").is_file() and (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    assert all("d_real_logit" in r and "d_fake_logit" in r for r in train)  # for curves.png's D panel
    _check_pictures(run, teacher_size=(8 * 32, 32))  # 8 held-out pairs in one row
    _check_card(run / "pipeline", pairs_dir, images_seen=32, steps=8)
    _check_card(run / "checkpoints" / "checkpoint-4" / "pipeline", pairs_dir, images_seen=16, steps=4)
    # The exported pipeline reloads and reproduces the saved EMA student's outputs.
    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    again = OneStepGANPipeline.from_pretrained(run / "checkpoints" / "checkpoint-8" / "pipeline")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = pipe(["a cat", "a dog"], latents=z, output_type="latent").images
    torch.testing.assert_close(a, again(["a cat", "a dog"], latents=z, output_type="latent").images)
    assert a.shape == (2, 4, 16, 16) and a.dtype == torch.float32
    assert pipe(["a cat"], output_type="pt", generator=torch.Generator().manual_seed(0)).images.shape == (1, 3, 32, 32)
    assert pipe(["a cat"], num_images_per_prompt=2, output_type="np").images.shape == (2, 32, 32, 3)
    assert pipe("a cat", output_type="pil").images[0].size == (32, 32)


@pytest.mark.parametrize("student", ["gigagan", "stylegan_t"])
def test_gan_generator_students_train_and_export(pairs_dir, tmp_path, capsys, student):
    """GigaGAN / StyleGAN-T generators (from scratch) through the same CLI, loss phases and pipeline."""
    run = tmp_path / student
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            run,
            "--max_train_steps",
            6,
            "--checkpointing_steps",
            6,
            "--validation_steps",
            6,
            *TRAIN,
            "--student",
            student,
            "--student_size",
            "tiny",
            "--gan_start_step",
            3,
            "--learning_rate_g",
            "1e-3",
        ],
        capsys,
    )
    assert code == 0, err
    val = [r for r in _stats(run) if "val_lpips" in r]
    assert val[-1]["val_lpips"] < val[0]["val_lpips"]
    # Regression alone for steps 0-2 (logged as steps 1-3), then the GAN joins: D trains and G gets its term.
    steps = {r["step"]: r for r in _stats(run) if "g_lpips" in r}
    assert [s for s, r in sorted(steps.items()) if "d_real" in r and "g_adv" in r] == [4, 5, 6]
    assert "gan_start_step: 3" in (run / "config.yaml").read_text()
    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert type(pipe.student).__name__ == {"gigagan": "GigaGANGenerator", "stylegan_t": "StyleGANTGenerator"}[student]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    again = OneStepGANPipeline.from_pretrained(run / "checkpoints" / "checkpoint-6" / "pipeline")
    torch.testing.assert_close(
        pipe(["a cat", "a dog"], latents=z, output_type="latent").images,
        again(["a cat", "a dog"], latents=z, output_type="latent").images,
    )


@pytest.mark.parametrize("store_prompt_embeds", [False, True])
def test_sdxl_teacher_trains_and_exports(sdxl_teacher, prompt_file, tmp_path, capsys, store_prompt_embeds):
    """SDXL conditioning (two encoders, pooled embeddings, time ids) flows through G, D and the pipeline; stored with
    the pairs, it is the encoders' (time ids from the resolution)."""
    pairs = tmp_path / "pairs"
    code, err = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            sdxl_teacher,
            "--prompts",
            prompt_file,
            "--num_pairs",
            6,
            "--resolution",
            32,
            "--num_inference_steps",
            2,
            "--output_dir",
            pairs,
            "--store_prompt_embeds",
            store_prompt_embeds,
        ],
        capsys,
    )
    assert code == 0, err
    if store_prompt_embeds:
        from data_gen.pairs import load_pairs
        from distill.distillation.pair_data import stored_conditioning

        rows = load_pairs(pairs).with_format("torch")[:4]
        got = stored_conditioning(rows, resolution=32, device="cpu", dtype=torch.float32)
        want = _cond(load_teacher(str(sdxl_teacher)), rows["prompt"])
        for a, b in (
            (got.prompt_embeds, want.prompt_embeds),
            (got.pooled_prompt_embeds, want.pooled_prompt_embeds),
            (got.time_ids, want.time_ids),
        ):
            torch.testing.assert_close(a, b.half().float())
    run = tmp_path / "run"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs,
            "--output_dir",
            run,
            "--max_train_steps",
            1,
            "--checkpointing_steps",
            1,
            "--validation_steps",
            1,
            "--lpips_network",
            "random",
            "--batch_size",
            2,
            "--holdout",
            2,
            "--r1_interval",
            1,
            "--report_to",
            "none",
        ],
        capsys,
    )
    assert code == 0, err
    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert pipe(["a cat", "a dog"], output_type="latent").images.shape == (2, 4, 16, 16)


def test_stored_prompt_embeds_train_like_the_text_encoder(
    pairs_dir, sd15_teacher, prompt_file, tmp_path, capsys, monkeypatch
):
    """Pairs made with --store_prompt_embeds: the steps condition on the stored embeddings (the text encoder runs only
    for validation) and give the losses of encoding the prompts, to float16 rounding; the rows count as the same."""
    from distill.distillation.setup import Parts

    stored = tmp_path / "pairs-embeds"
    code, err = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            sd15_teacher,
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
            "--output_dir",
            stored,
            "--store_prompt_embeds",
        ],
        capsys,
    )
    assert code == 0, err
    encoded, encode = [], Parts.encode
    monkeypatch.setattr(Parts, "encode", lambda self, prompts: encoded.append(len(prompts)) or encode(self, prompts))
    runs = {}
    for name, pairs in (("encoded", pairs_dir), ("stored", stored)):
        encoded.clear()
        run = tmp_path / name
        code, err = run_script(
            "train_student.py",
            [
                "--pairs",
                pairs,
                "--output_dir",
                run,
                "--max_train_steps",
                3,
                "--checkpointing_steps",
                3,
                "--validation_steps",
                100,
                *TRAIN,
                "--gradient_accumulation_steps",
                2,
            ],
            capsys,
        )
        assert code == 0, err
        runs[name] = ([r for r in _stats(run) if "g_lpips" in r], list(encoded))
        split = json.loads((run / "pairs_split.json").read_text())
        runs[name] += (split["rows_fingerprint"],)
    (encoded_stats, encoded_calls, fp_a), (stored_stats, stored_calls, fp_b) = runs["encoded"], runs["stored"]
    assert encoded_calls.count(4) - stored_calls.count(4) == 3 * 2  # a batch of 4 per micro-step, 3 steps x 2
    assert fp_a == fp_b
    assert len(stored_stats) == len(encoded_stats) == 3
    for a, b in zip(encoded_stats, stored_stats):
        assert a.keys() == b.keys()
        for key in a.keys() - {"step_time"}:  # (the steps' wall-clock seconds differ)
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-12), key  # measured: 4e-6 at most


def test_validation_prompts_grid_trackers_and_diffusers_flag_names(pairs_dir, sd15_teacher, tmp_path, capsys):
    """--validation_prompts x seeds: the teacher's images solved once at the start, the student's every
    validation_steps, saved as PNG grids and logged to tensorboard; diffusers' flag names are accepted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "val"
    train = [a for a in TRAIN if a not in ("--report_to", "none")]
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
            1,
            *train,
            "--validation_prompts",
            "a red apple, on a table",
            "a photo of a cat",
            "--num_validation_seeds",
            3,
            "--pretrained_model_name_or_path",
            sd15_teacher,
            "--train_batch_size",
            4,
            "--tracker_project_name",
            "valrun",
            "--report_to",
            "tensorboard",
            "--gradient_checkpointing",
        ],
        capsys,
    )
    assert code == 0, err
    config = (run / "config.yaml").read_text()
    assert (
        "- a red apple, on a table" in config
        and "gradient_checkpointing: true" in config
        and "num_validation_seeds: 3" in config
    )
    _check_pictures(run, teacher_size=(3 * 32, 2 * 32))  # 2 prompts (rows) x 3 seeds (columns)
    assert sorted(p.name for p in (run / "samples").glob("step-*.png")) == [
        "step-000000.png",
        "step-000001.png",
        "step-000002.png",
    ]
    events = EventAccumulator(str(next((run / "valrun").glob("events.out.tfevents.*")))).Reload()
    assert set(events.Tags()["images"]) == {"validation/student", "validation/teacher"}
    assert [e.step for e in events.Images("validation/student")] == [0, 1, 2] and len(
        events.Images("validation/teacher")
    ) == 1
    # The teacher row is the teacher's own sampler on that noise: seed s is a pairs row's noise with seed == s.
    from PIL import Image

    from data_gen.noise import noise_for_seed
    from teachers import load_teacher, solve_ode

    teacher = load_teacher(str(sd15_teacher), scheduler="ddim")
    latents = solve_ode(
        teacher.pipe,
        prompts=["a photo of a cat"],
        noise=noise_for_seed(2, (4, 16, 16))[None],
        num_inference_steps=3,
        guidance_scale=7.5,
    )
    with torch.no_grad():
        decoded = teacher.pipe.vae.decode(latents / teacher.pipe.vae.config.scaling_factor).sample
    image = np.asarray(teacher.pipe.image_processor.postprocess(decoded, output_type="pil")[0])
    with Image.open(run / "samples" / "teacher.png") as grid:
        np.testing.assert_allclose(np.asarray(grid)[32:, 64:96].astype(float), image.astype(float), atol=2)


@pytest.mark.parametrize(
    "heads, config_file",
    [("before,skip,after,final", None), ("before,skip,after", "configs/accelerate/multi_gpu.yaml")],
)
def test_two_process_training_keeps_replicas_identical(pairs_dir, tmp_path, heads, config_file):
    """Also with a head set that leaves the UNet's output layers unread: DDP (no find_unused_parameters)
    raised "Expected to have finished reduction" at step 2 while they were still built. The second run is
    launched with the shipped multi-GPU DDP config (gloo on CPU here)."""
    run = tmp_path / "ddp"
    res = accelerate_launch(
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
            "--d_heads",
            heads,
        ],
        num_processes=2,
        config_file=config_file,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    stats = [r for r in _stats(run) if "g_lpips" in r]
    assert [r["nimg"] for r in stats] == [8, 16]  # 2 processes x batch 4 per step
    assert (run / "pipeline" / "model_index.json").is_file()


def test_mixed_precision_defaults_to_the_launchers_choice(pairs_dir, tmp_path, capsys, monkeypatch):
    """`accelerate launch --mixed_precision bf16` is no longer overridden by the script's default: the run uses
    bf16, prints it and saves it in config.yaml; an explicit --mixed_precision still wins."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    run = tmp_path / "bf16"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        str(ROOT / "distill" / "train_student.py"),
        *map(
            str,
            [
                "--pairs",
                pairs_dir,
                "--output_dir",
                run,
                "--max_train_steps",
                1,
                "--checkpointing_steps",
                1,
                "--validation_steps",
                100,
                *TRAIN,
            ],
        ),
    ]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "mixed precision: bf16" in res.stdout
    assert "mixed_precision: bf16" in (run / "config.yaml").read_text()

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what the launcher sets
    explicit = tmp_path / "explicit"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            explicit,
            "--max_train_steps",
            1,
            "--checkpointing_steps",
            1,
            "--validation_steps",
            100,
            *TRAIN,
            "--mixed_precision",
            "no",
        ],
        capsys,
    )
    assert code == 0, err
    assert "mixed_precision: 'no'" in (explicit / "config.yaml").read_text()


def test_memory_and_precision_options_run(pairs_dir, tmp_path, capsys, monkeypatch):
    """Gradient accumulation, bf16 autocast, gradient checkpointing (student and D, R1 included), LoRA on the D
    backbone, MSE regression."""
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
            100,
            *TRAIN,
            "--gradient_accumulation_steps",
            2,
            "--mixed_precision",
            "bf16",
            "--gradient_checkpointing",
            "true",
            "--d_gradient_checkpointing",
            "true",
            "--d_lora_rank",
            4,
            "--regression",
            "mse",
        ],
        capsys,
    )
    assert code == 0, err
    assert built[0].student.is_gradient_checkpointing and built[0].discriminator.unet.is_gradient_checkpointing
    stats = [r for r in _stats(run) if "g_mse" in r]
    assert [r["nimg"] for r in stats] == [8, 16] and all("d_real" in r for r in stats)


def test_teacher_unet_is_released_after_setup(pairs_dir, tmp_path, capsys, monkeypatch):
    """The student and D are copies of the teacher's UNet; the original is dropped before training starts (the
    validation prompts' teacher images are solved first), so it holds no device memory during the steps."""
    import gc
    import weakref

    from distill.distillation import setup
    from distill.training.loop import TrainLoop

    built, refs, alive = [], [], []
    build, end_step = setup.build_student, TrainLoop.end_step

    def build_and_watch(*args, **kwargs):
        built.append(build(*args, **kwargs))
        refs.append(weakref.ref(built[-1].teacher.pipe.unet))
        return built[-1]

    def count_alive(self, logs, **kwargs):
        gc.collect()
        alive.append(refs[0]() is not None)
        return end_step(self, logs, **kwargs)

    monkeypatch.setattr(setup, "build_student", build_and_watch)
    monkeypatch.setattr(TrainLoop, "end_step", count_alive)
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
            2,
            "--validation_steps",
            2,
            *TRAIN,
            "--validation_prompts",
            "a cat",
            "--num_validation_seeds",
            1,
        ],
        capsys,
    )
    assert code == 0, err
    assert alive == [False, False] and built[0].teacher.pipe.unet is None
    assert built[0].student is not None and built[0].discriminator is not None


@pytest.mark.parametrize("frozen_dtype", ["bf16", "fp16"])
def test_frozen_text_encoder_and_vae_in_half_precision(pairs_dir, tmp_path, capsys, monkeypatch, frozen_dtype):
    """frozen_dtype holds the text encoder and VAE in bf16 / fp16 (after the teacher solved the validation prompts in
    fp32); the conditioning reaches the student and D in fp32; validation, export and the pipeline work."""
    from distill.distillation import setup

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[frozen_dtype]
    built = _spy_parts(monkeypatch)
    encoded = []
    encode = setup.Parts.encode
    monkeypatch.setattr(
        setup.Parts, "encode", lambda self, prompts: encoded.append(encode(self, prompts)) or encoded[-1]
    )
    run = tmp_path / "frozen"
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
            "--frozen_dtype",
            frozen_dtype,
            "--validation_prompts",
            "a cat",
            "--num_validation_seeds",
            1,
        ],
        capsys,
    )
    assert code == 0, err
    pipe = built[0].teacher.pipe
    assert pipe.vae.dtype == pipe.text_encoder.dtype == dtype
    assert encoded and all(c.prompt_embeds.dtype == torch.float32 for c in encoded)
    assert all(np.isfinite(r["g_lpips"]) for r in _stats(run) if "g_lpips" in r)
    exported = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert torch.isfinite(
        exported(["a cat"], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    ).all()


def test_r1_weight_does_not_depend_on_gradient_accumulation(pairs_dir, tmp_path, capsys, monkeypatch):
    """R1 runs once per step (micro-batch 0): its backward weight stays r1_gamma with M micro-batches,
    while the batch-mean terms are divided by M."""
    import accelerate

    from distill.training.gan_step import GANStep

    events = []
    terms_fn, backward = GANStep.d_terms, accelerate.Accelerator.backward

    def spy_terms(self, *args, **kwargs):
        terms = terms_fn(self, *args, **kwargs)
        events.append(("terms", {k: v.item() for k, v in terms.items() if not k.endswith("_logit")}))
        return terms

    def spy_backward(self, loss, **kwargs):
        events.append(("backward", loss.item()))
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(GANStep, "d_terms", spy_terms)
    monkeypatch.setattr(accelerate.Accelerator, "backward", spy_backward)
    run = tmp_path / "accum"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            run,
            "--max_train_steps",
            1,
            "--checkpointing_steps",
            1,
            "--validation_steps",
            100,
            *TRAIN,
            "--gradient_accumulation_steps",
            2,
            "--r1_gamma",
            "1e5",
        ],
        capsys,
    )
    assert code == 0, err
    d_steps = [(events[i][1], events[i + 1][1]) for i in range(len(events) - 1) if events[i][0] == "terms"]
    assert len(d_steps) == 2 and "d_r1" in d_steps[0][0] and "d_r1" not in d_steps[1][0]
    for terms, loss in d_steps:  # R1's share of what was backpropagated: all of it, not half
        r1_share = loss - sum(v for k, v in terms.items() if k != "d_r1") / 2
        assert r1_share == pytest.approx(terms.get("d_r1", 0.0), rel=1e-3, abs=1e-6)
    assert d_steps[0][0]["d_r1"] > 1e-3  # large enough to tell r1_gamma from r1_gamma / 2
    logged = [r for r in _stats(run) if "d_r1" in r][0]
    assert logged["d_r1"] == pytest.approx(d_steps[0][0]["d_r1"], rel=1e-5)  # logged at its full weight too


# ------------------------------------------------------------------------------------------------
# The config's defaults: per student, at the paper's scale.


def test_student_defaults_fill_only_unset_keys():
    """``--student gigagan`` with no other flag gets the GAN students' learning rate and GAN warm-up,
    not the UNet's; explicit values win; the resolved values are what the run saves."""
    from distill.core.config import parse_config
    from distill.train_student import StudentConfig, check

    def resolved(*argv):
        cfg = parse_config(StudentConfig, ["--pairs", "p", *argv])
        check(cfg)
        return cfg

    unet, gigagan = resolved(), resolved("--student", "gigagan")
    assert (unet.learning_rate_g, unet.gan_start_step) == (1e-5, 0)
    assert gigagan.learning_rate_g > 100 * unet.learning_rate_g and gigagan.gan_start_step > 0
    explicit = resolved("--student", "stylegan_t", "--learning_rate_g", "2e-4", "--gan_start_step", "0")
    assert (explicit.learning_rate_g, explicit.gan_start_step) == (2e-4, 0)


@pytest.mark.parametrize("config", ["sd15_unet", "sdxl_unet", None])
def test_ema_defaults_average_over_many_steps_at_paper_scale(config):
    """At the paper's 64 GPUs the EMA keeps >= 99 % per step at the end of the run, and the ramp-up
    keeps its half-life within 5 % of the images seen (0.5 kimg gave beta 0.24 at batch 1024)."""
    from pathlib import Path

    from distill.core.config import parse_config
    from distill.train_student import StudentConfig
    from distill.training.ema import EMA

    argv = (
        ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "student" / f"{config}.yaml")]
        if config
        else []
    )
    cfg = parse_config(StudentConfig, argv)
    batch = cfg.batch_size * cfg.gradient_accumulation_steps * 64 if config else 1024  # images per step
    ema = EMA(torch.nn.Linear(1, 1), half_life_kimg=cfg.ema_half_life_kimg, rampup=cfg.ema_rampup)
    nimg = cfg.max_train_steps * batch
    half_life = ema.half_life_images(nimg)
    assert 0.5 ** (batch / half_life) >= 0.99
    assert half_life <= 0.05 * nimg


# ------------------------------------------------------------------------------------------------
# Resume: the same command continues identically; a changed run, crafted or damaged checkpoints refused.


def test_resume_continues_identically(pairs_dir, tmp_path, capsys):
    common = ["--pairs", pairs_dir, "--checkpointing_steps", 2, "--validation_steps", 100, *TRAIN]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_script("train_student.py", [*common, "--output_dir", straight, "--max_train_steps", 4], capsys)[0] == 0
    # Interrupted after step 2, then the same command (with the final step count) resumes from the checkpoint;
    # DataLoader workers read the pairs there (the same batches as read in-process).
    common += ["--num_workers", 2]
    assert run_script("train_student.py", [*common, "--output_dir", resumed, "--max_train_steps", 2], capsys)[0] == 0
    # A kill during a save leaves only a temporary directory behind: it is neither resumed from nor kept.
    stale = resumed / "checkpoints" / ".tmp-checkpoint-4"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    code, err = run_script("train_student.py", [*common, "--output_dir", resumed, "--max_train_steps", 4], capsys)
    assert code == 0, err
    a = load_file(straight / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["step"] for r in _stats(resumed) if "g_lpips" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("ema_device, ema_dtype", [("cpu", "fp32"), ("cpu", "bf16")])
def test_ema_on_cpu_and_in_bf16_resumes_identically_and_exports(pairs_dir, tmp_path, capsys, ema_device, ema_dtype):
    """The EMA copy kept on the CPU (and in bf16): its state, the checkpoint's pipeline and the resumed run match a
    straight run bit for bit; the exported pipeline holds the EMA weights in that dtype and runs."""
    common = [
        "--pairs",
        pairs_dir,
        "--checkpointing_steps",
        2,
        "--validation_steps",
        2,
        *TRAIN,
        "--ema_half_life_kimg",
        "0.004",
        "--ema_device",
        ema_device,
        "--ema_dtype",
        ema_dtype,
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_script("train_student.py", [*common, "--output_dir", straight, "--max_train_steps", 4], capsys)[0] == 0
    assert run_script("train_student.py", [*common, "--output_dir", resumed, "--max_train_steps", 2], capsys)[0] == 0
    code, err = run_script("train_student.py", [*common, "--output_dir", resumed, "--max_train_steps", 4], capsys)
    assert code == 0, err
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ema_dtype]
    a, b = (run / "checkpoints" / "checkpoint-4" for run in (straight, resumed))
    ema_a, ema_b = (load_file(c / "ema.safetensors") for c in (a, b))  # the EMA as safetensors, no pickle
    student = load_file(a / "model.safetensors")
    assert ema_a.keys() == ema_b.keys() and {v.dtype for v in ema_a.values()} == {dtype}
    assert any(not torch.equal(ema_a[k].float(), student[k].float()) for k in student)  # an average, not a copy
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=0, atol=0)
    for name in ("model.safetensors", "pipeline/student/diffusion_pytorch_model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert all(torch.equal(x[k], y[k]) for k in x)
    exported = load_file(straight / "pipeline" / "student" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in exported.values()} == {dtype} and all(torch.equal(exported[k], ema_a[k]) for k in ema_a)
    pipe = OneStepGANPipeline.from_pretrained(straight / "pipeline")
    assert torch.isfinite(
        pipe(["a cat"], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ).all()


def test_resume_from_a_named_checkpoint(pairs_dir, tmp_path, capsys):
    """--resume_from_checkpoint takes latest (the default), none, a bare checkpoint name inside output_dir, or a
    path."""
    run = tmp_path / "named"
    common = ["--pairs", pairs_dir, "--output_dir", run, "--checkpointing_steps", 1, "--validation_steps", 100, *TRAIN]
    assert run_script("train_student.py", [*common, "--max_train_steps", 2], capsys)[0] == 0
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run_script(
            "train_student.py", [*common, "--max_train_steps", 3, "--resume_from_checkpoint", "checkpoint-1"], capsys
        )
    assert code == 0, err
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-1'} at step 1" in out.getvalue()
    assert [r["step"] for r in _stats(run) if "g_lpips" in r] == [1, 2, 3]
    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run_script(
            "train_student.py", [*common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"], capsys
        )
    assert code == 0, err
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-3'} at step 3" in out.getvalue()
    code, err = run_script(
        "train_student.py", [*common, "--max_train_steps", 4, "--resume_from_checkpoint", "checkpoint-9"], capsys
    )
    line = _last_line(err)
    assert code == 2 and "checkpoint-9 is not in" in line and "checkpoint-4" in line, err[-2000:]


@pytest.fixture(scope="module")
def finished_run(pairs_dir, tmp_path_factory):
    """A 2-step run with checkpoint-1 and checkpoint-2 (tests copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
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
            1,
            "--validation_steps",
            100,
            *TRAIN,
        ],
    )
    assert code == 0, err
    return run


def _copy_run(finished_run, pairs_dir, tmp_path) -> tuple[Path, list]:
    """A copy of the finished run and the arguments that resume it for one more step."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run, [
        "--pairs",
        pairs_dir,
        "--output_dir",
        run,
        "--max_train_steps",
        3,
        "--checkpointing_steps",
        1,
        "--validation_steps",
        100,
        *TRAIN,
    ]


class _WritesAFile:
    """A pickle that creates ``path`` when it is loaded: what a crafted checkpoint file would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_changed_run_and_records_the_allowed_changes(pairs_dir, finished_run, tmp_path, capsys):
    """Batch, seed, learning rate, regression, GAN weight define the run: a resume that changes them is one line and
    writes nothing; a longer run (max_train_steps) and other cadences are allowed and recorded in
    config_changes.jsonl."""
    run, args = _copy_run(finished_run, pairs_dir, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed = [
        "--batch_size",
        2,
        "--seed",
        7,
        "--learning_rate_g",
        "3e-4",
        "--regression",
        "mse",
        "--gan_weight",
        "0.5",
    ]
    code, err = run_script("train_student.py", [*args, *changed], capsys)
    line = _last_line(err)
    assert code == 2 and line.startswith(f"error: {run} holds a run made with another config ("), line
    for key in (
        "batch_size: 4 -> 2",
        "seed: 0 -> 7",
        "learning_rate_g: 0.0001 -> 0.0003",
        "regression: 'elatentlpips' -> 'mse'",
        "gan_weight: 0.1 -> 0.5",
    ):
        assert key in line, (key, line)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.yaml not rewritten
    code, err = run_script(
        "train_student.py", [*args, "--validation_steps", 50, "--checkpoints_total_limit", 5], capsys
    )
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 2 and records[0]["changes"] == {
        "output_dir": [str(finished_run), str(run)],  # the copy: a moved folder resumes too
        "max_train_steps": [2, 3],
        "checkpoints_total_limit": [3, 5],
        "validation_steps": [100, 50],
    }
    assert "max_train_steps: 3" in (run / "config.yaml").read_text()


def test_resuming_with_another_student_or_other_pairs_is_refused(
    pairs_dir, sd15_teacher, prompt_file, tmp_path, capsys
):
    run = tmp_path / "run"
    args = [
        "--pairs",
        pairs_dir,
        "--output_dir",
        run,
        "--max_train_steps",
        1,
        "--checkpointing_steps",
        1,
        "--validation_steps",
        100,
        *TRAIN,
    ]
    assert run_script("train_student.py", args, capsys)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = run_script(
        "train_student.py", [*args, "--max_train_steps", 2, "--student", "gigagan", "--student_size", "tiny"], capsys
    )
    assert code == 2 and "holds a run made with another config (student: 'unet' -> 'gigagan'" in _last_line(err)
    other = tmp_path / "other-pairs"
    assert (
        run_script(
            "generate_pairs.py",
            [
                "--teacher",
                sd15_teacher,
                "--prompts",
                prompt_file,
                "--num_pairs",
                24,
                "--seed",
                1,
                "--resolution",
                32,
                "--num_inference_steps",
                3,
                "--output_dir",
                other,
            ],
            capsys,
        )[0]
        == 0
    )
    code, err = run_script("train_student.py", [*args, "--max_train_steps", 2, "--pairs", other], capsys)
    assert code == 2 and "another config (pairs:" in _last_line(err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("target", ["custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_resume_runs_no_code_from_a_crafted_checkpoint_file(pairs_dir, finished_run, tmp_path, capsys, target):
    """The loop's states are safetensors / JSON; every file of a checkpoint is checked against the record written with
    it before accelerate opens any, so a pickle put there (or one swapped for accelerate's own) is refused in one
    line."""
    run, args = _copy_run(finished_run, pairs_dir, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save(_WritesAFile(marker), run / "checkpoints" / "checkpoint-2" / target)
    code, err = run_script("train_student.py", args, capsys)
    assert code == 2 and not marker.exists(), err[-3000:]
    line = _last_line(err)
    assert f"checkpoint {run / 'checkpoints' / 'checkpoint-2'}" in line and target in line, line
    assert "--resume_from_checkpoint checkpoint-1" in line
    saved = sorted(p.name for p in (run / "checkpoints" / "checkpoint-1").iterdir())
    assert not [name for name in saved if name.startswith("custom_checkpoint")], (
        saved
    )  # the loop's states are no pickles


def test_a_corrupt_checkpoint_is_one_line_naming_it_and_the_fix(pairs_dir, finished_run, tmp_path, capsys):
    run, args = _copy_run(finished_run, pairs_dir, tmp_path)
    weights = run / "checkpoints" / "checkpoint-2" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # cut short, as by a full disk or a copy that stopped
    code, err = run_script("train_student.py", args, capsys)
    line = _last_line(err)
    assert code == 2 and f"checkpoint {weights.parent} is damaged (model.safetensors: {len(data) // 2} bytes" in line, (
        line
    )
    assert "--resume_from_checkpoint checkpoint-1" in line and f"rm -r {weights.parent}" in line
    weights.write_bytes(b"\xff" * len(data))  # the recorded size, but not safetensors any more
    code, err = run_script("train_student.py", args, capsys)
    line = _last_line(err)
    assert code == 2 and f"checkpoint {weights.parent} cannot be loaded (SafetensorError" in line, line
    code, err = run_script("train_student.py", [*args, "--resume_from_checkpoint", "checkpoint-1"], capsys)  # the fix
    assert code == 0, err[-3000:]
    assert [r["step"] for r in _stats(run) if "g_lpips" in r] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# The exported student: its held-out split, evaluation, the model card's numbers.


def test_evaluation_refuses_fidelity_rows_the_student_trained_on(pairs_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        run_script(
            "train_student.py",
            [
                "--pairs",
                pairs_dir,
                "--output_dir",
                run,
                "--max_train_steps",
                1,
                "--checkpointing_steps",
                1,
                "--validation_steps",
                100,
                *TRAIN,
            ],
            capsys,
        )[0]
        == 0
    )
    split = json.loads((run / "pipeline" / "pairs_split.json").read_text())
    assert split["train_indices"] == [0, 16] and split["heldout_indices"] == [16, 24]  # 24 pairs, holdout 8
    assert json.loads((run / "pairs_split.json").read_text()) == split
    common = [
        "--pipeline",
        run / "pipeline",
        "--pairs",
        pairs_dir,
        "--metrics",
        "fidelity",
        "--elatentlpips",
        "random-tiny",
        "--pixel_lpips",
        "random-tiny",
        "--batch_size",
        8,
        "--output_dir",
        tmp_path / "eval",
    ]
    code, err = run_script("evaluate.py", [*common, "--fidelity_start", -10], capsys)
    assert code == 2
    line = err.rstrip().splitlines()[-1]
    assert "include 2 pairs the student trained on" in line and "set fidelity_start to -8" in line
    code, err = run_script("evaluate.py", [*common, "--fidelity_start", -8], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["details"]["fidelity"]["indices"] == [16, 23]

    # The exported student's model card now shows the held-out numbers and how they were measured.
    from huggingface_hub import ModelCard

    values = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    card = ModelCard.load(run / "pipeline" / "README.md")
    assert f"| e_latent_lpips | {values['e_latent_lpips']:.6g} |" in card.text and "Not evaluated yet" not in card.text
    assert "fidelity on held-out pairs" in card.text and "the numbers mean nothing" in card.text
    assert card.data.to_dict()["pipeline_tag"] == "text-to-image"
    # Evaluating again (the card changed, the student did not) reuses the cached evaluation as before.
    code, err = run_script("evaluate.py", [*common, "--fidelity_start", -8], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------------
# Bad input and faults: user mistakes end in one line before anything heavy, faults keep what was saved.


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pairs", "/no/such/pairs"], "is not a pairs directory"),
        (["--pairs", "PAIRS", "--student", "biggan"], "unknown student 'biggan'"),
        (["--pairs", "PAIRS", "--student", "gigagan", "--student_size", "huge"], "unknown student_size 'huge'"),
        (
            [
                "--pairs",
                "PAIRS",
                "--student",
                "gigagan",
                "--student_size",
                "tiny",
                "--gradient_checkpointing",
                "true",
                "--lpips_network",
                "random",
            ],
            "does not support gradient_checkpointing",
        ),
        (["--pairs", "PAIRS", "--regression", "l2"], "unknown regression 'l2'"),
    ],
)
def test_bad_input(pairs_dir, tmp_path, capsys, args, message):
    args = [str(pairs_dir) if a == "PAIRS" else a for a in args]
    code, err = run_script("train_student.py", [*args, "--output_dir", tmp_path / "x"], capsys)
    assert code == 2 and message in err.rstrip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--holdout=-5"], "holdout must not be negative, got -5"),
        (["--student_timestep", 5000], "student_timestep must be in [0, 999]"),
        (["--mix_fraction", 2], "mix_fraction must be in [0.0, 1.0], got 2.0"),
        (["--gan_weight=-1"], "gan_weight must not be negative, got -1.0"),
        (
            ["--learning_rate_g", "-1e-4"],
            "learning_rate_g must be positive, got -0.0001",
        ),  # a negative value, not a flag
        (["--learning_rate_d", "-0.5"], "learning_rate_d must be positive, got -0.5"),
        (
            ["--learning_rate_g", "nan"],
            "learning_rate_g must be a finite number, got nan",
        ),  # named before anything loads
        (["--gan_weight", "inf"], "gan_weight must be a finite number, got inf"),
    ],
)
def test_out_of_range_values_are_one_line_before_the_teacher_loads(
    pairs_dir, tmp_path, capsys, monkeypatch, args, message
):
    import distill.distillation.setup as setup

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not load before the config is checked")

    monkeypatch.setattr(setup, "load_teacher", no_teacher)
    code, err = run_script(
        "train_student.py", ["--pairs", pairs_dir, "--output_dir", tmp_path / "x", *TRAIN, *args], capsys
    )
    assert code == 2 and message in _last_line(err)
    assert not (tmp_path / "x").exists()


def test_adam_is_the_default_and_adam8bit_without_bitsandbytes_is_one_line(pairs_dir, tmp_path, capsys, monkeypatch):
    import sys

    from distill.core.config import parse_config
    from distill.train_student import StudentConfig

    assert parse_config(StudentConfig, []).optimizer == "adam"
    built = _spy_parts(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (import fails), whatever this machine has
    code, err = run_script(
        "train_student.py", ["--pairs", pairs_dir, "--output_dir", tmp_path / "x", "--optimizer", "adam8bit"], capsys
    )
    assert code == 2 and "pip install bitsandbytes" in _last_line(err) and not built  # before the teacher loads


def test_another_teacher_than_the_pairs_is_refused(pairs_dir, sd15_teacher, tmp_path, capsys):
    import shutil

    from diffusers import UNet2DConditionModel

    other = tmp_path / "other-teacher"
    shutil.copytree(sd15_teacher, other)
    unet = UNet2DConditionModel.from_pretrained(other / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(other / "unet")
    args = ["--pairs", pairs_dir, "--max_train_steps", 1, "--checkpointing_steps", 1, "--validation_steps", 100, *TRAIN]
    code, err = run_script(
        "train_student.py", [*args, "--teacher", other, "--output_dir", tmp_path / "refused"], capsys
    )
    assert code == 2
    line = _last_line(err)
    assert "is not the teacher that made the pairs" in line and "unet/diffusion_pytorch_model.safetensors" in line
    assert "--allow_teacher_mismatch" in line and not (tmp_path / "refused").exists()
    # The same teacher by another spelling is accepted; a deliberate mismatch runs with the bare flag.
    assert (
        run_script(
            "train_student.py",
            [*args, "--teacher", f"{sd15_teacher}/../{sd15_teacher.name}", "--output_dir", tmp_path / "same"],
            capsys,
        )[0]
        == 0
    )
    code, err = run_script(
        "train_student.py",
        [*args, "--teacher", other, "--allow_teacher_mismatch", "--output_dir", tmp_path / "cross"],
        capsys,
    )
    assert code == 0, err


def test_nan_loss_stops_with_one_line(pairs_dir, tmp_path, capsys):
    run = tmp_path / "nan"
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs_dir,
            "--output_dir",
            run,
            "--max_train_steps",
            6,
            "--checkpointing_steps",
            2,
            "--validation_steps",
            100,
            *TRAIN,
            "--learning_rate_g",
            "1e30",
            "--max_grad_norm",
            0,
            "--gan_weight",
            0,
        ],
        capsys,
    )
    assert code == 2
    last = err.rstrip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("error: non-finite loss at step") and "g_lpips" in last, err[-2000:]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(pairs_dir, tmp_path, capsys, monkeypatch):
    import errno

    from accelerate import Accelerator

    run = tmp_path / "full"
    args = [
        "--pairs",
        pairs_dir,
        "--output_dir",
        run,
        "--max_train_steps",
        4,
        "--checkpointing_steps",
        2,
        "--validation_steps",
        100,
        *TRAIN,
    ]
    real_save = Accelerator.save_state
    room_for = []  # checkpoints that still fit

    def save_until_full(self, output_dir=None, **kwargs):
        if Path(output_dir).name.removeprefix(".tmp-") in room_for:
            return real_save(self, output_dir, **kwargs)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"\0" * 1000)  # what fitted before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", save_until_full)
    code, err = run_script("train_student.py", args, capsys)  # full at the first checkpoint: the size is estimated
    assert code == 2 and "need ≈ " in _last_line(err) and "no checkpoint was saved yet" in _last_line(err)
    assert list((run / "checkpoints").iterdir()) == []
    room_for.append("checkpoint-2")
    code, err = run_script("train_student.py", args, capsys)
    assert code == 2
    line = _last_line(err)
    assert line.startswith(f"error: no space left in {run / 'checkpoints'}, need ≈ ") and " MB" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-2"]  # partial one deleted
    kept = load_file(run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    code, err = run_script("train_student.py", args, capsys)  # space freed: the same command resumes
    assert code == 0, err
    assert [r["step"] for r in _stats(run) if "g_lpips" in r] == [1, 2, 3, 4]  # steps 3-4 of the failed run dropped
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert load_file(run / "checkpoints" / "checkpoint-2" / "model.safetensors").keys() == kept.keys()


def test_ctrl_c_is_one_line_and_keeps_the_last_checkpoint(pairs_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, ctrl_c_able

    run = tmp_path / "ctrlc"
    cmd = [
        sys.executable,
        str(ROOT / "distill" / "train_student.py"),
        "--pairs",
        str(pairs_dir),
        "--output_dir",
        str(run),
        "--max_train_steps",
        "1000",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "1000",
        *map(str, TRAIN),
    ]
    proc = subprocess.Popen(
        cmd,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_able,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "checkpoint-4").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert _last_line(err).startswith("interrupted (Ctrl-C)")
    finished = sorted((run / "checkpoints").iterdir())
    assert finished and all(p.name.startswith("checkpoint-") for p in finished)  # no partial .tmp-checkpoint left
    for ckpt in finished:
        load_file(ckpt / "model.safetensors")
    assert not (run / ".lock").exists()
