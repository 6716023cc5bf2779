"""Building the stage-two parts from a config, exporting the pipeline, validation + sample grids.

Called by ``distill/train_student.py`` (it receives the resolved config and the Accelerator's device /
process facts, never the Accelerator inside library code other than here); the generators come from the one
registry in :mod:`distill.training.student_registry`, the optimisers from :mod:`distill.training.optimizers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_gen.pairs import SPLIT_FILE
from distill.discriminators import TransformerDiscriminator, UNetDiscriminator
from distill.distillation import validation as val
from distill.distillation.phases import PairsView
from distill.training.curves import plot_run
from distill.training.gan_step import GANStep, build_gan_optimizers
from distill.training.trackers import log_images
from distill.distillation.validation import ValidationSet
from distill.training.student_registry import STUDENTS
from students import OneStepGANPipeline, TextConditioning, encode_sd3_text, encode_text
from students.export import save_standalone
from students.model_card import write_model_card
from teachers import Teacher, load_teacher


# The dtype text conditioning reaches the student and D in, encoded or stored: their fp32 master weights' (autocast
# casts further); text encoders held in bf16 / fp16 (``frozen_dtype``) are cast back to it.
COND_DTYPE = torch.float32
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Parts:
    teacher: Teacher
    student: torch.nn.Module
    discriminator: torch.nn.Module | None
    resolution: int
    max_sequence_length: int | None = None  # SD3: the pairs' T5 length (zero tokens without T5)

    def encode(self, prompts: list[str]) -> TextConditioning:
        p = self.teacher.pipe
        if self.teacher.family == "sd3":
            return encode_sd3_text(
                list(prompts), tokenizer=p.tokenizer, text_encoder=p.text_encoder, tokenizer_2=p.tokenizer_2,
                text_encoder_2=p.text_encoder_2, tokenizer_3=p.tokenizer_3, text_encoder_3=p.text_encoder_3,
                max_sequence_length=self.max_sequence_length, joint_attention_dim=p.transformer.config.joint_attention_dim,
            ).to(dtype=COND_DTYPE)
        return encode_text(
            list(prompts), tokenizer=p.tokenizer, text_encoder=p.text_encoder,
            tokenizer_2=getattr(p, "tokenizer_2", None), text_encoder_2=getattr(p, "text_encoder_2", None),
            resolution=(self.resolution, self.resolution),
        ).to(dtype=COND_DTYPE)

    def release_teacher_unet(self) -> None:
        """Drop the teacher's UNet (SDXL: 10 GB in fp32): the student and D hold copies of it, and what follows the
        setup needs only its scheduler, VAE and text encoders. After the LPIPS network and the validation set (the
        teacher solves the validation prompts); ``teacher.latent_channels`` is unavailable from here on. An SD3 teacher
        keeps its transformer (its config serves the text encoding; releasing it is not done yet)."""
        if self.teacher.family != "sd3":
            self.teacher.pipe.unet = None

    def hold_frozen_in(self, dtype: torch.dtype) -> None:
        """The VAE and text encoder(s) (frozen: no optimiser state, no master copy needed) cast to ``dtype``. After the
        validation set: the teacher's own ODE solve needs its text encoder in the UNet's dtype."""
        p = self.teacher.pipe
        for module in (p.vae, p.text_encoder, getattr(p, "text_encoder_2", None), getattr(p, "text_encoder_3", None)):
            if module is not None:
                module.to(dtype)


def build_student(cfg, *, manifest: dict, device, latent_stats: tuple[list[float], list[float]] | None = None) -> Parts:
    """Teacher (frozen, fp32 master weights), student initialised from it, and the discriminator built from the
    teacher's denoiser (the UNet one, or the transformer one for SD3). ``latent_stats``: the training targets'
    per-channel (mean, std), read by the from-scratch GAN students (their output scale)."""
    name = cfg.teacher or manifest["teacher"]["name_or_path"]
    revision = cfg.revision or manifest["teacher"].get("revision")
    teacher = load_teacher(name, revision=revision, variant=cfg.variant, scheduler=manifest["config"]["scheduler"], device=device)
    if tuple(manifest["latent_shape"])[0] != teacher.latent_channels:
        raise ValueError(f"pairs have {manifest['latent_shape'][0]} latent channels but teacher {name} has {teacher.latent_channels}")
    student, disc = build_networks(cfg, teacher, device=device, latent_stats=latent_stats)
    resolution = manifest["config"]["resolution"]
    return Parts(teacher=teacher, student=student, discriminator=disc, resolution=resolution,
                 max_sequence_length=manifest["config"].get("max_sequence_length"))


def build_networks(cfg, teacher: Teacher, *, device, latent_stats: tuple[list[float], list[float]] | None = None):
    """(student, discriminator or None) of the config, from the loaded ``teacher`` (frozen here); shared by the trainer
    and the memory planner (``distill/plan_memory.py``, on a teacher built from its config)."""
    p = teacher.pipe
    for module in (teacher.denoiser, p.vae, p.text_encoder, getattr(p, "text_encoder_2", None), getattr(p, "text_encoder_3", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    student = STUDENTS[cfg.student].build(cfg, teacher, latent_stats).to(device)
    if cfg.gradient_checkpointing:
        if not student._supports_gradient_checkpointing:
            raise ValueError(f"student {cfg.student!r} does not support gradient_checkpointing; turn it off")
        student.enable_gradient_checkpointing()
    disc = None
    if cfg.gan_weight > 0:
        heads = tuple(h.strip() for h in cfg.d_heads.split(",") if h.strip())
        if teacher.family == "sd3":
            if cfg.d_gradient_checkpointing:
                raise ValueError("d_gradient_checkpointing is implemented for the UNet discriminator only: turn it off for an SD3 teacher")
            disc = TransformerDiscriminator(p.transformer, timestep=cfg.d_timestep, heads=heads).to(device)
            if cfg.d_lora_rank > 0:
                disc.add_lora(cfg.d_lora_rank)
        else:
            disc = UNetDiscriminator(teacher.pipe.unet, timestep=cfg.d_timestep, heads=heads).to(device)
            if cfg.d_gradient_checkpointing:
                disc.enable_gradient_checkpointing()
            if cfg.d_lora_rank > 0:
                from peft import LoraConfig

                disc.unet.requires_grad_(False)
                disc.unet.add_adapter(LoraConfig(r=cfg.d_lora_rank, lora_alpha=cfg.d_lora_rank, init_lora_weights="gaussian",
                                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return student, disc


def build_optimizers(cfg, *, student, discriminator, optimizer: str | None = None):
    """(opt_g, opt_d) of the config (``optimizer`` overrides its key). The GAN generators' plain layers learn at
    lr / sqrt(fan-in), as if equalised (``StyleGenerator.optimizer_param_groups``)."""
    style_student = STUDENTS[cfg.student].generator is not None
    return build_gan_optimizers(generator=student, discriminator=discriminator, optimizer=optimizer or cfg.optimizer,
                                learning_rate_g=cfg.learning_rate_g, learning_rate_d=cfg.learning_rate_d,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), linear_lr_by_fan_in=style_student and cfg.linear_lr_by_fan_in)


def build_step(cfg, loop, *, student, discriminator, discriminator_unwrapped, lpips_loss, opt_g, opt_d) -> GANStep:
    """The shared GAN step (:mod:`distill.training.gan_step`) on stage two's pairs: G phase with the regression term,
    then D with lazy R1; used by the trainer and the memory planner."""
    view = PairsView(student=student, discriminator=discriminator, discriminator_unwrapped=discriminator_unwrapped,
                     lpips_loss=lpips_loss, regression=cfg.regression, lpips_weight=cfg.lpips_weight, mix_fraction=cfg.mix_fraction)
    return GANStep(loop, view=view, generator=student, discriminator=discriminator, discriminator_unwrapped=discriminator_unwrapped,
                   opt_g=opt_g, opt_d=opt_d, loss=cfg.loss, gan_weight=cfg.gan_weight, r1_gamma=cfg.r1_gamma,
                   r1_interval=cfg.r1_interval, max_grad_norm=cfg.max_grad_norm, lr_warmup_steps=cfg.lr_warmup_steps)


def _lpips_name(teacher: Teacher) -> str:
    if teacher.family in ("sdxl", "sd3"):
        return teacher.family
    return "sd21" if teacher.pipe.unet.config.cross_attention_dim == 1024 else "sd15"


def build_regression_lpips(cfg, *, teacher: Teacher, accelerator):
    """The E-LatentLPIPS loss: a local path, the published network matching the teacher, or random (tests)."""
    from distill.losses import ELatentLPIPS, LatentLPIPSNet

    augment = cfg.lpips_augment or None
    if cfg.lpips_network == "random":
        # Smoke tests only: a narrow random trunk with the published layout (no weights needed).
        torch.manual_seed(cfg.seed)
        net = LatentLPIPSNet(latent_channels=teacher.latent_channels, stage_channels=(16, 32, 64, 64, 64))
        loss = ELatentLPIPS(net, augment=augment, l1_weight=cfg.lpips_l1_weight)
    else:
        name = _lpips_name(teacher) if cfg.lpips_network == "official" else cfg.lpips_network
        loss = ELatentLPIPS.from_pretrained(
            name, augment=augment, l1_weight=cfg.lpips_l1_weight, download=cfg.lpips_network == "official",
            is_main_process=lambda: accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
        )
    return loss.to(accelerator.device)


def export_pipeline(parts: Parts, student: torch.nn.Module, path: Path, *, split: dict, card: dict | None = None,
                    validation: ValidationSet | None = None) -> None:
    """Save ``student`` with the teacher's VAE and text encoder(s) as a self-contained ``OneStepGANPipeline``
    folder (its code next to the weights: ``students/export.py``), with the run's held-out split
    (``pairs_split.json``) so that evaluation can refuse the rows the student trained on, and, given the
    run's ``card`` facts (``distill/distillation/card.py``), a model card with a teacher-vs-student grid of ``validation``."""
    p = parts.teacher.pipe
    sd3 = {}
    if parts.teacher.family == "sd3":
        sd3 = dict(text_encoder_3=p.text_encoder_3, tokenizer_3=p.tokenizer_3, text_conditioning="sd3",
                   max_sequence_length=parts.max_sequence_length, joint_attention_dim=p.transformer.config.joint_attention_dim)
    pipe = OneStepGANPipeline(
        student=student, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
        text_encoder_2=getattr(p, "text_encoder_2", None), tokenizer_2=getattr(p, "tokenizer_2", None), **sd3,
    )
    save_standalone(pipe, path)
    (Path(path) / SPLIT_FILE).write_text(json.dumps(split, indent=2) + "\n")
    if card is None:
        return
    grid = None
    if validation is not None:
        fake = val.student_latents(student, parts.encode, validation, device=p.vae.device)
        student_grid = val.grid(val.decode(p.vae, fake), cols=validation.cols)
        val.teacher_over_student(val.teacher_grid(p.vae, validation), student_grid).save(Path(path) / CARD_GRID)
        grid = CARD_GRID
    write_model_card(path, **card, sample_grid=grid)


def validation_set(cfg, parts: Parts, *, holdout: dict, manifest: dict) -> ValidationSet:
    """The run's fixed validation images: ``validation_prompts`` x seeds (the teacher solved once, with the
    pairs' sampler settings), or the first held-out pairs."""
    if not cfg.validation_prompts:
        return val.from_holdout(holdout)
    sampler = manifest["config"]
    return val.from_prompts(list(cfg.validation_prompts), num_seeds=cfg.num_validation_seeds, teacher_pipe=parts.teacher.pipe,
                            latent_shape=tuple(manifest["latent_shape"]), num_inference_steps=sampler["num_inference_steps"],
                            guidance_scale=sampler["guidance_scale"], negative_prompt=sampler.get("negative_prompt"),
                            max_sequence_length=sampler.get("max_sequence_length"))


CARD_GRID = "samples.png"
VALIDATION_CHUNK = 64


@torch.no_grad()
def validate_and_sample(cfg, parts: Parts, student, holdout: dict, lpips_loss, accelerator, *, step: int, stats_path: Path,
                        validation: ValidationSet | None = None) -> None:
    """Held-out fidelity (deterministic E-LatentLPIPS and MSE to the teacher) on every held-out pair; the
    ``validation`` images (default: the first held-out pairs) as ``samples/step-N.png`` (teacher grid above
    the student's) and to the trackers (the teacher's once, at step 0); ``curves.png`` of the run so far."""
    if not accelerator.is_main_process or len(holdout["index"]) == 0:
        return
    device = accelerator.device
    target = holdout["target"].to(device, torch.float32)
    was_training = student.training
    student.eval()
    fakes = []
    for b in range(0, len(target), VALIDATION_CHUNK):  # bounded memory for large held-out sets
        cond = parts.encode(holdout["prompt"][b : b + VALIDATION_CHUNK])
        noise = holdout["noise"][b : b + VALIDATION_CHUNK].to(device, torch.float32)
        fakes.append(student(noise, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs()).float())
    fake = torch.cat(fakes)
    student.train(was_training)
    record = {"step": step, "val_mse": torch.mean((fake - target) ** 2).item()}
    if lpips_loss is not None:
        gen = torch.Generator("cpu").manual_seed(cfg.seed)  # same augmentation draws at every validation
        record["val_lpips"] = torch.cat([lpips_loss(fake[b : b + VALIDATION_CHUNK], target[b : b + VALIDATION_CHUNK], generator=gen).flatten()
                                         for b in range(0, len(target), VALIDATION_CHUNK)]).mean().item()
    with open(stats_path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    accelerator.log(record, step=step)

    vae, out = parts.teacher.pipe.vae, Path(cfg.output_dir)
    validation = validation if validation is not None else val.from_holdout(holdout)
    student_grid = val.grid(val.decode(vae, val.student_latents(student, parts.encode, validation, device=device)), cols=validation.cols)
    teacher_grid = val.teacher_grid(vae, validation)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    val.teacher_over_student(teacher_grid, student_grid).save(out / "samples" / f"step-{step:06d}.png")
    images = {"validation/student": [student_grid]}
    if step == 0:
        teacher_grid.save(out / "samples" / "teacher.png")
        images["validation/teacher"] = [teacher_grid]
    log_images(accelerator.trackers, images, step=step)
    plot_run(stats_path, out / "curves.png", title=str(out.name))
