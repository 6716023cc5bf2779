"""The facts of a training run that an exported student's model card states (``students/model_card.py``
writes the card): teacher and its licence, pairs manifest hash and size, config, images seen, licence notice."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_gen.pairs import DATA_DIR
from distill.core.config import config_dict
from teachers.licenses import teacher_license


def pairs_facts(pairs: str) -> dict:
    """``path``, ``manifest_sha256`` (the manifest pins every shard's checksum, so it identifies the rows),
    ``count`` and ``bytes`` of a pairs folder."""
    root = Path(pairs)
    manifest = (root / "manifest.json").read_bytes()
    return {
        "path": str(pairs),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "count": int(json.loads(manifest)["count"]),
        "bytes": sum(p.stat().st_size for p in (root / DATA_DIR).glob("*.parquet")),
    }


def uses_published_lpips(*, regression: str, lpips_network: str) -> bool:
    """Whether the run trained with the published E-LatentLPIPS weights (CC BY-NC)."""
    from distill.losses.elatentlpips_weights import PUBLISHED

    return regression == "elatentlpips" and (lpips_network == "official" or lpips_network in PUBLISHED)


def card_facts(cfg, *, manifest: dict, nimg: int, step: int) -> dict:
    """Keyword arguments of :func:`students.model_card.write_model_card` for the run ``cfg`` (resolved config)."""
    teacher = cfg.teacher or manifest["teacher"]["name_or_path"]
    revision = cfg.revision or manifest["teacher"].get("revision")
    return dict(
        teacher=teacher,
        teacher_revision=revision,
        base_model=None if Path(teacher).exists() else teacher,  # a local folder is no hub reference
        license=teacher_license(teacher, revision=revision),
        student=cfg.student,
        pairs=pairs_facts(cfg.pairs),
        training_config=config_dict(cfg),
        images_seen=int(nimg),
        steps=int(step),
        noncommercial_lpips=uses_published_lpips(regression=cfg.regression, lpips_network=cfg.lpips_network),
    )
