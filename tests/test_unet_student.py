"""The teacher-initialised UNet student (students/unet_student.py): its x0 kept fp32-accurate under bf16 autocast,
TF32 off in its fp32 forward, zero terminal SNR."""

from __future__ import annotations

import pytest
import torch
from conftest import text_conditioning as _cond

from teachers import load_teacher


def _unit_eps_student(teacher_dir, **kwargs):
    """The tiny SD-form UNet student with conv_out scaled so eps has unit RMS at t=999, as a trained
    UNet's has (the random init gives 0.32, which would hide two thirds of the rounding error)."""
    from students import UNetStudent

    tp = load_teacher(str(teacher_dir)).pipe
    student = UNetStudent.from_teacher(tp.unet, tp.scheduler, **kwargs).eval()
    cond = _cond(load_teacher(str(teacher_dir)), ["a cat", "a dog"] * 2)
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = student.unet(
            z,
            torch.full((4,), 999),
            encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs=cond.added_cond_kwargs(),
        ).sample
        scale = eps.pow(2).mean().rsqrt()
        student.unet.conv_out.weight.mul_(scale)
        student.unet.conv_out.bias.mul_(scale)
    return student, z, cond


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_student_output_stays_fp32_accurate_under_bf16_autocast(tiny_teacher_factory, family):
    """x0 = (z - sqrt(1 - abar) eps) / sqrt(abar) amplifies the UNet's rounding 14.6x at t=999: the default
    plan keeps the bf16-autocast output within 0.01 RMS (latent units) of fp32; plain autocast is ~0.2 off."""
    student, z, cond = _unit_eps_student(tiny_teacher_factory(family))
    run = lambda: student(z, cond.prompt_embeds, cond.added_cond_kwargs())  # noqa: E731
    with torch.no_grad():
        ref = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
        student.register_to_config(precision="autocast")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            noisy = run()
    rms = lambda x: (x.float() - ref).pow(2).mean().sqrt().item()  # noqa: E731
    assert out.dtype == torch.float32 and rms(out) <= 0.01
    assert (
        student.config.precision == "autocast" and rms(noisy) > 0.05
    )  # the error this guards against is real at this scale


def test_unet_student_fp32_forward_turns_tf32_off_and_back(sd15_teacher):
    from students import UNetStudent

    tp = load_teacher(str(sd15_teacher)).pipe
    seen = []
    student = UNetStudent.from_teacher(tp.unet, tp.scheduler)
    student.unet.conv_in.register_forward_hook(
        lambda *_: seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
    )
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    cond = _cond(load_teacher(str(sd15_teacher)), ["a cat"])
    with torch.no_grad():
        student(torch.randn(1, 4, 16, 16), cond.prompt_embeds)
        student.register_to_config(precision="tf32")
        student(torch.randn(1, 4, 16, 16), cond.prompt_embeds)
    assert seen == [("ieee", "ieee"), before]
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with pytest.raises(ValueError, match="unknown precision 'bf16'"):
        UNetStudent.from_teacher(tp.unet, tp.scheduler, precision="bf16")


def test_unet_student_at_zero_terminal_snr(sd15_teacher):
    """abar(999) = 0 (rescale_betas_zero_snr): v-prediction has the exact limit x0 = -v; epsilon has none."""
    from diffusers import DDIMScheduler

    from students import UNetStudent

    tp = load_teacher(str(sd15_teacher)).pipe
    v_sched = DDIMScheduler.from_config(
        tp.scheduler.config, rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    assert v_sched.alphas_cumprod[999] == 0
    student = UNetStudent.from_teacher(tp.unet, v_sched)
    cond = _cond(load_teacher(str(sd15_teacher)), ["a cat", "a dog"])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = student(z, cond.prompt_embeds)
        v = tp.unet(z, torch.full((2,), 999), encoder_hidden_states=cond.prompt_embeds).sample
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0, -v, rtol=0, atol=0)
    eps_sched = DDIMScheduler.from_config(tp.scheduler.config, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=r"zero terminal SNR .* distil a v-prediction teacher"):
        UNetStudent.from_teacher(tp.unet, eps_sched)
