"""A reduced quickstart (fewer pairs, steps and samples) through distill/digits/quickstart.sh, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _quickstart(
    out: Path, *args: str, steps: int, student_args: str, num_samples: int, family: str | None = None
) -> subprocess.CompletedProcess:
    """distill/digits/quickstart.sh [--family FAMILY] OUT [STUDENT_CONFIG], reduced: 96 pairs solved in ``steps`` steps,
    a few
    training steps."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="2",
        QUICKSTART_PAIRS_ARGS=f"--num_pairs 96 --shard_size 48 --batch_size 48 --num_inference_steps {steps}",
        QUICKSTART_STUDENT_ARGS=student_args,
        QUICKSTART_EVAL_ARGS=f"--num_samples {num_samples} --batch_size 20 --num_inference_steps {steps} "
        "--latency_batch_size 8"
        " --latency_iterations 1 --latency_warmup 1 --latency_min_seconds 0 --fidelity_start -32",
    )
    family_args = ["--family", family] if family else []
    return subprocess.run(
        ["bash", str(ROOT / "distill" / "digits" / "quickstart.sh"), *family_args, str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_reduced_quickstart(tmp_path):
    out = tmp_path / "qs"
    run = _quickstart(
        out,
        steps=10,
        num_samples=40,
        student_args="--max_train_steps 6 --batch_size 16 --holdout 32 --checkpointing_steps 6 --validation_steps 6"
        " --learning_rate_g 1e-4 --ema_half_life_kimg 0",
    )
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for who in ("teacher", "student"):
        assert 0 <= metrics[who]["prompt_accuracy"] <= 1 and metrics[who]["fid"] > 0
    # Headline: FID to the teacher's other-seed samples, and its floor (the teacher scored the same way).
    assert metrics["student"]["fid_to_teacher"] > 0 and metrics["teacher"]["fid_to_teacher_floor"] > 0
    assert "fid_to_teacher" not in metrics["teacher"] and metrics["student_kind"] == "unet"
    assert "FID to the teacher's samples" in (out / "report.txt").read_text().splitlines()[1]
    assert metrics["speedup"] > 1
    # Fidelity on the held-out pairs: the teacher reproduces its own pairs; the student does not (yet).
    assert metrics["teacher"]["e_latent_lpips"] < 1e-3 and metrics["student"]["e_latent_lpips"] > 1e-3
    assert metrics["student"]["psnr"] < metrics["teacher"]["psnr"]
    assert (out / "teacher_vs_student.png").is_file() and "prompt accuracy" in (out / "report.txt").read_text()
    report = (out / "report.md").read_text()  # the pictures: teacher row vs student row, and the run's curves
    assert (
        "](teacher_vs_student.png)" in report
        and "](student/curves.png)" in report
        and (out / "student" / "curves.png").is_file()
    )
    assert (out / "student" / "pipeline" / "README.md").is_file() and (
        out / "student" / "pipeline" / "samples.png"
    ).is_file()
    # It says where the student lands, and how long each stage took, for the next run to say at its start.
    assert (
        f"the student lands in {out / 'student' / 'pipeline'}" in run.stdout and "expected about 13 min" in run.stdout
    )
    times = [line.split("\t") for line in (out / "stage_times.tsv").read_text().splitlines()]
    assert [t[0] for t in times] == [
        "reference",
        "pairs",
        "teacher-reference",
        "training-student",
        "eval-teacher",
        "eval-student",
    ]
    assert all(int(t[1]) >= 0 for t in times)
    config = (out / "student" / "config.yaml").read_text()
    assert "checkpointing_steps: 6" in config  # the test's override wins over the script's 20

    # The trained student beats a random-init one on fidelity to the teacher (held-out pairs).
    from data_gen.pairs import load_pairs
    from distill.losses import ELatentLPIPS
    from students import OneStepGANPipeline, UNetStudent

    pipe = OneStepGANPipeline.from_pretrained(out / "student" / "pipeline")
    rows = load_pairs(out / "pairs").with_format("torch")[-32:]
    cond = pipe.encode_prompt(list(rows["prompt"]), (32, 32))
    noise, target = rows["noise"].float(), rows["target"].float()
    loss = ELatentLPIPS.from_pretrained(ROOT / "teachers/assets/digits-latent-lpips", augment=None, l1_weight=0.0)
    torch.manual_seed(0)
    random_student = UNetStudent(**{k: v for k, v in pipe.student.config.items() if not k.startswith("_")})
    with torch.no_grad():
        trained = loss(pipe.student(noise, cond.prompt_embeds), target).mean()
        untrained = loss(random_student(noise, cond.prompt_embeds), target).mean()
    assert trained < untrained


@pytest.mark.slow  # two reduced quickstarts: ~4 min on 2 idle cores
def test_reduced_quickstart_with_the_gan_students(tmp_path):
    """configs/digits/student_gigagan.yaml and student_stylegan_t.yaml through the same script, on one
    pairs folder: a few regression steps, then the GAN (fresh noise), lower the held-out E-LatentLPIPS."""
    out = tmp_path / "qs"
    for name in ("student_gigagan", "student_stylegan_t"):
        run = _quickstart(
            out,
            f"configs/digits/{name}.yaml",
            steps=6,
            num_samples=20,
            student_args="--max_train_steps 12 --gan_start_step 8 --batch_size 16 --holdout 32 --checkpointing_steps 12"
            " --validation_steps 12",
        )
        assert run.returncode == 0, run.stderr[-4000:]
        metrics = json.loads((out / f"metrics-{name}.json").read_text())
        assert metrics["student_kind"] == name.removeprefix("student_")
        assert metrics["student_training"]["val_lpips_final"] < metrics["student_training"]["val_lpips_init"]
        stats = [json.loads(line) for line in (out / name / "stats.jsonl").read_text().splitlines()]
        assert [r["step"] for r in stats if "d_real" in r] == list(range(9, 13))  # the GAN from step 8 on
        assert (out / f"teacher_vs_{name}.png").is_file() and (out / f"report-{name}.txt").is_file()
    assert len(list((out / "pairs" / "data").glob("*.parquet"))) == 2  # made once, reused


@pytest.mark.slow  # a reduced quickstart: ~1 min on 2 idle cores
def test_reduced_quickstart_with_the_flow_matching_teacher(tmp_path):
    """bash distill/digits/quickstart.sh --family sd3: the committed SD3-form digits teacher, its pairs, the transformer
    student
    (a few steps lower the held-out E-LatentLPIPS), and both evaluated with the same report as the UNet family."""
    out = tmp_path / "qs-sd3"
    run = _quickstart(
        out,
        family="sd3",
        steps=6,
        num_samples=20,
        student_args="--max_train_steps 6 --batch_size 16 --holdout 32 --checkpointing_steps 6 --validation_steps 6"
        " --learning_rate_g 1e-4",
    )
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads((out / "metrics-student_sd3.json").read_text())
    assert metrics["student_kind"] == "transformer" and metrics["speedup"] > 1
    assert metrics["student"]["fid_to_teacher"] > 0 and metrics["teacher"]["fid_to_teacher_floor"] > 0
    assert 0 <= metrics["student"]["prompt_accuracy"] <= 1
    val = [
        json.loads(line)
        for line in (out / "student_sd3" / "stats.jsonl").read_text().splitlines()
        if "val_lpips" in line
    ]
    assert val[-1]["val_lpips"] < val[0]["val_lpips"]
