"""Stage two's units (distill/distillation/): how the teacher-UNet D sees pairs (phases.py: PairsView's
mix-and-match term, GAN fakes from fresh noise) and a micro-batch's pairs rows (pair_data.py, read ahead by
distill/training/prefetch.py). train_student.py's runs are in test_train_student.py."""

from __future__ import annotations

import pytest
import torch
from conftest import pairs_gan_step as _engine


def test_mix_and_match_shuffles_noise_and_prompt_independently_into_its_own_term():
    """Mismatched real pairs: the noise always another sample's, the prompt independently the own one
    (noise-only mismatch) or another's; their loss is a third term, not averaged into the fake one."""
    import torch.nn.functional as F

    from distill.distillation.phases import Batch, PairsView
    from distill.training.gan_step import GANStep
    from students import TextConditioning

    n = 16
    ids = torch.arange(1, n + 1, dtype=torch.float32)
    tag = lambda shape: ids.view(n, *[1] * len(shape)).expand(n, *shape).clone()  # noqa: E731  row i holds i + 1
    batch = Batch(noise=tag((1, 2, 2)), target=tag((1, 2, 2)), cond=TextConditioning(tag((3, 4))))
    mismatched = []

    def spy(latents, noise, prompt_embeds, added_cond_kwargs=None):
        lat, z, c = (t.flatten(1)[:, 0] for t in (latents, noise, prompt_embeds))
        logits = torch.full_like(lat, 0.5)  # mismatched
        logits[lat < 0] = -1.0  # generated
        logits[(z == lat) & (c == lat)] = 2.0  # real
        mismatched.extend((int(a), int(b), int(d)) for a, b, d in zip(lat, z, c) if a > 0 and (b != a or d != a))
        return [logits.view(-1, 1, 1, 1)]

    view = PairsView(
        student=None,
        discriminator=spy,
        discriminator_unwrapped=None,
        lpips_loss=None,
        regression="none",
        lpips_weight=0.0,
        mix_fraction=0.5,
    )
    engine = GANStep(
        None,
        view=view,
        generator=None,
        discriminator=None,
        discriminator_unwrapped=None,
        opt_g=None,
        opt_d=None,
        loss="non_saturating",
        r1_gamma=0.0,
        r1_interval=1,
        max_grad_norm=0.0,
    )
    for seed in range(4):
        terms = engine.discriminator_terms(
            view.discriminator_logits(batch, -batch.target, torch.Generator().manual_seed(seed))
        )
        sp = lambda x: F.softplus(torch.tensor(x)).item()  # noqa: E731
        assert terms["d_real"].item() + terms["d_fake"].item() == pytest.approx(sp(-2.0) + sp(-1.0))
        assert terms["d_mismatch"].item() == pytest.approx(sp(0.5))
    assert len(mismatched) == 4 * n // 2
    assert all(z != lat for lat, z, _ in mismatched)  # the noise is always another sample's
    noise_only = [m for m in mismatched if m[2] == m[0]]
    independent = [m for m in mismatched if m[2] not in (m[0], m[1])]
    assert noise_only and independent, mismatched


def test_gan_fakes_from_fresh_noise_are_conditioned_on_that_noise():
    """``gan_noise: fresh``: regression reads the pair's noise, the GAN fake is G(fresh noise) and both
    D phases see it conditioned on the fresh noise; real pairs keep their own noise."""
    from distill.distillation.phases import Batch
    from students.text import TextConditioning

    seen = []

    def student(noise, prompt_embeds, added_cond_kwargs=None):
        return 2 * noise

    def disc(latents, noise, prompt_embeds, added_cond_kwargs=None):
        seen.append((latents.detach(), noise))
        return [latents.mean(dim=1, keepdim=True)]

    gen = torch.Generator().manual_seed(0)
    pair_noise, fresh = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    target = torch.randn(4, 4, 8, 8, generator=gen)
    batch = Batch(pair_noise, target, TextConditioning(torch.randn(4, 7, 8, generator=gen)), gan_noise=fresh)
    engine = _engine(disc, student=student)
    fake, terms = engine.g_terms(batch, gen)
    torch.testing.assert_close(fake, 2 * fresh)
    torch.testing.assert_close(terms["g_mse"], torch.nn.functional.mse_loss(2 * pair_noise, target))
    assert torch.equal(seen[-1][1], fresh) and "g_adv" in terms
    engine.d_terms(batch, fake.detach(), gen)
    latents, noise = seen[-1]
    assert torch.equal(latents[:4], target) and torch.equal(noise[:4], pair_noise)  # real pairs with their noise
    assert torch.equal(latents[4:], 2 * fresh) and torch.equal(noise[4:], fresh)  # fakes with the noise they came from
    # Without fresh noise (the paper, and the UNet student's default) the fake is G(pair noise).
    paired = Batch(pair_noise, target, batch.cond)
    fake, _ = engine.g_terms(paired, gen)
    torch.testing.assert_close(fake, 2 * pair_noise)


def test_pair_batches_are_the_same_with_workers_and_after_resume(pairs_dir):
    from data_gen.pairs import load_pairs
    from distill.distillation.pair_data import PairRows
    from distill.training.prefetch import Prefetch

    pairs = load_pairs(pairs_dir).with_format("torch")

    def read(*, num_workers, start=0, rank=0, world=1):
        data = Prefetch(
            PairRows(pairs, num_train=16, seed=0, rank=rank, world=world, batch_size=4), num_workers=num_workers
        )
        data.start(start)
        return [data.read(m) for m in range(start, 8)]

    straight = read(num_workers=0)
    index = [b["index"].tolist() for b in straight]
    # 8 micro-batches of 4 = two epochs of the 16 training rows (the last 8 of 24 held out), each row once per epoch.
    assert sorted(sum(index[:4], [])) == sorted(sum(index[4:], [])) == list(range(16)) and index[:4] != index[4:]
    for batches in (read(num_workers=2), [None] * 5 + read(num_workers=2, start=5)):  # all; resumed at micro-batch 5
        for got, want in zip(batches, straight):
            if got is not None:
                assert got["prompt"] == want["prompt"]
                for key in ("index", "noise", "target"):
                    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    ranks = [sum((b["index"].tolist() for b in read(num_workers=2, rank=r, world=2, start=6)), []) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])  # two processes read disjoint rows
    data = Prefetch(PairRows(pairs, num_train=16, seed=0, rank=0, world=1, batch_size=4), num_workers=1)
    data.start(3)
    with pytest.raises(RuntimeError, match="prefetched micro-batch 3 but micro-batch 4 was asked for"):
        data.read(4)
