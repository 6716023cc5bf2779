"""A reduced ablation (two variants, a few steps) through distill/digits/ablation.py, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reduced_ablation_writes_one_table(tmp_path):
    out = tmp_path / "ablation"
    cmd = [
        sys.executable,
        str(ROOT / "distill" / "digits" / "ablation.py"),
        str(out),
        "--variants",
        "unet-mse,gigagan-elatentlpips-gan",
        "--pairs_args",
        "--num_pairs 48 --shard_size 24 --batch_size 24 --num_inference_steps 4",
        "--student_args",
        "--max_train_steps 2 --batch_size 8 --holdout 16 --checkpointing_steps 2 --validation_steps 2",
        "--eval_args",
        "--num_samples 20 --batch_size 20 --num_inference_steps 4",
        "--seeds",
        "0,1",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "unet-mse", "gigagan-elatentlpips-gan"]
    for r in rows:
        assert 0 <= r["prompt_accuracy"] <= 1 and r["fid"] > 0 and r["psnr"] > 0 and r["e_latent_lpips"] >= 0
    assert rows[0]["fid_ratio"] == 1.0 and rows[0]["e_latent_lpips"] < 1e-3  # the teacher reproduces its own pairs
    table = (out / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + 3 and "| gigagan-elatentlpips-gan |" in table[-1]
    # FID to the teacher's other-seed samples; the teacher's own value is the floor, made from a separate set.
    assert all(r["fid_to_teacher"] > 0 for r in rows) and rows[0]["fid_to_teacher_over_floor"] == 1.0
    manifest = json.loads((out / "teacher-reference" / "samples" / "manifest.json").read_text())
    assert manifest["identity"]["seed"] == 2
    # Two training seeds per variant (mean ± std, per-seed values kept) unless the variant pins its own
    # (unet-mse: one); the teacher's floor over two teacher sample sets (evaluation seeds 1 and 3).
    assert [len(r["fid_to_teacher_runs"]) for r in rows] == [2, 1, 2]
    assert (
        rows[2]["psnr_runs"][0] != rows[2]["psnr_runs"][1] and rows[2]["psnr_std"] > 0
    )  # seeds train different students
    assert " ± " in table[-1] and " ± " not in table[-2]
    gigagan = (out / "gigagan-elatentlpips-gan" / "seed-1" / "student" / "config.yaml").read_text()
    assert "student: gigagan" in gigagan and "student_size: small" in gigagan and "seed: 1" in gigagan

    # A rerun finds every variant done and only rebuilds the table; an unknown variant is one line.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "unet-mse" / "seed-0" / "train.log").read_text().count("$ ") == 1
    assert json.loads((out / "ablation.json").read_text()) == rows
    bad = subprocess.run(
        [*cmd[:3], "--variants", "nope"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown variant(s) nope")
