"""Building the stage-two parts from a config, exporting the pipeline, validation + sample grids.

Called by ``distill/train_student.py`` (it receives the resolved config and the Accelerator's device /
process facts, never the Accelerator inside library code other than here); the generators come from the one
registry in :mod:`distill.distillation.students`, the optimisers from :mod:`distill.training.optimizers`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_gen.pairs import SPLIT_FILE
from distill.discriminators import TransformerDiscriminator, UNetDiscriminator
from distill.distillation import validation as val
from distill.distillation.phases import PairsView
from distill.distillation.students import STUDENTS
from distill.distillation.validation import ValidationSet
from distill.training.curves import plot_run
from distill.training.gan_step import GANStep, build_gan_optimizers
from distill.training.trackers import log_images
from students import OneStepGANPipeline, TextConditioning, encode_sd3_text, encode_text
from students.export import save_standalone
from students.lora import LORA_WEIGHT_NAME, LoRAStudent, SharedBase, save_lora
from students.model_card import write_model_card
from teachers import Teacher, load_teacher

# The dtype text conditioning reaches the student and D in, encoded or stored: their fp32 master weights' (autocast
# casts further); text encoders held in bf16 / fp16 (``frozen_dtype``) are cast back to it.
COND_DTYPE = torch.float32
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The shared frozen UNet of a LoRA student / a D on the shared base (lora_base_dtype); no fp16: R1 turns autocast off,
# and a D on a half-precision base then runs under autocast in that dtype, where fp16 input gradients underflow.
LORA_BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LORA_LEARNING_RATE_G = 1e-4  # learning_rate_g's default for a LoRA student (the full UNet student's: 1e-5)
LORA_DIR = (
    "lora"  # in an exported LoRA student's pipeline folder: the adapter as a diffusers LoRA file + one-step scheduler
)


def check_shared_base(cfg) -> None:
    """One-line errors (before anything loads) for the LoRA keys, and their resolved defaults: ``d_shared_base``
    unset is true with a LoRA student; a LoRA student's ``learning_rate_g`` unset is :data:`LORA_LEARNING_RATE_G`."""
    from distill.core.config import ConfigError

    rank = cfg.student_lora_rank
    if rank < 0:
        raise ConfigError(f"student_lora_rank must not be negative, got {rank} (0: the full UNet student)")
    if rank > 0 and cfg.student != "unet":
        raise ConfigError(
            f"student_lora_rank is for the UNet student (a LoRA on the teacher's UNet); the {cfg.student} student "
            "is a generator of its own: set student_lora_rank 0 (its D can still be LoRA on the frozen teacher "
            "UNet: d_lora_rank N with d_shared_base true)"
        )
    if cfg.d_shared_base is None:
        cfg.d_shared_base = rank > 0
    gan = cfg.gan_weight > 0
    if rank > 0 and not cfg.d_shared_base and gan:
        raise ConfigError(
            "student_lora_rank puts the discriminator on the student's frozen base: d_shared_base must be true "
            "(or unset)"
        )
    if gan and cfg.d_shared_base and cfg.d_lora_rank <= 0:
        need = "student_lora_rank" if rank > 0 else "d_shared_base"
        raise ConfigError(
            f"{need} needs d_lora_rank > 0, got {cfg.d_lora_rank}: the discriminator on the shared frozen UNet "
            "trains through its own LoRA adapter (e.g. d_lora_rank 64)"
        )
    if cfg.lora_base_dtype != "fp32" and not (rank > 0 or (gan and cfg.d_shared_base)):
        raise ConfigError(
            f"lora_base_dtype {cfg.lora_base_dtype} is the dtype of the shared frozen UNet: set student_lora_rank "
            "(or d_lora_rank with d_shared_base true), or leave lora_base_dtype fp32"
        )
    if rank > 0 and cfg.learning_rate_g is None:
        cfg.learning_rate_g = LORA_LEARNING_RATE_G


def check_shared_base_family(cfg, *, family: str) -> None:
    """The LoRA keys against the pairs' teacher family (SD3's transformer D has no shared-base form yet)."""
    from distill.core.config import ConfigError

    if family == "sd3" and cfg.gan_weight > 0 and cfg.d_shared_base:
        raise ConfigError(
            "d_shared_base is implemented for UNet teachers: for an SD3 teacher set d_shared_base false "
            "(d_lora_rank still trains its transformer D through LoRA, on a copy)"
        )


@dataclass
class Parts:
    teacher: Teacher
    student: torch.nn.Module
    discriminator: torch.nn.Module | None
    resolution: int
    max_sequence_length: int | None = None  # SD3: the pairs' T5 length (zero tokens without T5)
    shared: SharedBase | None = None  # the frozen UNet the LoRA student and / or D share (their adapters on it)
    base_dtype: torch.dtype = torch.float32  # what hold_frozen_in casts the shared UNet to (lora_base_dtype)

    def encode(self, prompts: list[str]) -> TextConditioning:
        p = self.teacher.pipe
        if self.teacher.family == "sd3":
            return encode_sd3_text(
                list(prompts),
                tokenizer=p.tokenizer,
                text_encoder=p.text_encoder,
                tokenizer_2=p.tokenizer_2,
                text_encoder_2=p.text_encoder_2,
                tokenizer_3=p.tokenizer_3,
                text_encoder_3=p.text_encoder_3,
                max_sequence_length=self.max_sequence_length,
                joint_attention_dim=p.transformer.config.joint_attention_dim,
            ).to(dtype=COND_DTYPE)
        return encode_text(
            list(prompts),
            tokenizer=p.tokenizer,
            text_encoder=p.text_encoder,
            tokenizer_2=getattr(p, "tokenizer_2", None),
            text_encoder_2=getattr(p, "text_encoder_2", None),
            resolution=(self.resolution, self.resolution),
        ).to(dtype=COND_DTYPE)

    def release_teacher_unet(self) -> None:
        """Drop the teacher's UNet (SDXL: 10 GB in fp32): the student and D hold copies of it, and what follows the
        setup needs only its scheduler, VAE and text encoders. After the LPIPS network and the validation set (the
        teacher solves the validation prompts); ``teacher.latent_channels`` is unavailable from here on. An SD3 teacher
        keeps its transformer (its config serves the text encoding; releasing it is not done yet). On a shared base the
        UNet is the base itself, held once by ``shared``: the teacher's reference to it goes."""
        if self.teacher.family != "sd3":
            self.teacher.pipe.unet = None

    def hold_frozen_in(self, dtype: torch.dtype) -> None:
        """The VAE and text encoder(s) (frozen: no optimiser state, no master copy needed) cast to ``dtype``, and a
        shared UNet's frozen weights to ``base_dtype`` (its adapters stay fp32). After the validation set: the teacher's
        own ODE
        solve needs its text encoder in the UNet's dtype."""
        if self.shared is not None:
            self.shared.hold_in(self.base_dtype)
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
    teacher = load_teacher(
        name, revision=revision, variant=cfg.variant, scheduler=manifest["config"]["scheduler"], device=device
    )
    if tuple(manifest["latent_shape"])[0] != teacher.latent_channels:
        raise ValueError(
            f"pairs have {manifest['latent_shape'][0]} latent channels but teacher {name} has {teacher.latent_channels}"
        )
    student, disc, shared = build_networks(cfg, teacher, device=device, latent_stats=latent_stats)
    resolution = manifest["config"]["resolution"]
    return Parts(
        teacher=teacher,
        student=student,
        discriminator=disc,
        resolution=resolution,
        max_sequence_length=manifest["config"].get("max_sequence_length"),
        shared=shared,
        base_dtype=LORA_BASE_DTYPES[cfg.lora_base_dtype],
    )


def build_networks(cfg, teacher: Teacher, *, device, latent_stats: tuple[list[float], list[float]] | None = None):
    """(student, discriminator or None, shared base or None) of the config, from the loaded ``teacher`` (frozen here);
    shared by the trainer
    and the memory planner (``distill/plan_memory.py``, on a teacher built from its config)."""
    p = teacher.pipe
    for module in (
        teacher.denoiser,
        p.vae,
        p.text_encoder,
        getattr(p, "text_encoder_2", None),
        getattr(p, "text_encoder_3", None),
    ):
        if module is not None:
            module.requires_grad_(False).eval()
    # A LoRA student and / or a D on the shared base: the teacher's UNet itself, frozen, with their adapters (not
    # copied).
    d_on_base = cfg.gan_weight > 0 and bool(cfg.d_shared_base)
    shared = SharedBase(teacher.pipe.unet) if cfg.student_lora_rank > 0 or d_on_base else None
    if cfg.student_lora_rank > 0:
        student = LoRAStudent.from_teacher(
            shared, p.scheduler, rank=cfg.student_lora_rank, timestep=cfg.student_timestep
        ).to(device)
    else:
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
                raise ValueError(
                    "d_gradient_checkpointing is implemented for the UNet discriminator only: turn it off for an SD3 "
                    "teacher"
                )
            disc = TransformerDiscriminator(p.transformer, timestep=cfg.d_timestep, heads=heads).to(device)
            if cfg.d_lora_rank > 0:
                disc.add_lora(cfg.d_lora_rank)
        elif d_on_base:
            disc = UNetDiscriminator(
                None, timestep=cfg.d_timestep, heads=heads, shared_base=shared, lora_rank=cfg.d_lora_rank
            ).to(device)
            if cfg.d_gradient_checkpointing:
                disc.enable_gradient_checkpointing()
        else:
            disc = UNetDiscriminator(teacher.pipe.unet, timestep=cfg.d_timestep, heads=heads).to(device)
            if cfg.d_gradient_checkpointing:
                disc.enable_gradient_checkpointing()
            if cfg.d_lora_rank > 0:
                from peft import LoraConfig

                disc.unet.requires_grad_(False)
                disc.unet.add_adapter(
                    LoraConfig(
                        r=cfg.d_lora_rank,
                        lora_alpha=cfg.d_lora_rank,
                        init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                    )
                )
    return student, disc, shared


def build_optimizers(cfg, *, student, discriminator, optimizer: str | None = None):
    """(opt_g, opt_d) of the config (``optimizer`` overrides its key). The GAN generators' plain layers learn at
    lr / sqrt(fan-in), as if equalised (``StyleGenerator.optimizer_param_groups``)."""
    style_student = STUDENTS[cfg.student].generator is not None
    return build_gan_optimizers(
        generator=student,
        discriminator=discriminator,
        optimizer=optimizer or cfg.optimizer,
        learning_rate_g=cfg.learning_rate_g,
        learning_rate_d=cfg.learning_rate_d,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        linear_lr_by_fan_in=style_student and cfg.linear_lr_by_fan_in,
    )


def build_step(cfg, loop, *, student, discriminator, discriminator_unwrapped, lpips_loss, opt_g, opt_d) -> GANStep:
    """The shared GAN step (:mod:`distill.training.gan_step`) on stage two's pairs: G phase with the regression term,
    then D with lazy R1; used by the trainer and the memory planner."""
    view = PairsView(
        student=student,
        discriminator=discriminator,
        discriminator_unwrapped=discriminator_unwrapped,
        lpips_loss=lpips_loss,
        regression=cfg.regression,
        lpips_weight=cfg.lpips_weight,
        mix_fraction=cfg.mix_fraction,
    )
    return GANStep(
        loop,
        view=view,
        generator=student,
        discriminator=discriminator,
        discriminator_unwrapped=discriminator_unwrapped,
        opt_g=opt_g,
        opt_d=opt_d,
        loss=cfg.loss,
        gan_weight=cfg.gan_weight,
        r1_gamma=cfg.r1_gamma,
        r1_interval=cfg.r1_interval,
        max_grad_norm=cfg.max_grad_norm,
        lr_warmup_steps=cfg.lr_warmup_steps,
    )


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
            name,
            augment=augment,
            l1_weight=cfg.lpips_l1_weight,
            download=cfg.lpips_network == "official",
            is_main_process=lambda: accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone,
        )
    return loss.to(accelerator.device)


def export_pipeline(
    parts: Parts,
    student: torch.nn.Module,
    path: Path,
    *,
    split: dict,
    card: dict | None = None,
    validation: ValidationSet | None = None,
) -> None:
    """Save ``student`` with the teacher's VAE and text encoder(s) as a self-contained ``OneStepGANPipeline``
    folder (its code next to the weights: ``students/export.py``), with the run's held-out split
    (``pairs_split.json``) so that evaluation can refuse the rows the student trained on, and, given the
    run's ``card`` facts (``distill/distillation/card.py``), a model card with a teacher-vs-student grid of
    ``validation``."""
    p = parts.teacher.pipe
    lora = isinstance(student, LoRAStudent)
    sd3 = {}
    if parts.teacher.family == "sd3":
        sd3 = dict(
            text_encoder_3=p.text_encoder_3,
            tokenizer_3=p.tokenizer_3,
            text_conditioning="sd3",
            max_sequence_length=parts.max_sequence_length,
            joint_attention_dim=p.transformer.config.joint_attention_dim,
        )
    pipe = OneStepGANPipeline(
        # A LoRA student is exported as today's UNet student: its adapter merged into a copy of the base, on the CPU.
        student=student.merged("cpu") if lora else student,
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        text_encoder_2=getattr(p, "text_encoder_2", None),
        tokenizer_2=getattr(p, "tokenizer_2", None),
        **sd3,
    )
    save_standalone(pipe, path)
    del pipe
    if lora:  # and the adapter alone, for a stock pipeline of the teacher (load_lora_weights + the one-step scheduler)
        save_lora(
            student,
            Path(path) / LORA_DIR,
            sdxl=parts.teacher.family == "sdxl",
            scheduler_config=dict(p.scheduler.config),
        )
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
    if lora:
        with open(Path(path) / "README.md", "a") as fh:
            fh.write(
                LORA_CARD.format(
                    dir=LORA_DIR,
                    weights=LORA_WEIGHT_NAME,
                    rank=student.config.rank,
                    teacher=card["teacher"],
                    pipeline="StableDiffusionXLPipeline"
                    if parts.teacher.family == "sdxl"
                    else "StableDiffusionPipeline",
                )
            )


LORA_CARD = """
## As a LoRA of the teacher

This student is the teacher's UNet plus a LoRA adapter (rank {rank}), merged into the UNet above.
`{dir}/{weights}` holds the adapter alone in the diffusers LoRA format and `{dir}/scheduler` the one-step DDIM
scheduler (trailing spacing, final alpha 1) with which a stock pipeline of the teacher reproduces this student
(`STUDENT`: this folder or its hub id):

```python
from diffusers import DDIMScheduler, {pipeline}

pipe = {pipeline}.from_pretrained("{teacher}")
pipe.load_lora_weights(STUDENT, subfolder="{dir}")
pipe.scheduler = DDIMScheduler.from_pretrained(STUDENT, subfolder="{dir}/scheduler")
image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0).images[0]
```
"""


def validation_set(cfg, parts: Parts, *, holdout: dict, manifest: dict) -> ValidationSet:
    """The run's fixed validation images: ``validation_prompts`` x seeds (the teacher solved once, with the
    pairs' sampler settings), or the first held-out pairs."""
    if not cfg.validation_prompts:
        return val.from_holdout(holdout)
    sampler = manifest["config"]
    with parts.shared.plain() if parts.shared is not None else contextlib.nullcontext():  # the teacher: no adapter
        return val.from_prompts(
            list(cfg.validation_prompts),
            num_seeds=cfg.num_validation_seeds,
            teacher_pipe=parts.teacher.pipe,
            latent_shape=tuple(manifest["latent_shape"]),
            num_inference_steps=sampler["num_inference_steps"],
            guidance_scale=sampler["guidance_scale"],
            negative_prompt=sampler.get("negative_prompt"),
            max_sequence_length=sampler.get("max_sequence_length"),
        )


CARD_GRID = "samples.png"
VALIDATION_CHUNK = 64


@torch.no_grad()
def validate_and_sample(
    cfg,
    parts: Parts,
    student,
    holdout: dict,
    lpips_loss,
    accelerator,
    *,
    step: int,
    stats_path: Path,
    validation: ValidationSet | None = None,
) -> None:
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
        record["val_lpips"] = (
            torch.cat(
                [
                    lpips_loss(
                        fake[b : b + VALIDATION_CHUNK], target[b : b + VALIDATION_CHUNK], generator=gen
                    ).flatten()
                    for b in range(0, len(target), VALIDATION_CHUNK)
                ]
            )
            .mean()
            .item()
        )
    with open(stats_path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    accelerator.log(record, step=step)

    vae, out = parts.teacher.pipe.vae, Path(cfg.output_dir)
    validation = validation if validation is not None else val.from_holdout(holdout)
    student_grid = val.grid(
        val.decode(vae, val.student_latents(student, parts.encode, validation, device=device)), cols=validation.cols
    )
    teacher_grid = val.teacher_grid(vae, validation)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    val.teacher_over_student(teacher_grid, student_grid).save(out / "samples" / f"step-{step:06d}.png")
    images = {"validation/student": [student_grid]}
    if step == 0:
        teacher_grid.save(out / "samples" / "teacher.png")
        images["validation/teacher"] = [teacher_grid]
    log_images(accelerator.trackers, images, step=step)
    plot_run(stats_path, out / "curves.png", title=str(out.name))
