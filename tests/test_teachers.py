"""Teacher loading and ODE parity with the diffusers pipeline itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from teachers import load_teacher, solve_ode
from teachers.tokenizer import build_clip_tokenizer


def test_clip_tokenizer_is_the_real_vocabulary():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    # Ids of the OpenAI CLIP tokenizer for this sentence.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize(
    "family, pipe_cls, prediction, scheduler",
    [
        ("sd15", StableDiffusionPipeline, "epsilon", "ddim"),
        ("sd15", StableDiffusionPipeline, "epsilon", "dpmpp"),
        ("sd15", StableDiffusionPipeline, "epsilon", "euler"),
        ("sd2-v", StableDiffusionPipeline, "v_prediction", "ddim"),
        ("sdxl", StableDiffusionXLPipeline, "epsilon", "ddim"),
        ("sdxl", StableDiffusionXLPipeline, "epsilon", "euler"),
    ],
)
def test_ode_matches_diffusers_pipeline(tiny_teacher_factory, family, pipe_cls, prediction, scheduler):
    path = tiny_teacher_factory(family)
    teacher = load_teacher(str(path), scheduler=scheduler)
    assert teacher.prediction_type == prediction
    assert teacher.latent_shape(32) == (4, 16, 16)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog on a sofa"]
    ours = solve_ode(
        teacher.pipe, prompts=prompts, noise=noise, num_inference_steps=3, guidance_scale=5.0, negative_prompt="blurry"
    )
    # Reference: a pipeline loaded independently, the scheduler swapped the documented diffusers way.
    ref_pipe = pipe_cls.from_pretrained(path)
    ref_pipe.scheduler = type(teacher.pipe.scheduler).from_config(teacher.pipe.scheduler.config)
    ref = ref_pipe(
        prompt=prompts,
        negative_prompt=["blurry"] * 2,
        latents=noise.clone(),
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
    ).images
    assert ours.shape == (2, 4, 16, 16)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # A real solve moves away from the starting noise.
    assert (ours - noise).abs().mean() > 1e-3


def test_unsupported_pipeline_is_named(sd15_teacher, tmp_path):
    fake = tmp_path / "flux"
    fake.mkdir()
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(
        ValueError, match="FluxPipeline.*supported pipelines: StableDiffusionPipeline, StableDiffusionXLPipeline"
    ):
        load_teacher(str(fake))


def test_missing_teacher_fails_fast():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_teacher("/nonexistent/teacher")
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub"):
        load_teacher("nobody-here/not-a-model")


def test_broken_tokenizer_is_caught(sd15_teacher, tmp_path):
    from transformers import CLIPTokenizer

    broken = tmp_path / "broken"
    shutil.copytree(sd15_teacher, broken)
    shutil.rmtree(broken / "tokenizer")
    CLIPTokenizer().save_pretrained(broken / "tokenizer")  # what an offline hub fallback looks like
    with pytest.raises(ValueError, match=r"tokenizer has only \d+ tokens"):
        load_teacher(str(broken))


def test_resolution_must_divide_by_vae_factor(sd15_teacher):
    teacher = load_teacher(str(sd15_teacher))
    with pytest.raises(ValueError, match="not divisible by the VAE factor 2"):
        teacher.latent_shape(33)
