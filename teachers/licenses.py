"""A teacher's licence, for the model card of a student distilled from it (the student inherits its terms).

Read from the teacher's own model card when one is at hand (a local folder's ``README.md``, or the hub's
card in the local cache: nothing is downloaded), else from the published licences of the usual teachers.
"""

from __future__ import annotations

from pathlib import Path

# Hub licence identifiers of the teachers this toolkit is configured for.
KNOWN_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}
# The digits testbed's teachers are this project's own (Apache-2.0), trained by distill/digits/train_teacher.py
# and distill/digits/train_teacher_sd3.py.
DIGITS_TEACHER = Path(__file__).resolve().parent / "assets" / "digits-teacher"
DIGITS_TEACHERS = (DIGITS_TEACHER, DIGITS_TEACHER.with_name("digits-teacher-sd3"))


def teacher_license(name_or_path: str, *, revision: str | None = None) -> str | None:
    """The teacher's licence identifier (``apache-2.0``, ``openrail++``, ...), or None when unknown."""
    path = Path(name_or_path)
    if path.exists():
        if path.resolve() in DIGITS_TEACHERS:
            return "apache-2.0"
        return _card_license(path / "README.md") if (path / "README.md").is_file() else None
    if name_or_path in KNOWN_LICENSES:
        return KNOWN_LICENSES[name_or_path]
    try:
        from huggingface_hub import hf_hub_download

        card = hf_hub_download(name_or_path, "README.md", revision=revision, local_files_only=True)
    except Exception:  # not in the local cache (or not a hub id): unknown, never a download
        return None
    return _card_license(Path(card))


def _card_license(card: Path) -> str | None:
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a README without valid metadata says nothing about the licence
        return None
    return str(value) if value else None
