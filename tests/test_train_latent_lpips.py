"""The latent LPIPS training recipe (Diffusion2GAN App.: classifier on latents, then 2AFC calibration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "distill" / "train_latent_lpips.py"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A labelled digits image set (datasets save_to_disk), a tiny random VAE, and a BAPPS-layout dir."""
    import datasets
    from diffusers import AutoencoderKL
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("latent_lpips")
    digits = load_digits()
    imgs = [
        Image.fromarray((x / 16 * 255).astype(np.uint8)).resize((16, 16), Image.NEAREST).convert("RGB")
        for x in digits.images[:320]
    ]
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(num_classes=10)})
    datasets.Dataset.from_dict({"img": imgs, "digit": digits.target[:320].tolist()}, features=features).save_to_disk(
        str(root / "digits")
    )
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.5,
    ).save_pretrained(root / "model" / "vae")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for sub in ("ref", "p0", "p1", "judge"):
            (root / "bapps" / split / sub).mkdir(parents=True)
        for i in range(n):
            ref = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
            near = np.clip(ref + rng.normal(0, 20, ref.shape), 0, 255).astype(np.uint8)
            far = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
            p1_near = i % 2 == 0
            Image.fromarray(ref).save(root / "bapps" / split / "ref" / f"{i:06d}.png")
            Image.fromarray(far if p1_near else near).save(root / "bapps" / split / "p0" / f"{i:06d}.png")
            Image.fromarray(near if p1_near else far).save(root / "bapps" / split / "p1" / f"{i:06d}.png")
            np.save(root / "bapps" / split / "judge" / f"{i:06d}.npy", np.array([1.0 if p1_near else 0.0]))
    return root


def run_script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def test_recipe_runs_both_stages_and_classifier_loss_falls(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = run_script(
        "--config", str(REPO / "configs" / "latent_lpips" / "tiny_test.yaml"),
        "--output_dir", str(out),
        "--dataset", str(tiny_data / "digits"),
        "--vae", str(tiny_data / "model"),
        "--bapps_dir", str(tiny_data / "bapps" / "train"),
        "--bapps_val_dir", str(tiny_data / "bapps" / "val"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    cls = [r["loss"] for r in rows if r["stage"] == "classifier"]
    assert len(cls) >= 4 and all(np.isfinite(cls))
    first, last = np.mean(cls[:2]), np.mean(cls[-2:])
    assert last < first - 0.2, f"classifier loss did not fall: {cls}"
    cal = [r for r in rows if r["stage"] == "calibrate"]
    assert any("val_2afc" in r and 0.0 <= r["val_2afc"] <= 1.0 for r in cal)
    cal_loss = [r["loss"] for r in cal if "loss" in r]
    assert len(cal_loss) >= 4 and all(np.isfinite(cal_loss))
    assert np.mean(cal_loss[-2:]) < np.mean(cal_loss[:2]), f"2AFC ranking loss did not fall: {cal_loss}"
    # Outputs: resolved config, safetensors weights that the loss loads, non-negative heads.
    assert (out / "config.yaml").is_file() and "stage: both" in (out / "config.yaml").read_text()
    assert (out / "latent_lpips" / "diffusion_pytorch_model.safetensors").is_file()
    from distill.losses import ELatentLPIPS

    loss = ELatentLPIPS.from_pretrained(out / "latent_lpips", augment="bg")
    assert loss.net.config.scaling_factor == 0.5  # the VAE's convention is recorded with the weights
    assert all((h.weight >= 0).all() for h in loss.net.heads)
    x = torch.randn(2, 4, 8, 8)
    d = loss(x, torch.randn(2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.all(d > 0) and torch.all(loss(x, x) < 1e-6)


def test_recipe_rejects_bad_config_in_one_line(tiny_data, tmp_path):
    res = run_script("--output_dir", str(tmp_path / "r"), "--stage", "calibrate", "--vae", str(tiny_data / "model"))
    assert res.returncode == 2
    assert (
        res.stderr.strip().startswith("error:")
        and "init_from" in res.stderr
        and len(res.stderr.strip().splitlines()) == 1
    )


def test_two_processes_follow_the_one_process_learning_rate_schedule(tiny_data, tmp_path):
    """accelerate steps a prepared scheduler once per process: the schedule must not run twice as fast on 2."""
    import math

    from conftest import accelerate_launch

    from distill.latent_lpips.training import lr_lambda

    out = tmp_path / "two"
    res = accelerate_launch("train_latent_lpips.py", [
        "--config", REPO / "configs" / "latent_lpips" / "tiny_test.yaml", "--output_dir", out,
        "--dataset", tiny_data / "digits",
        "--vae", tiny_data / "model", "--bapps_dir", tiny_data / "bapps" / "train", "--warmup_steps", 4,
    ], num_processes=2)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    # The 1-process schedule: LambdaLR stepped once per optimiser step.
    stage1, stage2 = lr_lambda(4, 30), lambda s: max(0.0, min(1.0, 2.0 * (1 - s / 24)))
    cls = [(r["stage_step"], r["lr"]) for r in rows if r["stage"] == "classifier"]
    cal = [(r["stage_step"], r["lr"]) for r in rows if r["stage"] == "calibrate" and "lr" in r]
    assert len(cls) >= 5 and len(cal) >= 4
    for step, lr in cls:
        assert math.isclose(lr, 0.003 * stage1(step), rel_tol=1e-6, abs_tol=1e-12), (step, lr)
    for step, lr in cal:
        assert math.isclose(lr, 0.001 * stage2(step), rel_tol=1e-6, abs_tol=1e-12), (step, lr)
    assert cal[-2][1] > 0  # on 2 processes the old schedule reached 0 half-way and went negative after


def test_negative_learning_rate_is_one_line(tiny_data, tmp_path):
    res = run_script(
        "--output_dir",
        str(tmp_path / "r"),
        "--vae",
        str(tiny_data / "model"),
        "--dataset",
        str(tiny_data / "digits"),
        "--lr",
        "-1e-3",
    )
    assert res.returncode == 2 and res.stderr.strip() == "error: lr must be positive, got -0.001"
    assert not (tmp_path / "r").exists()


def test_a_non_finite_loss_stops_in_one_line_as_in_the_other_trainers(tiny_data, tmp_path):
    """The shared loop's NaN stop: an absurd learning rate blows the classifier up; the run ends in one line naming
    the step and the term, exit 2, and the checkpoint written before it stays."""
    out = tmp_path / "nan"
    res = run_script(
        "--config",
        str(REPO / "configs" / "latent_lpips" / "tiny_test.yaml"),
        "--output_dir",
        str(out),
        "--dataset",
        str(tiny_data / "digits"),
        "--vae",
        str(tiny_data / "model"),
        "--stage",
        "classifier",
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--warmup_steps",
        "0",
        "--checkpointing_steps",
        "1",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    message = res.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite ") and "stopped; last good checkpoint: " in message, message
    assert any((out / "checkpoints").iterdir())


def test_resumes_from_the_latest_checkpoint_in_either_stage(tiny_data, tmp_path):
    """The same language as the other training scripts: output_dir, max_train_steps, checkpointing_steps,
    save_state checkpoints, --resume_from_checkpoint (latest by default, or a bare checkpoint name),
    a progress bar and trackers. A run killed in stage 2 continues there, with the learning-rate schedule where it
    was."""
    import math
    import shutil

    from distill.latent_lpips.training import lr_lambda

    out = tmp_path / "run"
    args = [
        "--config",
        str(REPO / "configs" / "latent_lpips" / "tiny_test.yaml"),
        "--output_dir",
        str(out),
        "--dataset",
        str(tiny_data / "digits"),
        "--vae",
        str(tiny_data / "model"),
        "--bapps_dir",
        str(tiny_data / "bapps" / "train"),
        "--checkpointing_steps",
        "20",
        "--checkpoints_total_limit",
        "null",
        "--report_to",
        "tensorboard",
    ]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # 30 classifier + 24 calibration steps: every 20 steps of the run, and at the end of each stage.
    assert names == ["checkpoint-20", "checkpoint-30", "checkpoint-40", "checkpoint-54"]
    position = json.loads((out / "checkpoints" / "checkpoint-40" / "trainer_state.json").read_text())
    assert {k: position[k] for k in ("stage", "step", "global_step")} == {
        "stage": "calibrate",
        "step": 10,
        "global_step": 40,
    }
    assert "classifier: 100%" in first.stderr and "calibrate: 100%" in first.stderr  # tqdm progress bars
    assert list((out / "train_latent_lpips").glob("events.out.tfevents.*"))  # tensorboard tracker
    before = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]

    # Killed after checkpoint-40 (stage 2, step 10): the same command resumes there.
    shutil.rmtree(out / "checkpoints" / "checkpoint-54")
    shutil.rmtree(out / "latent_lpips")
    again = run_script(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed calibrate from {out / 'checkpoints' / 'checkpoint-40'} at step 10" in again.stdout
    assert "resumed classifier" not in again.stdout and (out / "latent_lpips" / "config.json").is_file()
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["stage_step"], r["step"]) for r in rows] == [
        (r["stage"], r["stage_step"], r["step"]) for r in before
    ]
    assert [r["step"] for r in rows] == list(range(1, 55))  # no step twice or missing
    schedule = lambda s: max(0.0, min(1.0, 2.0 * (1 - s / 24)))  # noqa: E731
    for r in rows:
        if r["stage"] == "calibrate" and "lr" in r:
            assert math.isclose(r["lr"], 0.001 * schedule(r["stage_step"]), rel_tol=1e-6, abs_tol=1e-12), r
        if r["stage"] == "classifier":
            assert math.isclose(r["lr"], 0.003 * lr_lambda(1, 30)(r["stage_step"]), rel_tol=1e-6, abs_tol=1e-12), r

    # A finished run does nothing more; a bare checkpoint name resumes that checkpoint of output_dir.
    done = run_script(*args)
    assert done.returncode == 0 and "is finished" in done.stdout
    # Killed after the last checkpoint but before the network was saved: the rerun finishes it (no step again).
    shutil.rmtree(out / "latent_lpips")
    finish = run_script(*args)
    assert finish.returncode == 0 and "resumed calibrate" in finish.stdout and "at step 24" in finish.stdout, (
        finish.stderr[-2000:]
    )
    assert (out / "latent_lpips" / "config.json").is_file()
    assert [r["step"] for r in map(json.loads, (out / "stats.jsonl").read_text().splitlines())] == list(range(1, 55))
    # A checkpoint of a stage the command does not run is refused in one line, nothing changed.
    other = run_script(*args, "--stage", "classifier")
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0, other.stderr[-2000:]
    assert "is a checkpoint of stage calibrate, which stage classifier does not run" in other.stderr
    named = run_script(*args, "--resume_from_checkpoint", "checkpoint-20", "--output_dir", str(out))
    assert named.returncode == 0, named.stderr[-3000:]
    assert f"resumed classifier from {out / 'checkpoints' / 'checkpoint-20'} at step 20" in named.stdout
    missing = run_script(*args, "--resume_from_checkpoint", "checkpoint-7")
    assert missing.returncode == 2 and "checkpoint-7 is not in" in missing.stderr and "checkpoint-20" in missing.stderr


def test_old_and_diffusers_names_are_aliases(tiny_data, tmp_path):
    """--out_dir / --steps / --save_every (older names) and --train_batch_size, --dataloader_num_workers,
    --pretrained_model_name_or_path (diffusers') set the same keys, in a file too."""
    from distill.core.config import parse_config
    from distill.train_latent_lpips import TrainLatentLPIPSConfig

    cfg = parse_config(
        TrainLatentLPIPSConfig,
        [
            "--out_dir",
            "x",
            "--steps",
            "5",
            "--save_every",
            "2",
            "--train_batch_size",
            "3",
            "--dataloader_num_workers",
            "0",
            "--pretrained_model_name_or_path",
            "m",
        ],
    )
    assert (cfg.output_dir, cfg.max_train_steps, cfg.checkpointing_steps, cfg.batch_size, cfg.num_workers, cfg.vae) == (
        "x",
        5,
        2,
        3,
        0,
        "m",
    )
    old = parse_config(TrainLatentLPIPSConfig, ["--config", str(REPO / "configs" / "digits" / "latent_lpips.yaml")])
    assert old.max_train_steps == 300 and old.checkpointing_steps == 0


def test_recipe_runs_on_a_16_channel_sd3_vae(tiny_data, tiny_teacher_factory, tmp_path):
    """SD3's latent space: 16 channels, and a VAE shift as well as a scale. The network is built for the
    VAE's channels and records both factors, and ELatentLPIPS then takes the teacher's 16-channel latents."""
    out = tmp_path / "sd3"
    res = run_script(
        "--config", str(REPO / "configs" / "latent_lpips" / "tiny_test.yaml"), "--output_dir", str(out),
        "--dataset", str(tiny_data / "digits"), "--vae", str(tiny_teacher_factory("sd3")), "--stage", "classifier",
        "--max_train_steps", "12",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    cls = [r["loss"] for r in rows if r["stage"] == "classifier"]
    assert len(cls) >= 5 and all(np.isfinite(cls)) and np.mean(cls[-2:]) < np.mean(cls[:2]), cls
    from distill.losses import ELatentLPIPS

    loss = ELatentLPIPS.from_pretrained(out / "latent_lpips", augment="bg,cutout")
    cfg = loss.net.config
    assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (16, 1.5305, 0.0609)
    x = torch.randn(2, 16, 16, 16)
    d = loss(x, torch.randn(2, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    assert d.shape == (2,) and torch.all(d > 0) and torch.all(loss(x, x) < 1e-6)
