"""Every command runs in each launch form without touching sys.path: as a file (``python distill/X.py``,
``accelerate launch distill/X.py``, from any folder: the installed package resolves the imports), as a module
(``python -m distill.X``) and as the console script ``pyproject.toml`` declares for it (``d2g-...``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The commands: distill/*.py (general) and distill/digits/*.py (the digits testbed) whose main is an @command.
COMMANDS = sorted(
    p.relative_to(ROOT).with_suffix("").as_posix()
    for p in [*(ROOT / "distill").glob("*.py"), *(ROOT / "distill" / "digits").glob("*.py")]
    if "@command\ndef main" in p.read_text()
)
# As pip installed them from pyproject.toml's [project.scripts].
CONSOLE_SCRIPTS = {e.name: e.value for e in entry_points(group="console_scripts") if e.value.startswith("distill.")}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _console_script(command: str) -> str:
    module = command.replace("/", ".")
    names = [name for name, target in CONSOLE_SCRIPTS.items() if target == f"{module}:main"]
    assert len(names) == 1, f'pyproject.toml [project.scripts] needs one entry `d2g-... = "{module}:main"`'
    return names[0]


def test_every_command_has_a_console_script_and_none_edits_sys_path():
    assert len(COMMANDS) >= 12, COMMANDS
    assert sorted(CONSOLE_SCRIPTS.values()) == sorted(f"{c.replace('/', '.')}:main" for c in COMMANDS)
    for command in COMMANDS:
        assert "sys.path" not in (ROOT / f"{command}.py").read_text(), command


@pytest.mark.parametrize("command", COMMANDS)
def test_command_runs_as_a_file_a_module_and_a_console_script(command, tmp_path):
    as_file = _run([sys.executable, str(ROOT / f"{command}.py"), "--help"], cwd=tmp_path)  # another folder
    assert as_file.returncode == 0 and "usage" in as_file.stdout.lower(), as_file.stderr[-2000:]
    as_module = _run([sys.executable, "-m", command.replace("/", "."), "--help"], cwd=ROOT)
    assert as_module.returncode == 0 and as_module.stdout == as_file.stdout, as_module.stderr[-2000:]
    name = _console_script(command)
    executable = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(executable).exists(), f"console script {name} not installed: run `pip install -e .` again"
    as_script = _run([executable, "--help"], cwd=tmp_path)
    assert as_script.returncode == 0 and as_script.stdout.startswith(f"usage: {name} "), as_script.stderr[-2000:]
    # The same flags and defaults; the usage lines differ (argparse names the program after argv[0] and wraps on it).
    assert as_script.stdout.split("\n\n", 1)[1] == as_file.stdout.split("\n\n", 1)[1]


def test_accelerate_launch_of_a_file_and_of_a_console_script():
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    done = _run([*launch, "distill/export_stock.py", "--help"], cwd=ROOT)
    assert done.returncode == 0 and "--pipeline" in done.stdout, done.stderr[-2000:]
    done = _run([*launch, "--no_python", "d2g-export-stock", "--help"], cwd=ROOT)
    assert done.returncode == 0 and "--pipeline" in done.stdout, done.stderr[-2000:]


def test_a_console_script_ends_a_user_error_in_one_line(tmp_path):
    done = _run(["d2g-sample", "--pipeline", str(tmp_path / "missing"), "--prompt", "a cat"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_under_accelerate_launch_a_user_error_is_the_line_the_launcher_ends_with(tmp_path, processes):
    """`accelerate launch -q`: one process, the command's `error:` line is the last line; several (torchrun), the
    summary printed last gives that line as its root cause (`traceback : error: ...`), not a link to a traceback.
    The launcher's own status is 1; the command's 2 shows in the summary (`exitcode  : 2`)."""
    from conftest import _free_port

    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "-q",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
    ]
    if processes > 1:
        launch += ["--multi_gpu", "--main_process_port", str(_free_port())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    done = subprocess.run(
        [*launch, str(ROOT / "distill" / "sample.py"), "--pipeline", str(tmp_path / "missing"), "--prompt", "a"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = f"error: pipeline '{tmp_path / 'missing'}' does not exist"
    lines = [x for x in done.stderr.splitlines() if x.strip() and set(x.strip()) != {"="}]
    assert done.returncode == 1 and "Traceback (most recent call last)" not in done.stderr, done.stderr[-3000:]
    if processes == 1:
        assert lines[-1].startswith(line), done.stderr[-3000:]
    else:
        assert lines[-1].strip().startswith(f"traceback : {line}") and "exitcode  : 2" in done.stderr, done.stderr[
            -3000:
        ]
