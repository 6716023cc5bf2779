"""Entry scripts run in both launch forms without touching sys.path: as files (``python distill/X.py``,
``accelerate launch distill/X.py``, from any folder: the installed package resolves the imports) and as
modules (``python -m distill.X``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "distill").glob("*.py") if not p.stem.startswith("_") and "__main__" in p.read_text())


def _help(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_no_entry_script_edits_sys_path():
    assert len(SCRIPTS) >= 10
    for name in SCRIPTS:
        assert "sys.path" not in (ROOT / "distill" / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", SCRIPTS)
def test_entry_script_runs_as_a_file_and_as_a_module(name, tmp_path):
    as_file = _help([sys.executable, str(ROOT / "distill" / f"{name}.py"), "--help"], cwd=tmp_path)  # another folder
    assert as_file.returncode == 0 and "usage" in as_file.stdout.lower(), as_file.stderr[-2000:]
    as_module = _help([sys.executable, "-m", f"distill.{name}", "--help"], cwd=ROOT)
    assert as_module.returncode == 0 and as_module.stdout == as_file.stdout, as_module.stderr[-2000:]


def test_accelerate_launch_of_a_file():
    done = _help([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "distill/export_stock.py", "--help"], cwd=ROOT)
    assert done.returncode == 0 and "--pipeline" in done.stdout, done.stderr[-2000:]
