"""The import rules of docs/architecture.md, read from the code's own imports (function-level ones included):
the library rooms import downwards only, and stage two, from scratch and latent-LPIPS training stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {p.stem for p in (ROOT / "distill").glob("*.py") if p.stem != "__init__"}
# room -> the rooms it must not import (a room is a package, or "commands": the scripts in distill/).
FORBIDDEN = {
    "teachers": {"distill"},
    "students": {"distill"},
    "data_gen": {"distill"},
    "distill.core": {
        "distill.losses",
        "distill.discriminators",
        "distill.metrics",
        "distill.training",
        "distill.distillation",
        "distill.scratch",
        "distill.latent_lpips",
        "distill.digits",
        "commands",
    },
    "distill.losses": {
        "distill.metrics",
        "distill.training",
        "distill.distillation",
        "distill.scratch",
        "distill.latent_lpips",
        "distill.digits",
        "commands",
    },
    "distill.discriminators": {
        "distill.metrics",
        "distill.training",
        "distill.distillation",
        "distill.scratch",
        "distill.latent_lpips",
        "distill.digits",
        "commands",
    },
    "distill.metrics": {
        "distill.training",
        "distill.distillation",
        "distill.scratch",
        "distill.latent_lpips",
        "distill.digits",
        "commands",
    },
    "distill.training": {
        "distill.distillation",
        "distill.scratch",
        "distill.latent_lpips",
        "distill.digits",
        "commands",
    },
    "distill.distillation": {"distill.scratch", "distill.latent_lpips", "distill.digits", "commands"},
    "distill.scratch": {"distill.distillation", "distill.latent_lpips", "distill.digits", "commands"},
    "distill.latent_lpips": {"distill.distillation", "distill.scratch", "distill.digits", "commands"},
}


def _room_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "distill" and len(parts) > 1 and parts[1] in COMMANDS:
        return "commands"
    return ".".join(parts[:2]) if parts[0] == "distill" else parts[0]


def _imports(path: Path) -> list[str]:
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this file's package
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])]
                )
            found += (
                [f"{base}.{alias.name}" for alias in node.names] if base in ("distill", "distill.training") else [base]
            )
    return found


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_a_room_imports_no_room_above_or_beside_it(room):
    folder = ROOT / Path(*room.split("."))
    files = sorted(folder.rglob("*.py"))
    assert files, folder
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _imports(path)
        if name.split(".")[0] in ("distill", "teachers", "students", "data_gen")
        and (_room_of(name) in FORBIDDEN[room] or name.split(".")[0] in FORBIDDEN[room])
    ]
    assert not broken, "\n".join(broken)


def test_the_rule_would_catch_an_arrow_up():
    """The check itself can fail: a loss importing the shared loop is reported."""
    assert _room_of("distill.training.loop") in FORBIDDEN["distill.losses"]
    assert _room_of("distill.train_student") == "commands"
    assert _room_of("distill.digits.teacher_steps") in FORBIDDEN["distill.training"]
