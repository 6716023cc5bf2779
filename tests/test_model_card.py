"""The exported student's model card: hub metadata (YAML), training facts, licence terms, evaluation numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from students.model_card import NONCOMMERCIAL_NOTICE, update_model_card_metrics, write_model_card
from teachers.licenses import DIGITS_TEACHER, teacher_license

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"path": "runs/pairs-sd15", "manifest_sha256": "ab" * 32, "count": 100000, "bytes": 3 * 2**30}


def _card(tmp_path, **overrides) -> ModelCard:
    facts = dict(
        teacher="stable-diffusion-v1-5/stable-diffusion-v1-5",
        teacher_revision="main",
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        license=teacher_license("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        student="unet",
        pairs=PAIRS,
        training_config={"student": "unet", "lpips_network": "official", "validation_prompts": ["a cat, sitting"]},
        images_seen=5_120_000,
        steps=20000,
        noncommercial_lpips=True,
        sample_grid="samples.png",
    )
    write_model_card(tmp_path, **{**facts, **overrides})
    return ModelCard.load(tmp_path / "README.md")


def test_card_metadata_and_fields(tmp_path):
    card = _card(tmp_path)
    meta = card.data.to_dict()
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m" and meta["pipeline_tag"] == "text-to-image"
    assert meta["library_name"] == "diffusers" and {"diffusion2gan", "one-step", "student-unet"} <= set(meta["tags"])
    front = (tmp_path / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front) == meta  # plain YAML, as the hub parses it
    text = card.text
    assert "`stable-diffusion-v1-5/stable-diffusion-v1-5` (revision `main`)" in text
    assert f"| pairs manifest sha256 | `{'ab' * 32}` |" in text and "100000 pairs, 3072.0 MiB" in text
    assert "| training images seen | 5120000 (20000 steps) |" in text
    assert "- a cat, sitting" in text and "lpips_network: official" in text  # the training config, as YAML
    assert "![teacher (top) and one-step student (bottom), same noise and prompts](samples.png)" in text
    assert NONCOMMERCIAL_NOTICE in text and "trust_remote_code=True" in text and "Not evaluated yet" in text


def test_no_noncommercial_notice_with_own_lpips_weights_and_unknown_licence(tmp_path):
    card = _card(
        tmp_path,
        teacher="me/my-teacher",
        base_model="me/my-teacher",
        license=teacher_license("me/my-teacher"),
        noncommercial_lpips=False,
        sample_grid=None,
    )
    assert "license" not in card.data.to_dict() and "CC BY-NC" not in card.text and "![" not in card.text
    assert "its licence (see the teacher) applies" in card.text


def test_evaluation_numbers_merge_into_the_card(tmp_path):
    _card(tmp_path)
    update_model_card_metrics(tmp_path, {"fid": 21.25, "clip_score": 0.31}, source="first run")
    update_model_card_metrics(tmp_path, {"fid": 20.5, "psnr": 24.0}, source="second run")
    card = ModelCard.load(tmp_path / "README.md")
    assert "| fid | 20.5 |" in card.text and "| clip_score | 0.31 |" in card.text and "| psnr | 24 |" in card.text
    assert (
        "Measured by second run." in card.text and "first run" not in card.text and "Not evaluated yet" not in card.text
    )
    assert card.data.to_dict()["license"] == "creativeml-openrail-m"  # metadata untouched
    (tmp_path / "README.md").write_text("# my own card\n")
    update_model_card_metrics(tmp_path, {"fid": 1.0}, source="x")
    assert (tmp_path / "README.md").read_text() == "# my own card\n"  # a hand-written card is left alone
    assert update_model_card_metrics(tmp_path / "nothing", {"fid": 1.0}, source="x") is None


@pytest.mark.parametrize(
    "name, expected",
    [
        ("stabilityai/stable-diffusion-xl-base-1.0", "openrail++"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
        (str(DIGITS_TEACHER), "apache-2.0"),
        ("teachers/assets/digits-teacher", "apache-2.0"),
        ("nobody/unknown-teacher", None),
    ],
)
def test_teacher_license(name, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert teacher_license(name) == expected


def test_teacher_license_from_a_local_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a teacher\n")
    assert teacher_license(str(tmp_path)) == "mit"
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert teacher_license(str(tmp_path)) is None


def test_published_lpips_weights_are_flagged():
    from distill.distillation.card import uses_published_lpips

    assert uses_published_lpips(regression="elatentlpips", lpips_network="official")
    assert uses_published_lpips(regression="elatentlpips", lpips_network="sd15")
    assert not uses_published_lpips(regression="elatentlpips", lpips_network="teachers/assets/digits-latent-lpips")
    assert not uses_published_lpips(regression="mse", lpips_network="official")
