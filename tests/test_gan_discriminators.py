"""From-scratch discriminators: shapes and text conditioning on tiny configs, DiffAugment, feature networks, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.discriminators import (
    LatentDecoder,
    MultiScaleDiscriminator,
    ProjectedDiscriminator,
    UnpairedUNetDiscriminator,
    build_feature_network,
)
from distill.discriminators.inputs import blur, blur_sigma
from distill.losses.diffaugment import DiffAugment
from distill.losses.gan import OBJECTIVES, objective_loss


def _engine(d, generator=None, *, loss="hinge", mismatch_weight=0.0, r1_gamma=0.0, blur_sigma=0.0, side=16):
    """The shared GAN step over the from-scratch view of ``d`` (the prepared and unwrapped module alike), as train_gan
    builds it."""
    from distill.scratch.phases import RealImagesView
    from distill.training.gan_step import GANStep

    view = RealImagesView(
        generator=generator,
        discriminator=d,
        discriminator_unwrapped=d,
        noise_shape=(3, side, side),
        mismatch=mismatch_weight > 0,
    )
    view.blur_sigma = blur_sigma
    return GANStep(
        None,
        view=view,
        generator=generator,
        discriminator=None,
        discriminator_unwrapped=d,
        opt_g=None,
        opt_d=None,
        loss=loss,
        mismatch_weight=mismatch_weight,
        r1_gamma=r1_gamma,
        r1_interval=1,
        max_grad_norm=0.0,
    )


def _text(n, *, seed=0, dim=32):
    return torch.randn(n, 7, dim, generator=torch.Generator().manual_seed(seed))


def _projected(classifier_dir, virtual_batch=2, **kwargs):
    torch.manual_seed(0)
    features = build_feature_network(str(classifier_dir))
    return ProjectedDiscriminator(
        features, context_dim=32, cmap_dim=8, text_dim=16, virtual_batch=virtual_batch, **kwargs
    )


def test_projected_discriminator_shapes_conditioning_and_frozen_features(classifier_dir):
    d = _projected(classifier_dir, augment="").eval()  # eval: spectral norm's power iteration holds still
    x, text = torch.rand(4, 3, 16, 16) * 2 - 1, _text(4)
    logits = d(x, text)
    # DigitClassifier default layers: convs.1 (8 ch, 16x16), convs.4 (16 ch, 8x8), fc (16 features: 1 token).
    assert [tuple(l.shape) for l in logits] == [(4, 1, 256), (4, 1, 64), (4, 1, 1)]
    # The text is read: other prompts, other logits; the same prompt under `mismatched` reproduces them.
    other = d(x, _text(4, seed=1))
    assert all(not torch.allclose(a, b) for a, b in zip(logits, other))
    both = d(x, text, mismatched={"prompt_embeds": _text(2, seed=1)})
    assert [tuple(l.shape) for l in both] == [(6, 1, 256), (6, 1, 64), (6, 1, 1)]
    for a, b, o in zip(logits, both, other):
        torch.testing.assert_close(b[:4], a)
        torch.testing.assert_close(b[4:], o[:2])
    # Only the heads and the text pooling train; the feature network stays frozen and in eval mode.
    d.train()
    assert not d.features.net.training and not any(p.requires_grad for p in d.features.parameters())
    sum(l.sum() for l in d(x, text)).backward()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "virtual_batch, augment, mixed",
    [(4, "", False), (0, "", False), (0, "color,translation,cutout", False), (4, "color,translation,cutout", True)],
)
def test_projected_discriminator_learns_real_from_generated(classifier_dir, virtual_batch, augment, mixed):
    """A few hinge steps on fixed real / generated images (squares vs blurry noise) separate their logits. (With
    virtual batch norm per part and DiffAugment on, 30 steps are not enough here; with shared statistics they are.)"""
    from distill.scratch.phases import RealBatch
    from students.text import TextConditioning

    d = _projected(classifier_dir, virtual_batch=virtual_batch, augment=augment, mixed_norm=mixed)
    real = -torch.ones(8, 3, 16, 16)
    for i in range(8):
        real[i, :, 2 + i % 4 : 10 + i % 4, 3:11] = 1.0
    fake = torch.nn.functional.avg_pool2d(
        torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), 3, 1, 1
    )
    batch = RealBatch(real, TextConditioning(_text(8)), [f"c{i}" for i in range(8)])
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=2e-3, betas=(0.0, 0.99))
    gaps = []
    for step in range(30):
        terms = _engine(d).d_terms(batch, (fake, [fake], batch.cond), torch.Generator().manual_seed(step))
        opt.zero_grad()
        (terms["d_real"] + terms["d_fake"]).backward()
        opt.step()
        gaps.append((terms["d_real_logit"] - terms["d_fake_logit"]).item())
    assert gaps[-1] > 0.5 and terms["d_real"] + terms["d_fake"] < 1.5, gaps


def test_virtual_batch_norm_keeps_parts_apart(classifier_dir):
    """Real and generated halves of one forward are normalised by their own statistics, as if run separately."""
    d = _projected(classifier_dir, augment="", virtual_batch=8).eval()
    a, b = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 0.1
    text = _text(4)
    joint = d(torch.cat([a, b]), torch.cat([text, text]), parts=2)
    for j, alone in zip(joint, d(a, text)):
        torch.testing.assert_close(j[:4], alone, rtol=1e-4, atol=1e-5)
    mixed = d(torch.cat([a, b]), torch.cat([text, text]), parts=1)  # one virtual batch of 8: other statistics
    assert not torch.allclose(mixed[0][:4], joint[0][:4], atol=1e-4)


def test_mixed_virtual_batch_norm_shares_the_statistics_of_the_parts():
    """Per part (StyleGAN-T), a generated part scaled by 3 normalises to the same features: the difference is gone.
    Mixed, each virtual batch holds sample i of every part, so it stays; and it is the plain norm of that
    interleaving."""
    from distill.discriminators.projected import VirtualBatchNorm

    x = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(0))  # parts: x[:4] real, x[4:] generated
    scaled = torch.cat([x[:4], 3 * x[4:]])
    separate, mixed = VirtualBatchNorm(3, virtual_batch=4), VirtualBatchNorm(3, virtual_batch=4, mixed=True)
    torch.testing.assert_close(separate(scaled, parts=2), separate(x, parts=2))
    assert not torch.allclose(mixed(scaled, parts=2)[4:], mixed(x, parts=2)[4:], atol=1e-3)
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # interleaved: two pairs per virtual batch of 4
    torch.testing.assert_close(mixed(x, parts=2)[order], separate(x[order], parts=1))


def test_mixed_norm_discriminator_normalises_generated_samples_with_real_ones(classifier_dir):
    """The generator's phase passes real samples beside the generated ones; their logits are not G's."""
    from distill.scratch.phases import RealBatch
    from students.text import TextConditioning

    d = _projected(classifier_dir, augment="", virtual_batch=4, mixed_norm=True).eval()
    assert d.needs_reference and not _projected(classifier_dir).needs_reference
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = RealBatch(real, TextConditioning(_text(4)), [f"c{i}" for i in range(4)])

    class G(torch.nn.Module):
        def forward(self, noise, prompt_embeds, added_cond_kwargs=None, return_pyramid=False):
            return noise, [noise]

    (noise, _, _), terms = _engine(d, G()).g_terms(batch, torch.Generator().manual_seed(0))
    logits = d(torch.cat([noise, real]), torch.cat([batch.cond.prompt_embeds] * 2), parts=2)
    torch.testing.assert_close(terms["g_adv"], objective_loss([l[:4] for l in logits], OBJECTIVES["hinge"].generator))


def test_projected_discriminator_decodes_latents(classifier_dir, sd15_teacher):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd15_teacher, subfolder="vae")
    d = _projected(classifier_dir, augment="", decode=LatentDecoder(vae))
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)  # the tiny VAE halves 16 px
    logits = d(latents, _text(2))
    sum(l.sum() for l in logits).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0  # G's gradient passes through the decoder
    assert not any(p.requires_grad for p in d.decode.parameters())


def test_multiscale_discriminator_reads_the_pyramid_and_text():
    torch.manual_seed(0)
    d = MultiScaleDiscriminator(
        in_channels=4, resolution=16, context_dim=32, channels=(8, 16, 16), text_dim=16, cmap_dim=8, augment=""
    )
    x, text = torch.randn(3, 4, 16, 16), _text(3)
    logits = d(x, text)
    # Scale 16 -> blocks 0, 1, 2 (8, 4, 2 px); scale 8 -> blocks 1, 2; scale 4 -> block 2.
    assert [tuple(l.shape[-2:]) for l in logits] == [(8, 8), (4, 4), (2, 2), (4, 4), (2, 2), (2, 2)]
    assert all(l.shape[:2] == (3, 1) for l in logits)
    coarse = [torch.randn(3, 4, 4, 4), torch.randn(3, 4, 8, 8), x]
    from_pyramid = d(x, text, pyramid=coarse)  # coarser scales come from the pyramid, not from x
    torch.testing.assert_close(from_pyramid[0], logits[0])
    assert not torch.allclose(from_pyramid[3], logits[3])
    assert not torch.allclose(d(x, _text(3, seed=1))[0], logits[0])
    with pytest.raises(ValueError, match="pyramid sides"):
        d(x, text, pyramid=[torch.randn(3, 4, 2, 2), x])
    with pytest.raises(ValueError, match="must be divisible by 2\\*\\*3"):
        MultiScaleDiscriminator(in_channels=4, resolution=12, context_dim=32, channels=(8, 16, 16))
    both = d(x, text, mismatched={"prompt_embeds": _text(1, seed=1)})
    torch.testing.assert_close(both[0][3:], d(x[:1], _text(1, seed=1))[0])


def test_multiscale_discriminator_can_downsample_generated_samples_as_real_ones():
    """generator_pyramid=False: the phases pass no pyramid, and D reads a generated sample's coarse scales from its
    output."""
    from distill.scratch.phases import RealBatch
    from students import GigaGANGenerator
    from students.text import TextConditioning

    torch.manual_seed(0)
    gen = GigaGANGenerator.for_latents(latent_channels=3, sample_size=16, cross_attention_dim=32, size="tiny")
    d = MultiScaleDiscriminator(
        in_channels=3,
        resolution=16,
        context_dim=32,
        channels=(8, 16),
        text_dim=16,
        cmap_dim=8,
        augment="",
        generator_pyramid=False,
    )
    seen = []
    d.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("pyramid")), with_kwargs=True)
    batch = RealBatch(torch.rand(4, 3, 16, 16) * 2 - 1, TextConditioning(_text(4)), ["a", "b", "c", "d"])
    engine = _engine(d, gen, loss="non_saturating")
    (fake, pyramid, cond), _ = engine.g_terms(batch, torch.Generator().manual_seed(0))
    engine.d_terms(batch, (fake.detach(), pyramid, cond), torch.Generator().manual_seed(0))
    assert seen == [None, None]
    x = torch.rand(2, 3, 16, 16)
    assert all(
        torch.equal(a, b)
        for a, b in zip(d(x, _text(2)), d(x, _text(2), pyramid=[F.interpolate(x, size=8, mode="area"), x]))
    )


def test_discriminator_ensemble_concatenates_its_members_logits(classifier_dir):
    from distill.discriminators import DiscriminatorEnsemble

    projected = _projected(classifier_dir, augment="").eval()
    multiscale = MultiScaleDiscriminator(
        in_channels=3,
        resolution=16,
        context_dim=32,
        channels=(8, 16),
        text_dim=16,
        cmap_dim=8,
        augment="",
        generator_pyramid=False,
        mbstd_group=2,
    )
    both = DiscriminatorEnsemble([projected, multiscale]).eval()
    x, text = torch.rand(4, 3, 16, 16) * 2 - 1, _text(4)
    got = both(x, text, parts=2, mismatched={"prompt_embeds": _text(2, seed=1)})
    want = projected(x, text, parts=2, mismatched={"prompt_embeds": _text(2, seed=1)}) + multiscale(
        x, text, parts=2, mismatched={"prompt_embeds": _text(2, seed=1)}
    )
    assert len(got) == len(want) == 3 + 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not both.uses_pyramid and not both.needs_reference
    with pytest.raises(ValueError, match="d_pyramid downsample"):  # the phases pass one pyramid for all members: none
        DiscriminatorEnsemble(
            [projected, MultiScaleDiscriminator(in_channels=3, resolution=16, context_dim=32, channels=(8, 16))]
        )


def test_unpaired_unet_discriminator(sd15_teacher):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15_teacher, subfolder="unet")
    d = UnpairedUNetDiscriminator(unet, augment="", heads=("before", "final"))
    assert d.disc.noise_conv is None
    x, text = torch.randn(2, 4, 16, 16), _text(2)
    logits = d(x, text)
    assert all(l.shape[0] == 2 for l in logits)
    assert not torch.allclose(d(x, _text(2, seed=1))[-1], logits[-1])
    both = d(x, text, mismatched={"prompt_embeds": _text(1, seed=1)})
    torch.testing.assert_close(both[-1][:2], logits[-1], rtol=1e-4, atol=1e-5)


def test_diffaugment_is_differentiable_and_seeded():
    aug = DiffAugment()
    assert aug.policy == ("color", "translation", "cutout")
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    y = aug(x, generator=gen())
    torch.testing.assert_close(y, aug(x, generator=gen()))
    assert not torch.allclose(y, aug(x, generator=torch.Generator().manual_seed(1)))
    assert ((y == 0).flatten(1).float().mean(1) > 0.2).all()  # cutout: a quarter of every image, at least
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(DiffAugment("")(x), x)


def test_blur_fades_out():
    assert blur_sigma(nimg=0, init_sigma=2.0, fade_kimg=10) == 2.0
    assert blur_sigma(nimg=5000, init_sigma=2.0, fade_kimg=10) == pytest.approx(1.0)
    assert blur_sigma(nimg=20000, init_sigma=2.0, fade_kimg=10) == 0.0
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(blur(x, 0.0), x)
    assert blur(x, 1.0).std() < 0.7 * x.std()


def test_hinge_and_non_saturating_objectives():
    good, bad = [torch.full((2, 1, 4), 3.0)], [torch.full((2, 1, 4), -3.0)]
    hinge = OBJECTIVES["hinge"]
    assert objective_loss(good, hinge.real) == 0 and objective_loss(bad, hinge.fake) == 0
    assert objective_loss(bad, hinge.real) == pytest.approx(4.0)
    assert objective_loss(good, hinge.generator) == pytest.approx(-3.0)
    ns = OBJECTIVES["non_saturating"]
    assert objective_loss(good, ns.real) < 0.05 < objective_loss(bad, ns.real)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torchvision:resnet18", "resnet18-f37072fd.pth"),
        ("timm:vit_small_patch16_224.dino", "hf download timm/vit_small_patch16_224.dino"),
        ("/no/such/folder", "neither torchvision:/timm:/open_clip: nor a classifier folder"),
    ],
)
def test_missing_feature_weights_are_one_line(spec, message, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises((FileNotFoundError, ValueError)) as exc:
        build_feature_network(spec)
    line = str(exc.value)
    assert message in line and "\n" not in line


def test_torchvision_and_timm_feature_layers_with_random_weights():
    """Architecture and hooks only (random weights: tests); a ViT's tokens come out as [N, C, L]."""
    resnet = build_feature_network("torchvision:resnet18", weights="random", resolution=32)
    assert [s[0] for s in resnet.shapes()] == [64, 128, 256, 512]
    vit = build_feature_network("timm:vit_tiny_patch16_224", weights="random")
    assert vit.layers == ("blocks.2", "blocks.5", "blocks.8", "blocks.11") and vit.shapes()[0] == (192, 197)
    with pytest.raises(ValueError, match="has no layer"):
        build_feature_network("torchvision:resnet18", weights="random", layers=("nope",))


@pytest.mark.parametrize("kind", ["projected", "multiscale"])
def test_diffaugment_sits_before_every_discriminator_read_in_both_phases(classifier_dir, kind):
    """What D's network reads is always the DiffAugmented sample: generated ones in the G phase (with G's gradient
    passing through the augmentation), real and generated ones in the D phase; nothing reaches D un-augmented."""
    from distill.scratch.phases import RealBatch
    from students import GigaGANGenerator
    from students.text import TextConditioning

    torch.manual_seed(0)
    gen = GigaGANGenerator.for_latents(latent_channels=3, sample_size=16, cross_attention_dim=32, size="tiny")
    if kind == "projected":
        d = _projected(classifier_dir)
        network = d.features
    else:
        d = MultiScaleDiscriminator(
            in_channels=3, resolution=16, context_dim=32, channels=(8, 16), text_dim=16, cmap_dim=8
        )
        network = d.from_input[0]
    seen = {"augment_out": [], "network_in": []}
    d.augment.register_forward_hook(lambda m, args, out: seen["augment_out"].append(out))
    network.register_forward_pre_hook(lambda m, args: seen["network_in"].append(args[0]))
    batch = RealBatch(torch.rand(4, 3, 16, 16) * 2 - 1, TextConditioning(_text(4)), ["a", "b", "c", "d"])
    (fake, pyramid, cond), terms = _engine(d, gen).g_terms(batch, torch.Generator().manual_seed(0))
    assert seen["network_in"] and all(any(a is n for a in seen["augment_out"]) for n in seen["network_in"])
    assert not any(
        a.shape == fake.shape and torch.allclose(a, fake) for a in seen["augment_out"]
    )  # augmented, not the raw sample
    terms["g_adv"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())  # through the augmentation
    seen["augment_out"].clear(), seen["network_in"].clear()
    _engine(d, gen, mismatch_weight=1.0, r1_gamma=1.0, blur_sigma=0.5).d_terms(
        batch, (fake.detach(), pyramid, cond), torch.Generator().manual_seed(0), r1=True
    )
    # D phase (real | generated in one forward) and R1 (real): every network input is an augmentation output.
    assert len(seen["network_in"]) >= 2 and all(any(a is n for a in seen["augment_out"]) for n in seen["network_in"])
    assert seen["network_in"][0].shape[0] == 8  # real and generated together


def test_minibatch_std_sees_a_collapsed_part_and_keeps_parts_apart():
    from distill.discriminators.minibatch_std import minibatch_std

    torch.manual_seed(0)
    real = torch.randn(8, 3, 4, 4)
    collapsed = torch.randn(1, 3, 4, 4).expand(8, -1, -1, -1)  # one image whatever the noise
    out = minibatch_std(torch.cat([real, collapsed]), group_size=4, parts=2)
    assert out.shape == (16, 4, 4, 4) and torch.equal(out[:, :3], torch.cat([real, collapsed]))
    stat = out[:, 3, 0, 0]
    assert (stat[:8] > 0.5).all() and (stat[8:] < 1e-3).all()  # no group mixes the parts
    assert torch.equal(stat[:4], stat[:4].flip(0)) and not torch.equal(stat[0], stat[4])  # one value per group
    # A part not divisible by the group size uses the largest group that divides it.
    assert minibatch_std(torch.randn(6, 2, 3, 3), group_size=4, parts=1)[:, 2, 0, 0].unique().numel() == 2
    with pytest.raises(ValueError, match="parts"):
        minibatch_std(torch.randn(5, 2, 3, 3), group_size=4, parts=2)


@pytest.mark.parametrize("kind", ["projected", "multiscale"])
@pytest.mark.parametrize("mbstd_group", [4, 0])
def test_minibatch_std_lets_d_separate_a_collapsed_batch(classifier_dir, kind, mbstd_group):
    """Trained alone for a few steps, D with minibatch-std tells a varied batch from one repeated image per group of 4,
    both drawn from the same distribution per sample; without it (a per-sample D: each image alone looks the same, and
    the projected D's batch norm per part rescales a small spread away) it cannot."""
    torch.manual_seed(0)
    if kind == "projected":
        d = _projected(classifier_dir, virtual_batch=8, augment="", mbstd_group=mbstd_group)
    else:
        d = MultiScaleDiscriminator(
            in_channels=3,
            resolution=16,
            context_dim=32,
            channels=(8, 16),
            text_dim=16,
            cmap_dim=4,
            augment="",
            mbstd_group=mbstd_group,
        )
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=3e-3, betas=(0.0, 0.99))
    text = _text(16).mean(dim=0, keepdim=True).expand(16, -1, -1)  # one prompt: only the spread tells the parts apart
    draw = lambda: torch.cat([torch.rand(8, 3, 16, 16), torch.rand(2, 3, 16, 16).repeat_interleave(4, 0)]) * 2 - 1  # noqa: E731
    for _ in range(60):
        logits = d(draw(), text, parts=2)
        loss = sum(
            torch.nn.functional.softplus(-l[:8]).mean() + torch.nn.functional.softplus(l[8:]).mean() for l in logits
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = d(draw(), text, parts=2)
    gap = torch.stack([l[:8].mean() - l[8:].mean() for l in logits]).mean()
    assert (gap > 1.0) if mbstd_group else (gap < 0.5), gap


def test_mode_seeking_pairs_two_noise_maps_of_one_caption():
    """MSGAN's term: the second half of the generated batch takes the first half's captions with other noise; the term
    is weight / (mean image distance / mean noise distance + 1e-5), by hand here; D judges each sample under its own
    caption."""
    from distill.scratch.phases import RealBatch
    from students.text import TextConditioning

    class G(torch.nn.Module):
        def forward(self, noise, prompt_embeds, added_cond_kwargs=None, return_pyramid=False):
            out = 0.5 * noise + prompt_embeds.mean(dim=(1, 2))[:, None, None, None]
            return out, [out]

    d = MultiScaleDiscriminator(
        in_channels=3,
        resolution=16,
        context_dim=32,
        channels=(8,),
        text_dim=16,
        cmap_dim=8,
        augment="",
        generator_pyramid=False,
    )
    text = _text(5)
    batch = RealBatch(torch.rand(5, 3, 16, 16), TextConditioning(text), [f"c{i}" for i in range(5)])
    engine = _engine(d, G())
    engine.view.mode_seeking_weight = 0.1
    (fake, _, cond), terms = engine.g_terms(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        cond.prompt_embeds, text[[0, 1, 0, 1, 4]]
    )  # pairs (0, 2) and (1, 3); an odd sample keeps its own
    noise = (fake - cond.prompt_embeds.mean(dim=(1, 2))[:, None, None, None]) / 0.5
    ratio = (fake[:2] - fake[2:4]).abs().mean() / (noise[:2] - noise[2:4]).abs().mean()
    torch.testing.assert_close(terms["g_mode_seeking"], 0.1 / (ratio + 1e-5))
    assert ratio.item() == pytest.approx(0.5, rel=1e-4)
    seen = []
    d.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["prompt_embeds"]), with_kwargs=True)
    engine.d_terms(batch, (fake.detach(), [fake.detach()], cond), torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[-1], torch.cat([text, text[[0, 1, 0, 1, 4]]]))  # real | generated, each its caption
    engine.view.mode_seeking_weight = 0.0
    (_, _, cond), terms = engine.g_terms(batch, torch.Generator().manual_seed(0))
    assert "g_mode_seeking" not in terms and torch.equal(cond.prompt_embeds, text)
