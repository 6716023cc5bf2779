"""Train the digits teacher (a tiny text-to-image latent diffusion model) on CPU and save it as a
StableDiffusionPipeline folder.

Stage 1 trains the AutoencoderKL (reconstruction + a small KL term); stage 2 trains the UNet and a
small CLIP text encoder jointly with epsilon prediction on the frozen VAE's latents. The text
encoder is trainable because with a frozen random one the UNet follows the prompt only after a long
time. Captions are dropped to "" 10 % of the time so classifier-free guidance works.

    nice -n 19 python distill/digits/train_teacher.py --config configs/digits/teacher.yaml \
        --output_dir runs/digits-teacher

Writes OUTPUT_DIR/pipeline (final, EMA weights), OUTPUT_DIR/checkpoints/step-N (EMA pipelines),
OUTPUT_DIR/train_state.pt (for --resume), OUTPUT_DIR/config.yaml.
"""

from __future__ import annotations

import os

# scikit-learn/SciPy start BLAS thread pools that fight torch's threads on small machines (a
# transient 5x slowdown was seen); pin them before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_gen.digits import CAPTION_TEMPLATES, NUM_CLASSES, captions_for_label, load_digits_images
from distill.core.config import (
    command,
    parse_config,
    require_between,
    require_non_negative,
    require_positive,
    save_config,
)
from distill.digits.teacher_steps import TeacherSteps, prepare_run, with_weights
from teachers.digits import (
    assemble_pipeline,
    build_text_encoder,
    build_train_scheduler,
    build_unet,
    build_vae,
    count_parameters,
    save_pipeline,
)
from teachers.tokenizer import build_clip_tokenizer


@dataclass
class TeacherConfig:
    output_dir: str = field(default="runs/digits-teacher", metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "seed for init, batches, noise and timesteps"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    resume: bool = field(default=True, metadata={"help": "continue from OUTPUT_DIR/train_state.pt if present"})
    # stage 1: VAE
    vae_steps: int = field(default=150, metadata={"help": "VAE training steps"})
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = field(default=1e-4, metadata={"help": "weight of the per-element KL term"})
    # stage 2: UNet + text encoder
    unet_steps: int = field(default=4000, metadata={"help": "UNet training steps (total, counting resumed ones)"})
    max_minutes: float = field(
        default=0.0, metadata={"help": "stop stage 2 after this wall time and save (0: no limit)"}
    )
    batch_size: int = 32
    unet_lr: float = 5e-4
    text_encoder_lr: float = field(
        default=1e-3, metadata={"help": "higher than the UNet's so conditioning arrives early"}
    )
    warmup_steps: int = 200
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of an empty caption (for CFG)"})
    snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR loss weighting gamma (0: plain epsilon MSE)"})
    ema_decay: float = 0.998
    checkpoint_every: int = field(default=500, metadata={"help": "save an EMA pipeline + train state every N steps"})
    save_fp16: bool = field(
        default=True, metadata={"help": "store UNet and VAE weights as float16 (half the size; they load as float32)"}
    )
    # architecture
    text_hidden_size: int = 32
    text_layers: int = 2


def train_vae(cfg: TeacherConfig, images: torch.Tensor, generator: torch.Generator):
    """Stage 1: reconstruction MSE + a small KL term; returns the VAE in eval mode."""
    vae = build_vae()
    print(f"VAE: {count_parameters(vae) / 1e6:.2f} M parameters, {cfg.vae_steps} steps")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        idx = torch.randint(len(images), (cfg.vae_batch_size,), generator=generator)
        x = images[idx]  # [B,3,32,32]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(rec, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # cosine decay: the VAE budget is fixed, unlike the UNet's
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / max(cfg.vae_steps, 1)))
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
    return vae.eval()


@command
def main() -> None:
    cfg = parse_config(TeacherConfig, description=__doc__.split("\n\n")[0])
    require_positive(cfg, "vae_lr", "unet_lr", "text_encoder_lr")
    require_non_negative(cfg, "vae_kl_weight", "max_minutes", "snr_gamma")
    require_between(cfg, "caption_dropout", 0.0, 1.0)
    require_between(cfg, "ema_decay", 0.0, 1.0)
    out, generator = prepare_run(output_dir=cfg.output_dir, seed=cfg.seed, num_threads=cfg.num_threads)
    save_config(cfg, out / "config.yaml")

    images, labels = load_digits_images(split="train")  # [N,3,32,32] in [-1,1], [N]
    tokenizer = build_clip_tokenizer()

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    # Every caption the data can produce, tokenized once: [10, 5, 77]; the empty caption [77].
    caption_ids = torch.stack([tokenize(captions_for_label(label=c)) for c in range(NUM_CLASSES)])
    empty_ids = tokenize([""])[0]

    state_path = out / "train_state.pt"
    state = torch.load(state_path, weights_only=True) if cfg.resume and state_path.is_file() else None
    if state is None:
        vae = train_vae(cfg, images, generator)
    else:
        vae = build_vae()
        vae.load_state_dict(state["vae"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():  # the frozen encoder's posterior, so each step only samples from it
        dists = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
        lat_mean = torch.cat([d.mean for d in dists])  # [N,4,16,16]
        lat_std = torch.cat([d.std for d in dists])
    if state is None:  # SD's convention: scale latents to unit variance for the diffusion model
        vae.register_to_config(scaling_factor=1.0 / lat_mean.std().item())
        with torch.no_grad():
            mse = F.mse_loss(vae.decode(lat_mean[:256]).sample, images[:256]).item()
        print(f"VAE done: reconstruction MSE {mse:.4f}, scaling_factor {vae.config.scaling_factor:.4f}")
    scaling = vae.config.scaling_factor

    unet = build_unet(cross_attention_dim=cfg.text_hidden_size)
    text_encoder = build_text_encoder(hidden_size=cfg.text_hidden_size, num_hidden_layers=cfg.text_layers)
    print(
        f"UNet: {count_parameters(unet) / 1e6:.2f} M, text encoder: {count_parameters(text_encoder) / 1e6:.2f} M "
        "parameters"
    )
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr},
            {"params": list(text_encoder.parameters()), "lr": cfg.text_encoder_lr},
        ],
        weight_decay=0.0,
    )
    base_lrs = [cfg.unet_lr, cfg.text_encoder_lr]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema, start = None, 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema, start = state["ema"], state["step"]
        generator.set_state(state["generator"])
        print(f"resumed from {state_path} at step {start}")

    scheduler = build_train_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod  # [1000]
    snr = alphas_cumprod / (1 - alphas_cumprod)

    def checkpoint(step: int, final: bool = False) -> None:
        n_unet = len(list(unet.parameters()))
        pipe = assemble_pipeline(
            vae=vae,
            unet=with_weights(unet, steps.ema[:n_unet]),
            text_encoder=with_weights(text_encoder, steps.ema[n_unet:]),
            tokenizer=tokenizer,
        )
        path = out / "pipeline" if final else out / "checkpoints" / f"step-{step:06d}"
        save_pipeline(pipeline=pipe, path=path, dtype=torch.float16 if cfg.save_fp16 else None)
        torch.save(
            {
                "vae": vae.state_dict(),
                "scaling_factor": scaling,
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": steps.ema,
                "step": step,
                "generator": generator.get_state(),
            },
            state_path,
        )
        tqdm.write(f"saved {path} (step {step})")

    unet.train()
    text_encoder.train()
    steps = TeacherSteps(
        optimizer=opt,
        params=params,
        base_lrs=base_lrs,
        warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay,
        start=start,
        total=cfg.unet_steps,
        checkpoint_every=cfg.checkpoint_every,
        max_minutes=cfg.max_minutes,
        checkpoint=checkpoint,
        desc="unet",
        ema=ema,
    )
    for step in steps:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        phrasing = torch.randint(len(CAPTION_TEMPLATES), (cfg.batch_size,), generator=generator)
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None], caption_ids[labels[idx], phrasing])  # [B,77]

        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)

        hidden = text_encoder(ids)[0]  # [B,77,D]
        pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:  # Min-SNR: stop the easy low-noise steps from dominating the gradient
            s = snr[timesteps]
            per_sample = per_sample * torch.clamp(s, max=cfg.snr_gamma) / s
        loss = per_sample.mean()

        steps.update(loss)
    checkpoint(steps.done, final=True)
    print(f"teacher pipeline written to {out / 'pipeline'} ({steps.minutes():.1f} min in stage 2)")


if __name__ == "__main__":
    main()
