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
    assert out.mean().abs() < 0.1 and 0 < out.std() < 0.5


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
    assert torch.equal(plain(noise, emb), plain(noise, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}))


@pytest.mark.parametrize("cls", GENERATORS)
def test_bad_inputs_raise_one_line(cls):
    model = make(cls, size="small")  # three levels: sides must be multiples of 4
    noise, emb = inputs()
    for bad, match in [((noise[..., :14, :14], emb), "divisible by 4"), ((noise[:, :3], emb), r"\[N,4,H,W\]"),
                       ((noise, emb[..., :16]), "prompt_embeds")]:
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
    student = cls.for_latents(latent_channels=teacher.vae.config.latent_channels, sample_size=teacher.unet.config.sample_size,
                              cross_attention_dim=teacher.text_encoder.config.hidden_size, size="tiny")
    pipe = OneStepGANPipeline(student=student, vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer)
    prompts = ["a red apple", "a photo of a cat"]
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    before = pipe(prompts, latents=noise, output_type="latent").images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = OneStepGANPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.student) is cls
    after = loaded(prompts, latents=noise, output_type="latent").images
    assert before.shape == (2, 4, 16, 16) and torch.equal(before, after)
    assert loaded(prompts, latents=noise, output_type="pt").images.shape == (2, 3, 32, 32)
