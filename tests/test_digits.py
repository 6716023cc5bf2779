"""Digits testbed: data module, teacher training script, evaluation classifier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_gen.digits import (
    CAPTION_TEMPLATES,
    DIGIT_NAMES,
    captions_for_label,
    load_digits_images,
    sample_captions,
    split_indices,
)

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_ASSET = REPO / "teachers" / "assets" / "digits-classifier"
TEACHER_ASSET = REPO / "teachers" / "assets" / "digits-teacher"
# PYTHONPATH: the scripts must import this checkout's packages whatever an editable install points at.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1", "D2G_DEBUG": "1", "PYTHONPATH": str(REPO)}


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "distill" / script), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_digits_images_shapes_range_and_split():
    train_x, train_y = load_digits_images(split="train")
    held_x, held_y = load_digits_images(split="held_out")
    assert train_x.shape == (1438, 3, 32, 32) and held_x.shape == (359, 3, 32, 32)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert train_x.min() >= -1 and train_x.max() <= 1 and train_x.min() == -1  # background is -1
    assert torch.equal(train_x[:, 0], train_x[:, 2])  # grey copied to 3 channels
    assert set(train_y.tolist()) == set(held_y.tolist()) == set(range(10))
    all_x, all_y = load_digits_images(split="all")
    assert len(all_y) == len(train_y) + len(held_y) == 1797
    # fixed split: disjoint, covering, identical on every call
    import numpy as np

    tr, ho = split_indices(labels=all_y.numpy())
    assert len(np.intersect1d(tr, ho)) == 0 and len(tr) + len(ho) == 1797
    tr2, ho2 = split_indices(labels=all_y.numpy())
    assert np.array_equal(tr, tr2) and np.array_equal(ho, ho2)
    assert torch.equal(all_x[torch.from_numpy(ho)], held_x)
    with pytest.raises(ValueError):
        load_digits_images(split="test")


def test_captions():
    caps = captions_for_label(label=7)
    assert len(caps) == len(CAPTION_TEMPLATES) == 5 and len(set(caps)) == 5
    assert "a handwritten digit seven" in caps
    assert all(("7" in c) or (DIGIT_NAMES[7] in c) for c in caps)
    assert not set(caps) & set(captions_for_label(label=1))
    g = torch.Generator().manual_seed(0)
    sampled = sample_captions(labels=[0, 3, 9], generator=g)
    assert [s in captions_for_label(label=lab) for s, lab in zip(sampled, [0, 3, 9])] == [True] * 3
    with pytest.raises(ValueError):
        captions_for_label(label=10)


def test_teacher_script_end_to_end(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "teacher"
    common = ["--config", str(REPO / "configs/digits/teacher.yaml"), "--output_dir", str(out)]
    small = [
        "--vae_steps",
        "2",
        "--vae_batch_size",
        "4",
        "--batch_size",
        "4",
        "--unet_steps",
        "3",
        "--checkpoint_every",
        "2",
    ]
    _run("digits/train_teacher.py", *common, *small)
    assert (out / "train_state.pt").is_file() and (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "step-000002" / "model_index.json").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.tokenizer) == 49408 and pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32  # stored as fp16, loaded as fp32
    latents = pipe(
        prompt=captions_for_label(label=3)[:2],
        num_inference_steps=2,
        guidance_scale=4.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (2, 4, 16, 16) and torch.isfinite(latents).all()

    # Resume (resume is on by default): the state loads with weights_only=True and training continues to the new total.
    before = torch.load(out / "train_state.pt", weights_only=True)
    log = _run("digits/train_teacher.py", *common, *small[:-2], "--unet_steps", "4")
    assert "resumed from" in log and "at step 3" in log
    after = torch.load(out / "train_state.pt", weights_only=True)
    assert before["step"] == 3 and after["step"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(before["ema"], after["ema"]))  # the EMA moved on from where it was


def test_classifier_script_runs(tmp_path):
    from teachers.digits_classifier import DigitClassifier

    out = tmp_path / "clf"
    log = _run("digits/train_classifier.py", "--output_dir", str(out), "--steps", "3")
    assert "held-out accuracy" in log
    model = DigitClassifier.from_pretrained(out / "model")
    x = torch.zeros(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.features(x).shape == (2, model.config.feature_dim)


@pytest.mark.skipif(not (CLASSIFIER_ASSET / "config.json").is_file(), reason="committed classifier weights absent")
def test_committed_classifier_accuracy():
    from teachers.digits_classifier import DigitClassifier

    model = DigitClassifier.from_pretrained(CLASSIFIER_ASSET).eval()
    images, labels = load_digits_images(split="held_out")
    assert (model.predict(images) == labels).float().mean().item() >= 0.95


@pytest.mark.skipif(not (TEACHER_ASSET / "model_index.json").is_file(), reason="committed teacher weights absent")
def test_committed_teacher_loads():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER_ASSET)
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.sample_size == 16
    size = sum(f.stat().st_size for f in TEACHER_ASSET.rglob("*") if f.is_file())
    assert size < 20 * 2**20
