"""The shared GAN step (distill/training/gan_step.py): both trainers run on it, with one set of logged term names, both
objectives, lazy R1 at its interval and weight, the per-layer learning rates and warm-up."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script, tiny_pairs

from distill.training.gan_step import DLogits, GANStep, build_gan_optimizers

GAN_TERMS = {"g_adv", "d_real", "d_fake", "d_mismatch", "d_r1", "d_real_logit", "d_fake_logit"}


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


class _Linear(torch.nn.Module):
    """D(x | c) = <w, x> at every head position: grad_x of the mean logit is w / (C*H*W) per sample (hand-computable
    R1)."""

    uses_pyramid = needs_reference = False

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(1.0, 1.0 + torch.tensor(shape).prod().item()).view(1, *shape) / 10)

    def forward(self, x, prompt_embeds=None, added_cond_kwargs=None, **kwargs):
        return [(x * self.w).flatten(1).sum(dim=1).view(-1, 1, 1, 1)]


class _View:
    """A minimal view: G(z) = a * z; real samples fixed; no mismatch."""

    def __init__(self, gen, disc, real):
        self.gen, self.disc, self.real = gen, disc, real

    def generate(self, batch, rng):
        return self.gen.a * torch.ones_like(self.real), {}

    def fake_logits(self, batch, generated):
        return self.disc(generated)

    def discriminator_logits(self, batch, generated, rng):
        return DLogits(self.disc(torch.cat([self.real, generated])), self.real.shape[0])

    def r1_inputs(self, batch):
        return self.real, {}


def test_r1_is_applied_every_interval_at_interval_times_gamma_over_two():
    """Hand-computed: D linear in x with weights w, so ||grad_x D||^2 = ||w||^2 for each sample; lazy R1 every 3 steps
    adds r1_interval * r1_gamma / 2 * ||w||^2 = 3 * 0.5 / 2 * ||w||^2 at steps 0, 3, 6 and nothing in between."""
    shape = (1, 2, 2)
    disc, gen = _Linear(shape), torch.nn.Module()
    gen.a = torch.nn.Parameter(torch.tensor(0.5))
    view = _View(gen, disc, real=torch.ones(2, *shape))
    engine = GANStep(
        None,
        view=view,
        generator=gen,
        discriminator=disc,
        discriminator_unwrapped=disc,
        opt_g=None,
        opt_d=None,
        loss="non_saturating",
        r1_gamma=0.5,
        r1_interval=3,
        max_grad_norm=0.0,
    )
    expected = 3 * 0.5 / 2 * disc.w.detach().square().sum()
    assert expected.item() == pytest.approx(3 * 0.5 / 2 * sum((i / 10) ** 2 for i in range(1, 5)))
    for step in range(7):
        terms = engine.d_terms(None, (view.generate(None, None)[0]), None, r1=engine.r1_due(step))
        if step % 3 == 0:
            torch.testing.assert_close(terms["d_r1"], expected)
        else:
            assert "d_r1" not in terms
    # The objective terms of one forward, by hand: non-saturating softplus(-real) and softplus(fake).
    real_logit, fake_logit = disc(view.real)[0].mean(), disc(0.5 * torch.ones(1, *shape))[0].mean()
    torch.testing.assert_close(terms["d_real"], torch.nn.functional.softplus(-real_logit))
    torch.testing.assert_close(terms["d_fake"], torch.nn.functional.softplus(fake_logit))


@pytest.mark.parametrize("loss", ["non_saturating", "hinge"])
def test_objectives_by_hand(loss):
    logits = [torch.tensor([2.0, -0.5, 0.3, 1.5]).view(4, 1, 1, 1)]  # real 2, -0.5 | generated 0.3, 1.5
    engine = GANStep(
        None,
        view=None,
        generator=None,
        discriminator=None,
        discriminator_unwrapped=None,
        opt_g=None,
        opt_d=None,
        loss=loss,
        r1_gamma=0.0,
        r1_interval=1,
        max_grad_norm=0.0,
    )
    terms = engine.discriminator_terms(DLogits(logits, 2))
    sp, relu = torch.nn.functional.softplus, torch.relu
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.3, 1.5])
    if loss == "hinge":
        want_real, want_fake = relu(1 - real).mean(), relu(1 + fake).mean()
    else:
        want_real, want_fake = sp(-real).mean(), sp(fake).mean()
    torch.testing.assert_close(terms["d_real"], want_real)
    torch.testing.assert_close(terms["d_fake"], want_fake)
    assert terms["d_real_logit"].item() == pytest.approx(0.75) and terms["d_fake_logit"].item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="unknown loss 'wasserstein'; choose one of non_saturating, hinge"):
        GANStep(
            None,
            view=None,
            generator=None,
            discriminator=None,
            discriminator_unwrapped=None,
            opt_g=None,
            opt_d=None,
            loss="wasserstein",
            r1_gamma=0.0,
            r1_interval=1,
            max_grad_norm=0.0,
        )


def test_matching_aware_term_weighs_only_true_mismatches():
    """keep: a real sample shown with an identical caption is no mismatch and gets no weight."""
    logits = [torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -3.0]).view(6, 1, 1, 1)]  # 2 real, 2 generated, 2 mismatched
    engine = GANStep(
        None,
        view=None,
        generator=None,
        discriminator=None,
        discriminator_unwrapped=None,
        opt_g=None,
        opt_d=None,
        loss="non_saturating",
        mismatch_weight=0.5,
        r1_gamma=0.0,
        r1_interval=1,
        max_grad_norm=0.0,
    )
    terms = engine.discriminator_terms(DLogits(logits, 2, keep=torch.tensor([True, False])))
    torch.testing.assert_close(terms["d_mismatch"], 0.5 * torch.nn.functional.softplus(torch.tensor(1.0)))
    assert "d_mismatch" not in engine.discriminator_terms(DLogits(logits, 2, keep=torch.tensor([False, False])))


def test_optimizer_groups_and_warm_up():
    """The fan-in rule gives a style generator's plain linears lr / sqrt(fan-in); warm-up scales every group from its
    own rate."""
    from students import GigaGANGenerator

    gen = GigaGANGenerator.for_latents(latent_channels=3, sample_size=8, cross_attention_dim=16, size="tiny")
    disc = torch.nn.Conv2d(3, 1, 3)
    opt_g, opt_d = build_gan_optimizers(
        generator=gen,
        discriminator=disc,
        optimizer="adam",
        learning_rate_g=1e-2,
        learning_rate_d=2e-3,
        betas=(0.0, 0.99),
        linear_lr_by_fan_in=True,
    )
    rates = {g["lr"] for g in opt_g.param_groups}
    assert 1e-2 in rates and 1e-2 / 16**0.5 in rates  # the text projection: fan-in 16
    assert [g["lr"] for g in opt_d.param_groups] == [2e-3]
    flat, _ = build_gan_optimizers(
        generator=gen,
        discriminator=None,
        optimizer="adam",
        learning_rate_g=1e-2,
        learning_rate_d=1.0,
        betas=(0.0, 0.99),
        linear_lr_by_fan_in=False,
    )
    assert [g["lr"] for g in flat.param_groups] == [1e-2]

    class _Loop:
        class state:
            step = 1

        @staticmethod
        def phase(**kwargs):
            return []

        @staticmethod
        def end_step(logs, extra=None):
            return logs

    engine = GANStep(
        _Loop,
        view=None,
        generator=gen,
        discriminator=disc,
        discriminator_unwrapped=disc,
        opt_g=opt_g,
        opt_d=opt_d,
        loss="hinge",
        r1_gamma=0.0,
        r1_interval=1,
        max_grad_norm=0.0,
        lr_warmup_steps=4,
    )
    engine.run([], adversarial=False)  # step 1 of a 4-step warm-up: half of every group's rate
    assert sorted(g["lr"] for g in opt_g.param_groups) == pytest.approx(
        sorted(g["initial_lr"] / 2 for g in opt_g.param_groups)
    )
    assert opt_d.param_groups[0]["lr"] == pytest.approx(1e-3)


# Both trainers through their CLIs, on the engine.


@pytest.fixture(scope="module")
def pairs(sd15_teacher, prompt_file, tmp_path_factory):
    return tiny_pairs(sd15_teacher, prompt_file, tmp_path_factory.mktemp("gan-step-pairs") / "pairs", steps=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_image_text import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("gan-step-images") / "images", n=8, size=(16, 16))


STUDENT = [
    "--lpips_network",
    "random",
    "--batch_size",
    4,
    "--holdout",
    8,
    "--ema_half_life_kimg",
    0,
    "--report_to",
    "none",
    "--learning_rate_g",
    "1e-4",
    "--learning_rate_d",
    "1e-4",
    "--validation_steps",
    100,
    "--r1_interval",
    2,
    "--r1_gamma",
    1.0,
]
SCRATCH = [
    "--space",
    "pixel",
    "--resolution",
    16,
    "--generator_size",
    "tiny",
    "--discriminator",
    "multiscale",
    "--d_channels",
    "8,16",
    "--d_text_dim",
    16,
    "--d_cmap_dim",
    8,
    "--batch_size",
    4,
    "--report_to",
    "none",
    "--validation_images",
    2,
    "--validation_rows",
    2,
    "--validation_steps",
    100,
    "--ema_half_life_kimg",
    0.1,
    "--r1_interval",
    2,
    "--r1_gamma",
    1.0,
    "--mismatch_weight",
    1.0,
]


def test_both_trainers_run_the_engine_and_log_the_same_terms(
    pairs, folder, sd15_teacher, tmp_path, capsys, monkeypatch
):
    runs = []
    original = GANStep.run

    def spy(self, batches, **kwargs):
        runs.append(type(self.view).__name__)
        return original(self, batches, **kwargs)

    monkeypatch.setattr(GANStep, "run", spy)
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs,
            "--output_dir",
            tmp_path / "student",
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            3,
            *STUDENT,
        ],
        capsys,
    )
    assert code == 0, err
    code, err = run_script(
        "train_gan.py",
        [
            "--dataset",
            folder,
            "--text_encoder",
            sd15_teacher,
            "--output_dir",
            tmp_path / "scratch",
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            3,
            *SCRATCH,
        ],
        capsys,
    )
    assert code == 0, err
    assert runs == ["PairsView"] * 3 + ["RealImagesView"] * 3
    student, scratch = _stats(tmp_path / "student"), _stats(tmp_path / "scratch")
    student = [r for r in student if "g_lpips" in r]
    for rows in (student, scratch):
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert (
            GAN_TERMS <= set(rows[0]) and GAN_TERMS - {"d_r1"} <= set(rows[1]) and "d_r1" not in rows[1]
        )  # R1 at steps 0, 2
        assert GAN_TERMS <= set(rows[2])
    assert {k for k in student[0] if k[:2] in ("g_", "d_")} - GAN_TERMS == {
        "g_lpips"
    }  # stage two's own term: its regression


@pytest.mark.parametrize("loss", ["hinge", "non_saturating"])
def test_stage_two_trains_with_either_objective(pairs, tmp_path, capsys, loss):
    """At the first step D's logits are about 0: hinge's real term relu(1 - x) is about 1, the non-saturating
    softplus(-x)
    about log 2; G's hinge term is -mean(D(G)) (about 0), the non-saturating one about log 2."""
    run = tmp_path / loss
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            pairs,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
            *STUDENT,
            "--loss",
            loss,
            "--gan_weight",
            1.0,
        ],
        capsys,
    )
    assert code == 0, err
    first = [r for r in _stats(run) if "g_lpips" in r][0]
    expected = {"hinge": (1.0, 0.0), "non_saturating": (0.693, 0.693)}[loss]
    assert first["d_real"] == pytest.approx(expected[0], abs=0.1) and first["g_adv"] == pytest.approx(
        expected[1], abs=0.1
    )
    assert f"loss: {loss}" in (run / "config.yaml").read_text()
