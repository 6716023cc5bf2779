"""What a folder a command was given holds, told by the files the toolkit's commands write: so that a wrong
``--pipeline`` is answered with what it is and what to pass, not "not found" for a folder that exists."""

from __future__ import annotations

import json
import os
from pathlib import Path


def describe(folder: str | os.PathLike) -> str:
    """A short phrase naming what ``folder`` is (or that it does not exist), and where its student pipeline is, if
    any."""
    path = Path(folder)
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is a file, not a folder"
    if (path / "manifest.json").is_file() and (path / "data").is_dir():
        return "is a pairs folder (written by generate_pairs.py), not a student"
    if (path / "trainer_state.json").is_file():
        return f"is a training checkpoint; its student pipeline is {path / 'pipeline'}"
    if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "pipeline").is_dir()):
        inside = (
            f"its student pipeline is {path / 'pipeline'}"
            if (path / "pipeline").is_dir()
            else "it has no pipeline/ yet"
        )
        return f"is a training run folder; {inside}"
    if (path / "metrics.json").is_file():
        return "is an evaluation folder (written by evaluate.py), not a student"
    if (path / "model_index.json").is_file():
        try:
            name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except (OSError, ValueError):
            name = None
        name = name[-1] if isinstance(name, list) and name else name
        return f"is a diffusers {name or 'pipeline'} folder, not a one-step student"
    return "holds no model_index.json: it is not a pipeline folder"
