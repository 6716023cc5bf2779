"""Train the digits teacher in SD3 form (a tiny rectified-flow MMDiT) on CPU and save it as a
StableDiffusion3Pipeline folder.

The SD3 recipe (Esser et al. 2024, §2-3) on the digits testbed: x_sigma = (1 - sigma) x0 + sigma eps and
the transformer regresses v = eps - x0 at sigma drawn per sample (uniform, or SD3's logit-normal), on
the latents of the committed digits VAE (frozen; both digits teachers share its latent space). The two
small CLIP encoders train jointly with the transformer, as in the UNet recipe (a frozen random encoder
is followed late); prompts go through ``students.text.encode_sd3_text``, the pipeline's own encoding
(zeros in place of T5, ``max_sequence_length`` of them). Captions are dropped to "" 10 % of the time
for classifier-free guidance.

    nice -n 19 python distill/digits/train_teacher_sd3.py --config configs/digits/teacher_sd3.yaml \
        --output_dir runs/digits-teacher-sd3

Writes OUTPUT_DIR/pipeline (final, EMA weights), OUTPUT_DIR/checkpoints/step-N (EMA pipelines),
OUTPUT_DIR/train_state.pt (for --resume), OUTPUT_DIR/config.yaml.
"""

from __future__ import annotations

import os

# scikit-learn/SciPy start BLAS thread pools that fight torch's threads on small machines; pin them first.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_gen.digits import CAPTION_TEMPLATES, captions_for_label, load_digits_images
from distill.core.config import (
    command,
    parse_config,
    require_between,
    require_non_negative,
    require_positive,
    save_config,
)
from distill.digits.teacher_steps import TeacherSteps, prepare_run, with_weights
from students.text import encode_sd3_text
from teachers.digits import count_parameters, save_pipeline
from teachers.digits_sd3 import assemble_pipeline, build_text_encoder, build_transformer, load_digits_vae
from teachers.tokenizer import build_clip_tokenizer

SIGMA_SAMPLING = ("uniform", "logit_normal")


@dataclass
class TeacherSD3Config:
    output_dir: str = field(default="runs/digits-teacher-sd3", metadata={"help": "run directory"})
    vae: str = field(
        default="teachers/assets/digits-teacher", metadata={"help": "pipeline folder whose VAE is reused (frozen)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for init, batches, noise and sigmas"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    resume: bool = field(default=True, metadata={"help": "continue from OUTPUT_DIR/train_state.pt if present"})
    steps: int = field(default=4000, metadata={"help": "training steps (total, counting resumed ones)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop after this wall time and save (0: no limit)"})
    batch_size: int = 32
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the transformer"})
    text_encoder_lr: float = field(
        default=1e-3, metadata={"help": "higher than the transformer's so conditioning arrives early"}
    )
    warmup_steps: int = 200
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of an empty caption (for CFG)"})
    sigma_sampling: str = field(
        default="uniform",
        metadata={
            "help": "training noise levels: uniform (rectified flow) or logit_normal (SD3 §3.1, m=0, s=1)",
            "choices": SIGMA_SAMPLING,
        },
    )
    ema_decay: float = 0.998
    checkpoint_every: int = field(default=500, metadata={"help": "save an EMA pipeline + train state every N steps"})
    save_fp16: bool = field(
        default=True, metadata={"help": "store transformer and VAE weights as float16 (they load as float32)"}
    )
    # architecture
    num_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 2
    text_hidden_size: int = field(
        default=16, metadata={"help": "width of the first CLIP encoder (the embedding table dominates the folder size)"}
    )
    text_hidden_size_2: int = field(default=8, metadata={"help": "width of the second CLIP encoder"})
    text_layers: int = 2
    max_text_tokens: int = field(
        default=16, metadata={"help": "CLIP context length (the longest digits caption is 11 tokens)"}
    )
    max_sequence_length: int = field(
        default=4, metadata={"help": "zero tokens in place of T5 (pass the same to generate_pairs / evaluate)"}
    )
    scheduler_shift: float = field(default=1.0, metadata={"help": "the sampler's timestep shift (SD3: 3.0 at 1024 px)"})


def sample_sigmas(n: int, *, how: str, generator: torch.Generator) -> torch.Tensor:
    """[n] noise levels in (0, 1): uniform (rectified flow), or logit-normal(0, 1) as SD3 §3.1."""
    if how == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


@command
def main() -> None:
    cfg = parse_config(TeacherSD3Config, description=__doc__.split("\n\n")[0])
    require_positive(cfg, "lr", "text_encoder_lr", "scheduler_shift")
    require_non_negative(cfg, "max_minutes")
    require_between(cfg, "caption_dropout", 0.0, 1.0)
    require_between(cfg, "ema_decay", 0.0, 1.0)
    out, generator = prepare_run(output_dir=cfg.output_dir, seed=cfg.seed, num_threads=cfg.num_threads)
    save_config(cfg, out / "config.yaml")

    images, labels = load_digits_images(split="train")  # [N,3,32,32] in [-1,1], [N]
    vae = load_digits_vae(cfg.vae).requires_grad_(False)
    with torch.no_grad():  # the frozen encoder's posterior, so each step only samples from it
        dists = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
        lat_mean = torch.cat([d.mean for d in dists])  # [N,4,16,16]
        lat_std = torch.cat([d.std for d in dists])
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    tokenizer = build_clip_tokenizer(model_max_length=cfg.max_text_tokens)
    text_encoder = build_text_encoder(
        hidden_size=cfg.text_hidden_size, num_hidden_layers=cfg.text_layers, max_position_embeddings=cfg.max_text_tokens
    )
    text_encoder_2 = build_text_encoder(
        hidden_size=cfg.text_hidden_size_2,
        num_hidden_layers=cfg.text_layers,
        max_position_embeddings=cfg.max_text_tokens,
        hidden_act="gelu",
    )
    width = cfg.text_hidden_size + cfg.text_hidden_size_2  # the CLIP tokens' width; no T5, so the joint width too
    transformer = build_transformer(
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=width,
        pooled_projection_dim=width,
    )
    print(
        f"transformer: {count_parameters(transformer) / 1e6:.2f} M, text encoders: "
        f"{(count_parameters(text_encoder) + count_parameters(text_encoder_2)) / 1e6:.2f} M parameters"
    )
    groups = [list(transformer.parameters()), list(text_encoder.parameters()) + list(text_encoder_2.parameters())]
    base_lrs = [cfg.lr, cfg.text_encoder_lr]
    opt = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, base_lrs)], weight_decay=0.0)
    params = groups[0] + groups[1]
    state_path = out / "train_state.pt"
    ema, start = None, 0
    if cfg.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        for module, key in (
            (transformer, "transformer"),
            (text_encoder, "text_encoder"),
            (text_encoder_2, "text_encoder_2"),
        ):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["optimizer"])
        ema, start = state["ema"], state["step"]
        generator.set_state(state["generator"])
        print(f"resumed from {state_path} at step {start}")

    def encode(prompts: list[str]):
        return encode_sd3_text(
            prompts,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            tokenizer_2=tokenizer,
            text_encoder_2=text_encoder_2,
            max_sequence_length=cfg.max_sequence_length,
            joint_attention_dim=width,
        )

    def checkpoint(step: int, final: bool = False) -> None:
        n_tr, n_te = len(groups[0]), len(list(text_encoder.parameters()))
        pipe = assemble_pipeline(
            vae=vae,
            transformer=with_weights(transformer, steps.ema[:n_tr]),
            text_encoder=with_weights(text_encoder, steps.ema[n_tr : n_tr + n_te]),
            text_encoder_2=with_weights(text_encoder_2, steps.ema[n_tr + n_te :]),
            tokenizer=tokenizer,
            shift=cfg.scheduler_shift,
        )
        path = out / "pipeline" if final else out / "checkpoints" / f"step-{step:06d}"
        save_pipeline(pipeline=pipe, path=path, dtype=torch.float16 if cfg.save_fp16 else None)
        torch.save(
            {
                "transformer": transformer.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "text_encoder_2": text_encoder_2.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": steps.ema,
                "step": step,
                "generator": generator.get_state(),
            },
            state_path,
        )
        tqdm.write(f"saved {path} (step {step})")

    for module in (transformer, text_encoder, text_encoder_2):
        module.train()
    steps = TeacherSteps(
        optimizer=opt,
        params=params,
        base_lrs=base_lrs,
        warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay,
        start=start,
        total=cfg.steps,
        checkpoint_every=cfg.checkpoint_every,
        max_minutes=cfg.max_minutes,
        checkpoint=checkpoint,
        desc="mmdit",
        ema=ema,
    )
    for step in steps:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        phrasing = torch.randint(len(CAPTION_TEMPLATES), (cfg.batch_size,), generator=generator).tolist()
        drop = (torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout).tolist()
        prompts = [
            "" if d else captions_for_label(label=int(labels[i]))[k] for i, k, d in zip(idx.tolist(), phrasing, drop)
        ]

        raw = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=generator)
        x0 = (raw - shift) * scale  # the pipeline's latent convention
        noise = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(cfg.batch_size, how=cfg.sigma_sampling, generator=generator)
        s = sigma[:, None, None, None]
        noisy = (1 - s) * x0 + s * noise
        cond = encode(prompts)
        v = transformer(
            hidden_states=noisy,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=sigma * 1000,
        ).sample
        loss = F.mse_loss(v, noise - x0)

        steps.update(loss)
    checkpoint(steps.done, final=True)
    print(f"teacher pipeline written to {out / 'pipeline'} ({steps.minutes():.1f} min)")


if __name__ == "__main__":
    main()
