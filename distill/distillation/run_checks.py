"""What a training run checks before anything heavy loads: the teacher is the pairs' teacher, a resumed run
has the model and data it was started with, and the run's held-out split is recorded for evaluation.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from data_gen.pairs import SPLIT_FILE, heldout_split, rows_fingerprint
from distill.training.run_record import check_resume as check_config
from teachers.identity import identity_changes, resolve_teacher_folder, teacher_identity


def check_teacher(
    *, teacher: str, revision: str | None, variant: str | None, manifest: dict, pairs: str, allow_mismatch: bool
) -> bool:
    """Refuse a teacher other than the one that made ``pairs`` (by content), unless ``allow_mismatch``. True when it
    is that teacher (False: another one allowed, or not known)."""
    recorded = manifest.get("teacher", {}).get("identity")
    if recorded is None:
        sys.stderr.write(
            f"warning: {pairs} records no teacher identity (made by an older version): the teacher is not checked\n"
        )
        return False
    current = teacher_identity(resolve_teacher_folder(teacher, revision=revision, variant=variant))
    if current["sha256"] == recorded["sha256"]:
        return True
    if allow_mismatch:
        return False
    changed = identity_changes(recorded, current)
    raise ValueError(
        f"teacher {teacher} is not the teacher that made the pairs in {pairs} (differs in {', '.join(changed[:3])}"
        f"{', ...' if len(changed) > 3 else ''}): pass the pairs' teacher ({manifest['teacher'].get('name_or_path')}), "
        "or --allow_teacher_mismatch for deliberate cross-teacher training"
    )


def split_record(*, pairs: str, manifest: dict, holdout: int) -> dict:
    """The run's held-out split (the one definition: :func:`data_gen.pairs.heldout_split`), as written to
    ``pairs_split.json``."""
    train, held = heldout_split(int(manifest["count"]), holdout=holdout)
    return {
        "pairs": str(Path(pairs).resolve()),
        "rows_fingerprint": rows_fingerprint(manifest),
        "num_pairs": int(manifest["count"]),
        "train_indices": [train.start, train.stop],
        "heldout_indices": [held.start, held.stop],
    }


def write_split(path: str | os.PathLike, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def read_split(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / SPLIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_resume(output_dir: str | os.PathLike, *, config: dict, split: dict) -> None:
    """Refuse to resume ``output_dir`` with a changed run (:func:`distill.training.run_record.check_resume`: any key
    that
    defines it) or with other pairs than its saved run used (by the rows' content, wherever the folder now is)."""
    out = Path(output_dir)
    saved_split = read_split(out)
    if saved_split is not None:
        for key in ("rows_fingerprint", "num_pairs"):
            if saved_split.get(key) != split[key]:
                raise ValueError(
                    f"{out} holds a run made with another config (pairs: {saved_split['pairs']} -> {split['pairs']}, "
                    f"{key} differs): resume with the original pairs, or choose a new output_dir"
                )
    check_config(out, config=config)
