"""distill/digits/scratch_report.py: the from-scratch digits report judges the four targets of the from-scratch work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


def _write(out, teacher: dict, gan: dict) -> None:
    for name, metrics in (("eval-teacher", teacher), ("eval-gigagan", gan)):
        (out / name).mkdir(parents=True)
        (out / name / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    (out / "gigagan").mkdir()
    (out / "gigagan" / "stats.jsonl").write_text(json.dumps({"step": 600, "nimg": 19200}) + "\n")


TEACHER = {
    "fid": 80.0,
    "prompt_accuracy": 1.0,
    "precision": 0.9,
    "recall": 0.5,
    "diversity": 22.0,
    "diversity_ratio": 0.8,
}


@pytest.mark.parametrize(
    "gan, missed",
    [
        (
            {
                "fid": 100.0,
                "prompt_accuracy": 0.95,
                "precision": 0.8,
                "recall": 0.3,
                "diversity": 15.0,
                "diversity_ratio": 0.6,
            },
            [],
        ),
        (
            {
                "fid": 440.0,
                "prompt_accuracy": 0.96,
                "precision": 0.6,
                "recall": 0.008,
                "diversity": 12.0,
                "diversity_ratio": 0.43,
            },
            ["fid_ratio", "recall_ratio", "diversity_ratio"],
        ),  # mode collapse: accurate, but one style per prompt
        ({"fid": 100.0, "prompt_accuracy": 0.95}, None),  # an evaluation without the diversity metrics cannot pass
    ],
)
def test_scratch_report_judges_the_four_targets(tmp_path, gan, missed):
    _write(tmp_path, TEACHER, gan)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "distill" / "digits" / "scratch_report.py"),
            str(tmp_path),
            "gigagan",
            "--train_seconds",
            "600",
            "--total_seconds",
            "700",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "metrics-gigagan.json").read_text())
    report = (tmp_path / "report-gigagan.txt").read_text()
    assert result["targets_met"] == (missed == [])
    if missed is None:
        assert "recall / diversity not evaluated" in report
    else:
        assert sorted(k for k, v in result["targets"].items() if not v) == sorted(missed)
        assert (
            f"recall ratio {gan['recall'] / 0.5:.2f}" in report
            and f"{gan['diversity_ratio']:.2f}x the real digits'" in report
        )
