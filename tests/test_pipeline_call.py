"""OneStepGANPipeline is called like SD-Turbo: diffusers' arguments that one step can honour, the rest refused;
loaded in another dtype, and an fp16 VAE with force_upcast decoding in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import students.pipeline as pipeline_module
from students import GigaGANGenerator, OneStepGANPipeline, UNetStudent
from teachers import load_teacher


@pytest.fixture(scope="module")
def sd(sd15_teacher):
    from diffusers import StableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(sd15_teacher)
    pipe = OneStepGANPipeline(
        student=UNetStudent.from_teacher(teacher.unet, teacher.scheduler),
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
    )
    return teacher, pipe


@pytest.fixture(scope="module")
def sdxl(sdxl_teacher):
    from diffusers import StableDiffusionXLPipeline

    teacher = StableDiffusionXLPipeline.from_pretrained(sdxl_teacher)
    torch.manual_seed(0)
    student = GigaGANGenerator.for_latents(
        latent_channels=4,
        sample_size=16,
        cross_attention_dim=teacher.unet.config.cross_attention_dim,
        pooled_dim=teacher.text_encoder_2.config.projection_dim,
        size="tiny",
    ).eval()
    pipe = OneStepGANPipeline(
        student=student,
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        text_encoder_2=teacher.text_encoder_2,
        tokenizer_2=teacher.tokenizer_2,
    )
    return teacher, pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sd_turbo_call(sd):
    _, pipe = sd
    out = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0, generator=seeded())
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (32, 32)
    plain = pipe("a photo of a cat", generator=seeded(), output_type="np").images
    np.testing.assert_array_equal(np.asarray(out.images[0]), (plain[0] * 255).round().astype(np.uint8))
    assert (
        'DiffusionPipeline.from_pretrained("runs/student/pipeline", trust_remote_code=True)'
        in OneStepGANPipeline.__call__.__doc__
    )
    assert "num_inference_steps=1, guidance_scale=0.0" in pipeline_module.EXAMPLE_DOC_STRING


def test_output_types_and_return_dict(sd):
    _, pipe = sd
    z = torch.randn(2, 4, 16, 16, generator=seeded(3))
    prompts = ["a cat", "a dog"]
    assert pipe(prompts, latents=z, output_type="latent").images.shape == (2, 4, 16, 16)
    pt = pipe(prompts, latents=z, output_type="pt").images
    assert pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(
        pipe(prompts, latents=z, output_type="np").images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6
    )
    images = pipe(prompts, latents=z, return_dict=False)
    assert isinstance(images, tuple) and len(images[0]) == 2 and isinstance(images[0][0], Image.Image)
    with pytest.raises(ValueError, match="unknown output_type 'jpg'"):
        pipe(prompts, latents=z, output_type="jpg")


def test_prompt_embeds_match_the_prompt_sd(sd):
    teacher, pipe = sd
    z = torch.randn(4, 4, 16, 16, generator=seeded(1))
    embeds, _ = teacher.encode_prompt(["a cat", "a dog"], "cpu", 1, False)  # diffusers' own encoding
    from_text = pipe(["a cat", "a dog"], latents=z, num_images_per_prompt=2, output_type="latent").images
    from_embeds = pipe(prompt_embeds=embeds, latents=z, num_images_per_prompt=2, output_type="latent").images
    torch.testing.assert_close(from_embeds, from_text)
    with pytest.raises(ValueError, match="pooled_prompt_embeds is for SDXL students"):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="exactly one of them"):
        pipe("a cat", prompt_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of them"):
        pipe()


def test_prompt_embeds_match_the_prompt_sdxl(sdxl):
    teacher, pipe = sdxl
    z = torch.randn(2, 4, 16, 16, generator=seeded(2))
    embeds, _, pooled, _ = teacher.encode_prompt(
        ["a cat", "a dog"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    from_text = pipe(["a cat", "a dog"], latents=z, output_type="latent").images
    from_embeds = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=z, output_type="latent").images
    torch.testing.assert_close(from_embeds, from_text)
    with pytest.raises(ValueError, match="this is an SDXL student: pass pooled_prompt_embeds"):
        pipe(prompt_embeds=embeds, latents=z)


def test_generator_list_gives_each_image_its_own_seed(sd):
    _, pipe = sd
    both = pipe(["a cat", "a dog"], generator=[seeded(5), seeded(6)], output_type="latent").images
    # Batched and single forwards differ by float rounding (amplified 14.6x by the x0 conversion).
    close = dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(both[0:1], pipe("a cat", generator=seeded(5), output_type="latent").images, **close)
    torch.testing.assert_close(both[1:2], pipe("a dog", generator=seeded(6), output_type="latent").images, **close)
    assert (both[0] - both[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        pipe(["a cat", "a dog"], generator=[seeded(5)])


def test_size_from_height_width_or_latents(sd):
    _, pipe = sd
    assert pipe("a cat", height=48, width=32, output_type="pt").images.shape == (1, 3, 48, 32)
    with pytest.raises(ValueError, match="height must be a positive multiple of the VAE factor 2"):
        pipe("a cat", height=33)
    with pytest.raises(ValueError, match="disagrees with latents"):
        pipe("a cat", latents=torch.randn(1, 4, 16, 16), height=64)
    with pytest.raises(ValueError, match=r"latents must be \[2, 4, 16, 16\]"):
        pipe(["a cat", "a dog"], latents=torch.randn(1, 4, 16, 16))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(negative_prompt="blurry"),
            ValueError,
            "negative_prompt is not supported: a one-step GAN student has no classifier-free guidance",
        ),
        (dict(num_inference_steps=4), ValueError, "num_inference_steps must be 1 for a one-step GAN student (got 4)"),
        (dict(eta=0.5), ValueError, "eta is not supported: there is no sampler"),
        (dict(timesteps=[999]), ValueError, "timesteps is not supported: there is no sampler"),
        (
            dict(callback_on_step_end=print),
            ValueError,
            "callback_on_step_end is not supported: there are no denoising steps",
        ),
        (dict(negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "negative_prompt_embeds is not supported"),
        (dict(cross_attention_kwargs={"scale": 0.5}), ValueError, "cross_attention_kwargs is not supported"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be at least 1"),
        (dict(not_an_argument=1), TypeError, "unexpected keyword argument 'not_an_argument'"),
    ],
)
def test_what_one_step_cannot_honour_is_refused_in_one_line(sd, kwargs, error, message):
    _, pipe = sd
    with pytest.raises(error) as info:
        pipe("a cat", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_guidance_scale_is_ignored_with_a_warning(sd, monkeypatch):
    _, pipe = sd
    warnings = []
    monkeypatch.setattr(pipeline_module.logger, "warning", warnings.append)
    z = torch.randn(1, 4, 16, 16, generator=seeded(4))
    for scale in (0.0, 1.0):
        pipe("a cat", latents=z, guidance_scale=scale, output_type="latent")
    assert warnings == []
    guided = pipe("a cat", latents=z, guidance_scale=7.5, output_type="latent").images
    assert len(warnings) == 1 and "guidance_scale=7.5 is ignored" in warnings[0]
    torch.testing.assert_close(guided, pipe("a cat", latents=z, output_type="latent").images)


def test_prepare_latents_and_check_inputs_are_diffusers_shaped(sd):
    _, pipe = sd
    z = pipe.prepare_latents(2, 4, 32, 32, torch.float32, torch.device("cpu"), seeded(0))
    assert z.shape == (2, 4, 16, 16)
    torch.testing.assert_close(z, torch.randn(2, 4, 16, 16, generator=seeded(0)))
    pipe.check_inputs("a cat", 32, 32)  # valid: returns quietly
    with pytest.raises(ValueError, match="width must be a positive multiple"):
        pipe.check_inputs("a cat", 32, 31)


def test_pipeline_dtype_and_device(tmp_path, sd15_teacher):
    from students import UNetStudent

    tp = load_teacher(str(sd15_teacher)).pipe
    pipe = OneStepGANPipeline(
        student=UNetStudent.from_teacher(tp.unet, tp.scheduler),
        vae=tp.vae,
        text_encoder=tp.text_encoder,
        tokenizer=tp.tokenizer,
    )
    pipe.save_pretrained(tmp_path / "p")
    half = OneStepGANPipeline.from_pretrained(tmp_path / "p", dtype=torch.bfloat16).to("cpu")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = half("a cat", latents=z, output_type="latent").images
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 16, 16)
    ref = pipe("a cat", latents=z, output_type="latent").images
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean()
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="jpeg")


def test_fp16_decode_upcasts_a_force_upcast_vae(sdxl_teacher, tmp_path):
    """An fp16 VAE with ``force_upcast`` (SDXL's) decodes in fp32, in the pipeline and in evaluate's
    Sampler, as diffusers' SDXL pipeline does; its weights stay fp16. The VAE here is made to overflow
    fp16 (large post-quant conv) the way SDXL's does at 1024 px: NaN without the upcast."""
    from distill.metrics.generation import Sampler
    from students import UNetStudent

    tp = load_teacher(str(sdxl_teacher)).pipe
    with torch.no_grad():
        tp.vae.post_quant_conv.weight.mul_(1e5)
        tp.vae.post_quant_conv.bias.mul_(1e5)
    assert tp.vae.config.force_upcast
    OneStepGANPipeline(
        student=UNetStudent.from_teacher(tp.unet, tp.scheduler),
        vae=tp.vae,
        text_encoder=tp.text_encoder,
        tokenizer=tp.tokenizer,
        text_encoder_2=tp.text_encoder_2,
        tokenizer_2=tp.tokenizer_2,
    ).save_pretrained(tmp_path / "p")
    pipe = OneStepGANPipeline.from_pretrained(tmp_path / "p", dtype=torch.float16)
    gen = Sampler(
        str(tmp_path / "p"),
        device=torch.device("cpu"),
        dtype=torch.float16,
        scheduler="ddim",
        num_inference_steps=1,
        guidance_scale=1.0,
        negative_prompt="",
    )
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for vae, decode in ((pipe.vae, pipe.decode_latents), (gen.pipe.vae, gen.decode)):
        seen = []
        vae.decoder.conv_in.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
        images = decode(latents.half())
        assert seen == [torch.float32] and torch.isfinite(images).all()
        assert vae.dtype == torch.float16  # cast back: the upcast lasts one decode
        vae.register_to_config(force_upcast=False)  # what the code did before: fp16 overflows
        assert not torch.isfinite(decode(latents.half())).all()
    assert torch.isfinite(
        OneStepGANPipeline.from_pretrained(tmp_path / "p", dtype=torch.float16)(
            "a cat", latents=latents, output_type="pt"
        ).images
    ).all()
