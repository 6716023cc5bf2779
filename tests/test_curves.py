"""scripts/curves.py: learning curves of stage-two runs from stats.jsonl and scored checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "curves.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def test_curves_from_training_stats_and_scored_checkpoints(tmp_path, sd15_teacher, prompt_file):
    from students import OneStepGANPipeline, UNetStudent
    from teachers import load_teacher

    run = tmp_path / "run"
    lines = [
        {"step": 0, "val_mse": 0.5, "val_lpips": 1.0},
        {"step": 1, "nimg": 8, "g_lpips": 0.9},
        {"step": 2, "nimg": 16, "g_lpips": 0.8},
        {"step": 2, "val_mse": 0.4, "val_lpips": 0.7},
    ]
    run.mkdir()
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "curves"
    done = _run([f"mine={run}", "--output", out])
    assert done.returncode == 0, done.stderr[-2000:]
    curves = json.loads((out / "curves.json").read_text())
    assert [(r["nimg"], r["val_lpips"]) for r in curves["mine"]["validation"]] == [(0, 1.0), (16, 0.7)]
    assert (out / "curves.png").stat().st_size > 1000
    assert "| mine | 0.0 | 0.700 | - | - |" in (out / "curves.md").read_text()  # the last validation point, 16 images

    # --eval: every kept checkpoint's pipeline (and the final one) scored by evaluate.py, cached.
    pipe = load_teacher(str(sd15_teacher)).pipe
    student = OneStepGANPipeline(
        student=UNetStudent.from_teacher(pipe.unet, pipe.scheduler),
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    for step in (1, 2):  # --eval_every 2 scores checkpoint-2 only
        student.save_pretrained(run / "checkpoints" / f"checkpoint-{step}" / "pipeline")
    ref = tmp_path / "teacher-samples"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"prompts: {prompt_file}\nnum_samples: 6\nbatch_size: 3\nmetrics: fid_to_teacher\n"
        f"teacher_reference: {ref}\nfid_extractor: random-tiny\nmetric_workers: 0\n"
        f"metrics_cache: {tmp_path / 'cache'}\ngrid_size: 0\n"
    )
    done = _run([run, "--output", out, "--eval", "--eval_every", 2, "--eval_config", config, "--eval_args", ""])
    assert done.returncode == 0, done.stderr[-2000:]
    scored = json.loads((out / "curves.json").read_text())["run"]["evaluation"]
    assert [r["step"] for r in scored] == [2] and scored[0]["nimg"] == 16 and scored[0]["fid_to_teacher"] > 0
    assert (run / "curve-eval" / "step-0000002" / "metrics.json").is_file()
    assert "| run | 0.0 |" in (out / "curves.md").read_text()
    bad = _run([tmp_path / "nothing", "--output", out])
    assert bad.returncode != 0 and "has no stats.jsonl" in bad.stderr
