"""GigaGAN and StyleGAN-T students: the generator interface, save/load, the pipeline, and fitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from students import GigaGANGenerator, OneStepGANPipeline, StyleGANTGenerator

GENERATORS = [GigaGANGenerator, StyleGANTGenerator]
D = 32  # the tiny teachers' and the digits teacher's text width


def make(cls, size: str = "tiny", **kwargs):
    torch.manual_seed(0)
    return cls.for_latents(latent_channels=4, sample_size=16, cross_attention_dim=D, size=size, **kwargs)


def inputs(n: int = 2, side: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, side, side, generator=gen), torch.randn(n, 77, D, generator=gen)


def test_modulated_conv_matches_per_sample_kernels():
    """The K-output mixing and Gram-matrix demodulation equal the direct per-sample kernel
    ``sum_k p_k W_k * s``, demodulated, in a grouped conv (StyleGAN2 §2.2, GigaGAN §3.2)."""
    from students._layers import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, num_kernels=3)
    with torch.no_grad():
        conv.bias.normal_()
    s, p = torch.randn(2, 6), torch.randn(2, 3).softmax(1)
    w = torch.einsum("nk,koiab->noiab", p, conv.weight * conv.scale) * s[:, None, :, None, None]
    w = w * torch.rsqrt(w.square().sum((2, 3, 4), keepdim=True) + 1e-8)
    for side in (5, 9):  # below and above per_sample_min_pixels: both evaluation paths
        x = torch.randn(2, 6, side, side)
        ref = F.conv2d(x.reshape(1, 12, side, side), w.reshape(10, 6, 3, 3), padding=1, groups=2).view(2, 5, side, side)
        torch.testing.assert_close(conv(x, s, p), ref + conv.bias[:, None, None], rtol=1e-4, atol=1e-5)


def test_gigagan_self_attention_uses_l2_logits():
    from students.gigagan import StyledSelfAttention

    torch.manual_seed(0)
    attn = StyledSelfAttention(8, w_dim=4, head_dim=8)
    torch.nn.init.normal_(attn.out.weight)
    x, w = torch.randn(2, 8, 3, 3), torch.randn(2, 4)
    tokens = attn.norm(x).flatten(2).transpose(1, 2)
    context = torch.cat([tokens, attn.w_token(w)[:, None]], 1)
    q, k, v = attn.qk(tokens), attn.qk(context), attn.v(context)
    weights = (-torch.cdist(q, k).square() / 8**0.5).softmax(-1)
    ref = x + attn.out(weights @ v).transpose(1, 2).reshape(2, 8, 3, 3)
    torch.testing.assert_close(attn(x, w), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", GENERATORS)
@pytest.mark.parametrize("hw", [(16, 16), (32, 32), (16, 24)])
def test_shape_and_small_initial_output(cls, hw):
    noise, emb = inputs(side=32)
    noise = noise[..., : hw[0], : hw[1]]
    out = make(cls)(noise, emb)
    assert out.shape == noise.shape
    # Training starts from near-zero latents, not from large random ones.
    assert 0 < out.square().mean().sqrt() < 0.5 and out.std() > 0


@pytest.mark.parametrize("cls", GENERATORS)
def test_gradients_reach_every_parameter(cls):
    """No exceptions: every parameter gets a gradient. Zero-initialised outputs (attention, per-level
    noise injections) give the layers behind them zero gradients at step 0, so after one Adam step
    every gradient must also be nonzero."""
    model = make(cls)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        model(*inputs()).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == []
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        if step == 1:
            assert [n for n, p in model.named_parameters() if not p.grad.any()] == []
        opt.step()


@pytest.mark.parametrize("cls", GENERATORS)
def test_conditioning_and_determinism(cls):
    model = make(cls)
    noise, emb = inputs()
    out = model(noise, emb)
    assert torch.equal(out, model(noise, emb))
    other_noise, other_emb = inputs(seed=1)
    assert (model(noise, other_emb) - out).abs().max() > 1e-4
    assert (model(other_noise, emb) - out).abs().max() > 1e-4


@pytest.mark.parametrize("cls", GENERATORS)
def test_save_pretrained_round_trip(cls, tmp_path):
    model = make(cls)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded.latent_channels == 4 and loaded.sample_size == 16
    noise, emb = inputs(side=32)
    assert torch.equal(model(noise, emb), loaded(noise, emb))


@pytest.mark.parametrize("cls", GENERATORS)
def test_sdxl_pooled_text(cls):
    model = make(cls, pooled_dim=16)
    noise, emb = inputs()
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(2, 1)
    pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    out = model(noise, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert out.shape == noise.shape
    other = model(noise, emb, added_cond_kwargs={"text_embeds": -pooled, "time_ids": time_ids})
    assert (other - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pooled_dim=16"):
        model(noise, emb)
    # Without pooled_dim the SD1.x generator ignores SDXL's extras.
    plain = make(cls)
    assert torch.equal(
        plain(noise, emb), plain(noise, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    )


@pytest.mark.parametrize("cls", GENERATORS)
def test_bad_inputs_raise_one_line(cls):
    model = make(cls, size="small")  # three levels: sides must be multiples of 4
    noise, emb = inputs()
    for bad, match in [
        ((noise[..., :14, :14], emb), "divisible by 4"),
        ((noise[:, :3], emb), r"\[N,4,H,W\]"),
        ((noise, emb[..., :16]), "prompt_embeds"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            model(*bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown size"):
        make(cls, size="huge")


@pytest.mark.parametrize("cls", GENERATORS)
def test_preset_sizes(cls):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 1_000 < count(make(cls)) < 100_000
    assert 1_000_000 < count(make(cls, size="small")) < 4_000_000


@pytest.mark.parametrize("cls", GENERATORS)
def test_fits_a_fixed_target(cls):
    """A few Adam steps of noise -> latent MSE regression lower the loss: the generator can fit."""
    model = make(cls)
    noise, emb = inputs(n=4)
    target = 0.5 * torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(noise, emb), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("cls", GENERATORS)
def test_pipeline_round_trip(cls, sd15_teacher, tmp_path):
    from diffusers import StableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(sd15_teacher)
    torch.manual_seed(0)
    student = cls.for_latents(
        latent_channels=teacher.vae.config.latent_channels,
        sample_size=teacher.unet.config.sample_size,
        cross_attention_dim=teacher.text_encoder.config.hidden_size,
        size="tiny",
    )
    pipe = OneStepGANPipeline(
        student=student, vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer
    )
    prompts = ["a red apple", "a photo of a cat"]
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    before = pipe(prompts, latents=noise, output_type="latent").images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = OneStepGANPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.student) is cls
    after = loaded(prompts, latents=noise, output_type="latent").images
    assert before.shape == (2, 4, 16, 16) and torch.equal(before, after)
    assert loaded(prompts, latents=noise, output_type="pt").images.shape == (2, 3, 32, 32)


# ---- StyleGAN machinery: equalised learning rate, mapping network, truncation, text branch, pyramid


def test_equal_linear_runtime_scale_and_adam_step():
    """Equalised learning rate (ProGAN §4.1): the stored weight is N(0, 1/lr_mul^2), the layer uses it
    times lr_mul/sqrt(fan_in), so the effective weight has He scale and one Adam step (about lr per
    stored parameter) moves it by lr * lr_mul relative to that scale, whatever the fan-in."""
    from students._layers import EqualLinear

    torch.manual_seed(0)
    for fan_in, lr_mul in [(64, 1.0), (256, 1.0), (256, 0.01)]:
        layer = EqualLinear(fan_in, 512, lr_mul=lr_mul)
        assert layer.weight_gain == pytest.approx(lr_mul / fan_in**0.5)
        effective = layer.weight * layer.weight_gain
        assert effective.std().item() == pytest.approx(fan_in**-0.5, rel=0.05)
        x = torch.randn(8, fan_in)
        torch.testing.assert_close(layer(x), x @ effective.T + layer.bias * lr_mul)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        before = effective.detach().clone()
        layer(x).square().sum().backward()
        opt.step()
        relative = (layer.weight * layer.weight_gain - before).abs().mean() / before.abs().mean()
        assert relative.item() == pytest.approx(
            1e-3 * lr_mul / (2 / torch.pi) ** 0.5, rel=0.1
        )  # E|N(0,1)| = sqrt(2/pi)


@pytest.mark.parametrize("cls", GENERATORS)
def test_mapping_network_is_styleganlike(cls):
    """Equalised linears at lr_mul 0.01 in the mapping network, equalised style affines, linear last layer."""
    from students._layers import EqualLinear, StyledConv, lrelu

    model = make(cls)
    layers = model.mapping.layers
    assert all(isinstance(layer, EqualLinear) and layer.bias_gain == 0.01 for layer in layers) and len(layers) >= 2
    affines = [m.affine for m in model.modules() if isinstance(m, StyledConv)]
    assert affines and all(isinstance(a, EqualLinear) and a.bias_gain == 1.0 for a in affines)
    x = torch.randn(5, layers[0].weight.shape[1])
    expected = x
    for layer in layers[:-1]:
        expected = lrelu(layer(expected))
    torch.testing.assert_close(model.mapping(x), layers[-1](expected))  # no activation after the last layer
    assert (model.mapping(x) < -0.5).any()  # so w reaches values lrelu(.) * sqrt(2) rarely would


@pytest.mark.parametrize("cls", GENERATORS)
def test_truncation_psi(cls):
    """psi = 0: the prompt's mean image, the same for any noise; psi = 1: no truncation; prompts still differ."""
    model = make(cls).eval()
    noise, emb = inputs(n=3)
    one_prompt = emb[:1].expand(3, -1, -1)
    mean_image = model(noise, one_prompt, truncation_psi=0.0)
    torch.testing.assert_close(mean_image, mean_image[:1].expand(3, -1, -1, -1))
    other_prompt = model(noise, emb[1:2].expand(3, -1, -1), truncation_psi=0.0)
    assert (other_prompt - mean_image).abs().max() > 1e-4
    torch.testing.assert_close(model(noise, emb, truncation_psi=1.0), model(noise, emb))
    half = model(noise, one_prompt, truncation_psi=0.5)
    spread = lambda x: (x - x.mean(0, keepdim=True)).square().mean()  # noqa: E731
    assert 0 < spread(half) < spread(model(noise, one_prompt))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="truncation_psi"):
            model(noise, emb, truncation_psi=bad)


def test_stylegan_t_tracks_the_mean_style_in_training_only():
    from students._layers import pixel_norm

    model = make(StyleGANTGenerator)
    assert torch.equal(model.w_avg, torch.zeros_like(model.w_avg))
    noise, emb = inputs(n=8)
    with torch.no_grad():
        model(noise, emb)  # no gradient: sampling, not a training step
    assert not model.w_avg.any()
    model.train()
    for _ in range(3):
        model(noise, emb).mean().backward()
    with torch.no_grad():
        f = model.mapping(pixel_norm(model.noise_code(noise)))
    expected = f.mean(0) * (1 - model.w_avg_beta**3)  # three decays from zero towards the batch mean
    torch.testing.assert_close(model.w_avg, expected, rtol=1e-4, atol=1e-6)
    model.eval()
    before = model.w_avg.clone()
    model(noise, emb)
    assert torch.equal(model.w_avg, before)


def test_gigagan_text_branch_is_a_transformer():
    """GigaGAN §3.1: learned transformer layers on the frozen encoder's tokens give t_local (one per
    token) and t_global (the learned global token's output); both carry the prompt."""
    from students._layers import TextTransformer

    model = make(GigaGANGenerator, size="small")
    assert isinstance(model.text, TextTransformer) and len(model.text.blocks) == 2
    _, emb = inputs(n=2)
    t_global, t_local = model.text(emb)
    assert t_global.shape == (2, model.config.text_dim) and t_local.shape == (2, 77, model.config.text_dim)
    other_global, other_local = model.text(inputs(n=2, seed=1)[1])
    assert (other_global - t_global).abs().max() > 1e-4 and (other_local - t_local).abs().max() > 1e-4
    assert any(p.requires_grad for p in model.text.blocks.parameters())


@pytest.mark.parametrize("cls", GENERATORS)
def test_image_pyramid_outputs(cls):
    model = make(cls, size="small")  # three levels
    noise, emb = inputs(side=32)
    out, pyramid = model(noise, emb, return_pyramid=True)
    assert [tuple(p.shape) for p in pyramid] == [(2, 4, 8, 8), (2, 4, 16, 16), (2, 4, 32, 32)]
    assert torch.equal(pyramid[-1], out) and torch.equal(out, model(noise, emb))


@pytest.mark.parametrize("cls", GENERATORS)
def test_pipeline_truncation_interpolation_and_style_mixing(cls, sd15_teacher):
    from diffusers import StableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(sd15_teacher)
    torch.manual_seed(0)
    student = cls.for_latents(
        latent_channels=4, sample_size=16, cross_attention_dim=teacher.text_encoder.config.hidden_size, size="tiny"
    ).eval()
    pipe = OneStepGANPipeline(
        student=student, vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer
    )
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = pipe(["a cat", "a cat"], latents=noise, output_type="latent").images
    mean = pipe(["a cat", "a cat"], latents=noise, output_type="latent", truncation_psi=0.0).images
    torch.testing.assert_close(mean[0], mean[1])
    assert (plain[0] - plain[1]).abs().max() > 1e-4

    path = pipe.interpolate("a cat", latents=noise, num_images=5, output_type="latent").images
    assert path.shape == (5, 4, 16, 16)
    torch.testing.assert_close(path[0], plain[0], rtol=1e-4, atol=1e-5)  # the end points are the plain samples
    torch.testing.assert_close(path[-1], plain[1], rtol=1e-4, atol=1e-5)
    steps = (path[1:] - path[:-1]).flatten(1).norm(dim=1)
    assert steps.max() < (path[-1] - path[0]).norm()  # a path, not a jump

    coarse, fine = noise[:1], noise[1:]
    mixed = lambda c: pipe.style_mix("a cat", coarse, fine, crossover=c, output_type="latent").images  # noqa: E731
    torch.testing.assert_close(mixed(0), plain[1:], rtol=1e-4, atol=1e-5)  # everything from the fine sample
    torch.testing.assert_close(mixed(student.num_levels), plain[:1], rtol=1e-4, atol=1e-5)
    middle = mixed(1)
    assert (middle - plain[:1]).abs().max() > 1e-5 and (middle - plain[1:]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="crossover"):
        mixed(student.num_levels + 1)


def test_unet_student_pipeline_refuses_style_operations(sd15_teacher):
    from diffusers import StableDiffusionPipeline

    from students import UNetStudent

    teacher = StableDiffusionPipeline.from_pretrained(sd15_teacher)
    pipe = OneStepGANPipeline(
        student=UNetStudent.from_teacher(teacher.unet, teacher.scheduler),
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
    )
    with pytest.raises(ValueError, match="style-based student"):
        pipe("a cat", truncation_psi=0.5, output_type="latent")
    with pytest.raises(ValueError, match="style-based student"):
        pipe.interpolate("a cat", num_images=3)
