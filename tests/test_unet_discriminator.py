"""The teacher-UNet discriminator (distill/discriminators/unet.py): multi-scale heads, zero-initialised noise and
scale convs, only the layers its heads read built, gradient checkpointing; stage two's GAN terms on it
(distill/losses/gan.py: the objectives, R1 in fp32 under autocast, the mismatched-pair permutation)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import pairs_gan_step as _engine
from conftest import text_conditioning as _cond

from distill.discriminators import UNetDiscriminator
from distill.losses.gan import OBJECTIVES, mismatched_condition, objective_loss, r1_penalty
from teachers import load_teacher


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_discriminator_scales_and_zero_init(tiny_teacher_factory, family):
    teacher = load_teacher(str(tiny_teacher_factory(family)))
    disc = UNetDiscriminator(teacher.pipe.unet, timestep=300)
    x, z = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    cond = _cond(teacher, ["a cat", "a dog"])
    logits, out = disc(x, z, cond.prompt_embeds, cond.added_cond_kwargs(), return_features=True)
    # Two up blocks x (before, skip, after) + final: 8x8 before/at the first skip, 16x16 after it.
    assert [tuple(l.shape) for l in logits] == [(2, 1, 8, 8), (2, 1, 8, 8)] + [(2, 1, 16, 16)] * 5
    # Zero-initialised noise / multi-scale convs leave the backbone computing the teacher UNet exactly.
    ref = teacher.pipe.unet(
        x,
        torch.tensor([300, 300]),
        encoder_hidden_states=cond.prompt_embeds,
        added_cond_kwargs=cond.added_cond_kwargs(),
    ).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # ...but they are trainable and the noise condition reaches the output once they move.
    with torch.no_grad():
        disc.noise_conv.weight.normal_()
    assert not torch.allclose(disc(x, z, cond.prompt_embeds, cond.added_cond_kwargs(), return_features=True)[1], ref)
    # The teacher is untouched (a copy).
    assert disc.unet is not teacher.pipe.unet


def test_gan_terms(sd15_teacher):
    teacher = load_teacher(str(sd15_teacher))
    disc = UNetDiscriminator(teacher.pipe.unet)
    cond = _cond(teacher, ["a cat"])
    x, z = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    r1 = r1_penalty(disc, x, noise=z, prompt_embeds=cond.prompt_embeds)
    assert r1.item() > 0
    r1.backward()  # differentiable w.r.t. the discriminator's weights (double backward)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    good, bad = [torch.full((2, 1, 4, 4), 5.0)], [torch.full((2, 1, 4, 4), -5.0)]
    for name, objective in OBJECTIVES.items():
        d_loss = lambda real, fake: objective_loss(real, objective.real) + objective_loss(fake, objective.fake)  # noqa: E731
        assert d_loss(good, bad) < 0.02 < d_loss(bad, good), name
        assert objective_loss(good, objective.generator) < objective_loss(bad, objective.generator), name
    perm = mismatched_condition(5, generator=torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(5)) and all(perm[i] != i for i in range(5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_r1_penalty_is_fp32_under_autocast(sd15_teacher, dtype):
    """The inner autograd.grad is not loss-scaled: with a D whose outputs are small (as at the start of
    training) fp16 gradients underflow. Under autocast the penalty equals the fp32 one."""
    teacher = load_teacher(str(sd15_teacher))
    disc = UNetDiscriminator(teacher.pipe.unet)
    with torch.no_grad():
        for head in disc.heads.values():
            head.net[-1].weight.mul_(1e-3)
            head.net[-1].bias.mul_(1e-3)
    cond = _cond(teacher, ["a cat"])
    x, z, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16).to(dtype), cond.prompt_embeds.to(dtype)
    ref = r1_penalty(disc, x, noise=z.float(), prompt_embeds=emb.float())
    with torch.autocast("cpu", dtype=dtype):  # half conditions, as a caller under autocast may pass them
        r1 = r1_penalty(disc, x, noise=z, prompt_embeds=emb)
    assert r1.dtype == torch.float32 and ref.item() > 0
    torch.testing.assert_close(r1, ref, rtol=1e-6, atol=0)
    r1.backward()  # still differentiable w.r.t. D's weights (double backward) under autocast
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in disc.parameters())


def test_discriminator_gradient_checkpointing_keeps_d_loss_and_r1_gradients(sd15_teacher, monkeypatch):
    """Checkpointing the D backbone recomputes its blocks in the backward, R1's double backward included: the loss
    terms and every gradient equal those without it."""
    from distill.distillation.phases import Batch

    teacher = load_teacher(str(sd15_teacher))
    plain = UNetDiscriminator(teacher.pipe.unet)
    with torch.no_grad():  # non-zero convs so that the gradients reach every input path
        for conv in (plain.noise_conv, *plain.input_convs):
            conv.weight.normal_(std=0.1)
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    gen = torch.Generator().manual_seed(0)
    batch = Batch(
        torch.randn(4, 4, 16, 16, generator=gen),
        torch.randn(4, 4, 16, 16, generator=gen),
        _cond(teacher, ["a cat", "a dog", "a car", "soup"]),
    )
    fake = torch.randn(4, 4, 16, 16, generator=gen)
    results = []
    for disc in (plain, checkpointed):
        terms = _engine(disc, mix_fraction=0.5, r1_gamma=1.0).d_terms(
            batch, fake, torch.Generator().manual_seed(1), r1=True
        )
        sum(v for k, v in terms.items() if not k.endswith("_logit")).backward()
        results.append((terms, {n: p.grad for n, p in disc.named_parameters() if p.grad is not None}))
    assert calls and results[0][0]["d_r1"] > 0  # checkpointing ran (and only in the second D)
    for k in results[0][0]:
        torch.testing.assert_close(results[1][0][k], results[0][0][k], rtol=1e-5, atol=1e-7)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 100
    for n in results[0][1]:
        torch.testing.assert_close(results[1][1][n], results[0][1][n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "heads", [("before",), ("skip",), ("after",), ("before", "skip"), ("before", "skip", "after"), ("final",)]
)
@pytest.mark.parametrize("mode", ["copy", "lora", "shared"])
def test_discriminator_builds_only_what_its_heads_read(sd15_teacher, heads, mode):
    """Every trainable parameter gets a gradient from the heads (DDP without find_unused_parameters
    stops at step 2 otherwise): layers no head reads are not built (or, on a shared backbone, frozen)."""
    teacher = load_teacher(str(sd15_teacher))
    unet = teacher.pipe.unet
    n_up = len(unet.up_blocks)
    disc = UNetDiscriminator(unet, heads=heads, copy_backbone=mode != "shared")
    if mode == "lora":  # as train_student adds it: after construction, on every remaining attention projection
        from peft import LoraConfig

        disc.unet.requires_grad_(False)
        disc.unet.add_adapter(
            LoraConfig(
                r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
            )
        )
    cond = _cond(teacher, ["a cat", "a dog"])
    logits = disc(torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), cond.prompt_embeds)
    sum(l.sum() for l in logits).backward()
    unused = [n for n, p in disc.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]
    kept_up = n_up if {"after", "final"} & set(heads) else n_up - 1 if "before" in heads else 0
    if mode == "shared":  # the caller's UNet keeps its layers; the unread ones are frozen
        assert disc.unet is unet and len(unet.up_blocks) == n_up
        assert unet.conv_out.weight.requires_grad == ("final" in heads)
        return
    assert (disc.unet.conv_out is not None) == ("final" in heads)
    assert len(disc.unet.up_blocks) == kept_up
    assert (disc.unet.mid_block is not None) == bool({"before", "after", "final"} & set(heads))
    assert unet.conv_out is not None and len(unet.up_blocks) == n_up  # the teacher keeps all its layers
