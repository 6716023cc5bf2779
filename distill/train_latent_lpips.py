"""Train a latent LPIPS network for any VAE latent space (Diffusion2GAN Sec. 3.2 / App.).

Stage 1 (``stage=classifier``): the latent VGG16-BN trunk is trained as an image classifier on VAE
latents of a labelled ``datasets`` image dataset (the paper used ImageNet and SD latents; 68.3 % top-1
for SD1.5). Stage 2 (``stage=calibrate``, optional): the trunk is frozen and the 1x1 heads are
calibrated on 2AFC human judgements in the BAPPS layout (``ref/ p0/ p1/ judge/``), with LPIPS's
ranking loss. ``stage=both`` runs one after the other. Weights are saved with ``save_pretrained``
(safetensors) under ``out_dir/latent_lpips`` and load with ``ELatentLPIPS.from_pretrained``.

    python distill/train_latent_lpips.py --config configs/latent_lpips/sd15_classifier.yaml
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # `accelerate launch distill/train_latent_lpips.py` runs this as a plain file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from data_gen.bapps import BAPPS2AFC
from distill.config import ConfigError, parse_config, require_between, require_non_negative, require_positive, run_cli, save_config
from distill.losses.latent_lpips_training import (
    Dist2Logit, MetricsLog, TrunkClassifier, classifier_loader, cycle, encode, load_image_dataset, load_vae, lr_lambda,
    score_2afc, vae_factors,
)

if TYPE_CHECKING:
    from distill.losses.elatentlpips import LatentLPIPSNet


@dataclass
class TrainLatentLPIPSConfig:
    out_dir: str = field(default="runs/latent_lpips", metadata={"help": "run directory (config, metrics, weights)"})
    stage: str = field(default="classifier", metadata={"help": "classifier | calibrate | both"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (accelerate)"})
    # VAE whose latent space the metric lives in.
    vae: str = field(default="", metadata={"help": "diffusers model path or Hub id holding the AutoencoderKL"})
    vae_subfolder: str | None = field(default="vae", metadata={"help": "subfolder of `vae` (empty / null / . for the root)"})
    latent_sampling: str = field(default="sample", metadata={"help": "sample | mode of the VAE posterior"})
    # Network (stage 1 builds it from these; `init_from` loads one instead).
    init_from: str = field(default="", metadata={"help": "start from a save_pretrained dir, a published .pth or name"})
    stage_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512], metadata={"help": "trunk widths"})
    convs_per_stage: list[int] = field(default_factory=lambda: [2, 2, 3, 3, 3], metadata={"help": "convs per stage"})
    pool_after_stage: list[bool] = field(
        default_factory=lambda: [False, False, False, True, True],
        metadata={"help": "max-pool at the end of each stage (first three removed for 8x-smaller latents)"},
    )
    # Stage 1: classifier on latents.
    dataset: str = field(default="", metadata={"help": "save_to_disk dir, parquet file/dir, or datasets Hub name"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    image_column: str = field(default="image", metadata={"help": "image column"})
    label_column: str = field(default="label", metadata={"help": "integer / ClassLabel column"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N rows (0 = all)"})
    resolution: int = field(default=256, metadata={"help": "pixel size fed to the VAE (latents are 8x smaller)"})
    crop_scale_min: float = field(default=0.35, metadata={"help": "RandomResizedCrop lower area bound (1 = no crop)"})
    steps: int = field(default=100000, metadata={"help": "stage-1 optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "stage-1 batch size per process"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adamw"})
    lr: float = field(default=0.02, metadata={"help": "stage-1 peak learning rate"})
    weight_decay: float = field(default=5e-4, metadata={"help": "stage-1 weight decay"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warmup, then cosine decay"})
    num_workers: int = field(default=4, metadata={"help": "dataloader workers"})
    # Stage 2: 2AFC calibration of the heads.
    bapps_dir: str = field(default="", metadata={"help": "BAPPS-layout 2AFC train dir(s), comma-separated"})
    bapps_val_dir: str = field(default="", metadata={"help": "BAPPS-layout 2AFC val dir(s) for the 2AFC score"})
    calib_resolution: int = field(default=256, metadata={"help": "pixel size BAPPS patches are resized to"})
    calib_steps: int = field(default=10000, metadata={"help": "stage-2 optimizer steps"})
    calib_batch_size: int = field(default=50, metadata={"help": "stage-2 batch size per process"})
    calib_lr: float = field(default=1e-4, metadata={"help": "stage-2 Adam learning rate (LPIPS used 1e-4)"})
    head_dropout: float = field(default=0.5, metadata={"help": "dropout on the heads' input while calibrating"})
    # Bookkeeping.
    log_every: int = field(default=50, metadata={"help": "log every N steps"})
    save_every: int = field(default=5000, metadata={"help": "save weights every N steps (0 = only at the end)"})


# ------------------------------------------------------------------------------------------- stages


def train_classifier(cfg, acc, vae, log: MetricsLog, out: Path) -> LatentLPIPSNet:
    from distill.losses.elatentlpips import LatentLPIPSNet, load_latent_lpips

    ds, num_classes = load_image_dataset(cfg.dataset, split=cfg.dataset_split, image_column=cfg.image_column,
                                         label_column=cfg.label_column, max_samples=cfg.max_train_samples)
    scale, shift = vae_factors(vae)
    if cfg.init_from:
        net = load_latent_lpips(cfg.init_from, is_main_process=lambda: acc.is_main_process, barrier=acc.wait_for_everyone)
    else:
        net = LatentLPIPSNet(
            latent_channels=vae.config.latent_channels,
            stage_channels=tuple(cfg.stage_channels),
            convs_per_stage=tuple(cfg.convs_per_stage),
            pool_after_stage=tuple(cfg.pool_after_stage),
            scaling_factor=scale,
            shift_factor=shift,
        )
    if net.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"network takes {net.config.latent_channels} channels but the VAE has {vae.config.latent_channels}")
    loader = classifier_loader(ds, image_column=cfg.image_column, label_column=cfg.label_column, resolution=cfg.resolution,
                               crop_scale_min=cfg.crop_scale_min, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    net.heads.requires_grad_(False)  # unused by the classifier; frozen so DDP does not wait for their grads
    model = TrunkClassifier(net, num_classes)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    # The scheduler is not prepared: accelerate would step it once per process per optimiser step.
    model, opt, loader = acc.prepare(model, opt, loader)
    vae.to(acc.device)
    model.train()
    t0 = time.time()
    batches = cycle(loader)
    for step in range(1, cfg.steps + 1):
        batch = next(batches)
        latents = encode(vae, batch["pixels"], cfg.latent_sampling)
        with acc.autocast():
            logits = model(latents)
            loss = F.cross_entropy(logits.float(), batch["label"])
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
            top1 = (logits.argmax(1) == batch["label"]).float().mean()
            loss_m, top1_m = acc.reduce(torch.stack([loss.detach(), top1]), reduction="mean").tolist()
            log.write(stage="classifier", step=step, loss=loss_m, top1=top1_m, lr=sched.get_last_lr()[0], sec=time.time() - t0)
        if cfg.save_every and step % cfg.save_every == 0:
            save_net(acc, acc.unwrap_model(model).net, out)
    acc.wait_for_everyone()
    net = acc.unwrap_model(model).net
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file(acc.unwrap_model(model).fc.state_dict(), str(out / "classifier_head.safetensors"))
    return net


def calibrate_heads(cfg, acc, vae, net: LatentLPIPSNet, log: MetricsLog, out: Path) -> LatentLPIPSNet:
    if not cfg.bapps_dir:
        raise ValueError("stage calibrate needs `bapps_dir` (BAPPS 2AFC layout: ref/ p0/ p1/ judge/)")
    train_set = BAPPS2AFC(cfg.bapps_dir, cfg.calib_resolution)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.calib_batch_size, shuffle=True, num_workers=cfg.num_workers, drop_last=False
    )
    # Trunk frozen (LPIPS "lin" variant): only the heads and the ranking head learn.
    net.requires_grad_(False)
    for head in net.heads:
        head.weight.requires_grad_(True)
    net.dropout = nn.Dropout(cfg.head_dropout) if cfg.head_dropout > 0 else nn.Identity()
    rank = Dist2Logit()
    params = [h.weight for h in net.heads] + list(rank.parameters())
    opt = torch.optim.Adam(params, lr=cfg.calib_lr, betas=(0.5, 0.999))
    # Linear decay over the second half, as LPIPS's schedule (nepoch + nepoch_decay).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, min(1.0, 2.0 * (1 - s / max(1, cfg.calib_steps)))))
    net, rank, opt, loader = acc.prepare(net, rank, opt, loader)  # scheduler unprepared, as in stage 1
    vae.to(acc.device)
    raw_net = acc.unwrap_model(net)
    raw_net.eval()  # BN statistics of the trunk stay fixed ...
    raw_net.dropout.train()  # ... while the heads see dropout, as in LPIPS training
    t0 = time.time()
    batches = cycle(loader)
    for step in range(1, cfg.calib_steps + 1):
        ref, p0, p1, judge = next(batches)
        ref, p0, p1 = (encode(vae, t, cfg.latent_sampling) for t in (ref, p0, p1))
        with acc.autocast():
            # One forward for both pairs: DDP allows one forward per backward.
            d0, d1 = net(torch.cat([ref, ref]), torch.cat([p0, p1])).chunk(2)
            loss = F.binary_cross_entropy_with_logits(rank(d0.float(), d1.float()), judge.float())
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        raw_net.clamp_heads_()  # heads stay non-negative (projected gradient), as LPIPS does
        if step % cfg.log_every == 0 or step == 1 or step == cfg.calib_steps:
            agree = ((d0 < d1).float() * (1 - judge) + (d1 < d0).float() * judge).mean()
            loss_m, agree_m = acc.reduce(torch.stack([loss.detach(), agree]), reduction="mean").tolist()
            log.write(stage="calibrate", step=step, loss=loss_m, train_2afc=agree_m, lr=sched.get_last_lr()[0], sec=time.time() - t0)
    raw_net.dropout = nn.Identity()
    raw_net.register_to_config(head_dropout=0.0)
    if cfg.bapps_val_dir and acc.is_main_process:
        val = torch.utils.data.DataLoader(BAPPS2AFC(cfg.bapps_val_dir, cfg.calib_resolution), batch_size=cfg.calib_batch_size)
        log.write(stage="calibrate", step=cfg.calib_steps, val_2afc=score_2afc(raw_net, vae, val, "mode", acc.device))
    return raw_net


def save_net(acc, net: LatentLPIPSNet, out: Path) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        net.save_pretrained(out / "latent_lpips")  # safetensors + config.json


def validate(cfg: TrainLatentLPIPSConfig) -> None:
    """Fail on a bad combination of keys before anything heavy is loaded."""
    if cfg.stage not in ("classifier", "calibrate", "both"):
        raise ConfigError(f"stage must be classifier, calibrate or both, got {cfg.stage!r}")
    if not cfg.vae:
        raise ConfigError("set `vae` to a diffusers model path or Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    if cfg.stage in ("classifier", "both") and not cfg.dataset:
        raise ConfigError("stage classifier needs `dataset` (a save_to_disk dir, parquet file/dir, or datasets Hub name)")
    if cfg.stage == "calibrate" and not cfg.init_from:
        raise ConfigError("stage calibrate needs `init_from` (a stage-1 run's latent_lpips dir, a .pth, or a published name)")
    if cfg.stage in ("calibrate", "both") and not cfg.bapps_dir:
        raise ConfigError("stage calibrate needs `bapps_dir` (BAPPS 2AFC layout: ref/ p0/ p1/ judge/)")
    if cfg.latent_sampling not in ("sample", "mode"):
        raise ConfigError(f"latent_sampling must be sample or mode, got {cfg.latent_sampling!r}")
    require_positive(cfg, "steps", "batch_size", "lr", "calib_steps", "calib_batch_size", "calib_lr", "resolution",
                     "calib_resolution", "log_every")
    require_non_negative(cfg, "warmup_steps", "weight_decay", "num_workers", "save_every", "max_train_samples")
    require_between(cfg, "crop_scale_min", 0.0, 1.0)
    require_between(cfg, "head_dropout", 0.0, 1.0, high_inclusive=False)
    n = len(cfg.stage_channels)
    if not cfg.init_from and not (len(cfg.convs_per_stage) == len(cfg.pool_after_stage) == n):
        raise ConfigError("stage_channels, convs_per_stage and pool_after_stage need one entry per stage")


def main() -> None:
    cfg = parse_config(TrainLatentLPIPSConfig, description=__doc__.split("\n\n")[0])
    validate(cfg)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.out_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log = MetricsLog(out / "metrics.jsonl", acc.is_main_process)
    vae = load_vae(cfg.vae, subfolder=cfg.vae_subfolder)
    if cfg.stage in ("classifier", "both"):
        net = train_classifier(cfg, acc, vae, log, out)
    else:
        from distill.losses.elatentlpips import load_latent_lpips

        net = load_latent_lpips(cfg.init_from, is_main_process=lambda: acc.is_main_process, barrier=acc.wait_for_everyone)
    if cfg.stage in ("calibrate", "both"):
        net = calibrate_heads(cfg, acc, vae, net, log, out)
    save_net(acc, net.eval(), out)
    if acc.is_main_process:
        print(f"saved {out / 'latent_lpips'}", flush=True)


if __name__ == "__main__":
    run_cli(main)
