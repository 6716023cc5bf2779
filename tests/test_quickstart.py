"""A reduced quickstart (fewer pairs, steps and samples) through scripts/quickstart.sh, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_reduced_quickstart(tmp_path):
    out = tmp_path / "qs"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2",
        QUICKSTART_PAIRS_ARGS="--num_pairs 96 --shard_size 48 --batch_size 48 --num_inference_steps 10",
        QUICKSTART_STUDENT_ARGS="--max_train_steps 6 --batch_size 16 --holdout 32 --checkpointing_steps 6 --validation_steps 6"
                                " --learning_rate_g 1e-4 --ema_half_life_kimg 0",
        QUICKSTART_EVAL_ARGS="--num_samples 40 --batch_size 20 --num_inference_steps 10 --latency_batch_size 8"
                             " --latency_iterations 1 --latency_warmup 1 --latency_min_seconds 0 --fidelity_start -32",
    )
    run = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for who in ("teacher", "student"):
        assert 0 <= metrics[who]["prompt_accuracy"] <= 1 and metrics[who]["fid"] > 0
    assert metrics["speedup"] > 1
    # Fidelity on the held-out pairs: the teacher reproduces its own pairs; the student does not (yet).
    assert metrics["teacher"]["e_latent_lpips"] < 1e-3 and metrics["student"]["e_latent_lpips"] > 1e-3
    assert metrics["student"]["psnr"] < metrics["teacher"]["psnr"]
    assert (out / "teacher_vs_student.png").is_file() and "prompt accuracy" in (out / "report.txt").read_text()
    report = (out / "report.md").read_text()  # the pictures: teacher row vs student row, and the run's curves
    assert "](teacher_vs_student.png)" in report and "](student/curves.png)" in report and (out / "student" / "curves.png").is_file()
    assert (out / "student" / "pipeline" / "README.md").is_file() and (out / "student" / "pipeline" / "samples.png").is_file()

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
