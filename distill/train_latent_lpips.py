"""Train a latent LPIPS network for any VAE latent space (Diffusion2GAN Sec. 3.2 / App.).

Stage 1 (``stage=classifier``): the latent VGG16-BN trunk is trained as an image classifier on VAE
latents of a labelled ``datasets`` image dataset (the paper used ImageNet and SD latents; 68.3 % top-1
for SD1.5). Stage 2 (``stage=calibrate``, optional): the trunk is frozen and the 1x1 heads are
calibrated on 2AFC human judgements in the BAPPS layout (``ref/ p0/ p1/ judge/``), with LPIPS's
ranking loss. ``stage=both`` runs one after the other. Weights are saved with ``save_pretrained``
(safetensors) under ``output_dir/latent_lpips`` and load with ``ELatentLPIPS.from_pretrained``.

    accelerate launch distill/train_latent_lpips.py --config configs/latent_lpips/sd15_classifier.yaml

Like the other training scripts: ``output_dir``, ``max_train_steps`` (stage 1; ``calib_steps`` for stage 2),
``checkpointing_steps`` (accelerate ``save_state`` in ``output_dir/checkpoints/checkpoint-N``, N counting
the steps of both stages), ``--resume_from_checkpoint latest`` (the default) after a kill, a progress bar,
``report_to`` trackers; ``metrics.jsonl`` holds one row per logged step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional


import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data_gen.bapps import BAPPS2AFC
from distill.core.config import (ConfigError, command, parse_config, require_between, require_non_negative,
                                require_positive, save_config, with_default)
from distill.training import checkpoint as ckpt
from distill.training.trackers import tracker_config
from distill.training.run_config import RunConfig, check_run_keys
from distill.latent_lpips.training import (
    Dist2Logit, MetricsLog, TrunkClassifier, classifier_loader, cycle, encode, load_image_dataset, lr_lambda,
    score_2afc,
)
from distill.core.pretrained import load_vae
from students.latents import vae_factors

if TYPE_CHECKING:
    from distill.losses.elatentlpips import LatentLPIPSNet


STAGES = ("classifier", "calibrate", "both")
TRAINER_STATE = "trainer_state.json"  # stage and step of a checkpoint, read before anything is prepared


@dataclass
class TrainLatentLPIPSConfig(RunConfig):
    output_dir: str = with_default(RunConfig, "output_dir", "runs/latent_lpips", help="run directory (config, metrics, checkpoints, weights)", aliases=["out_dir"])
    max_train_steps: int = with_default(RunConfig, "max_train_steps", 100000, help="stage-1 optimizer steps", aliases=["steps"])
    batch_size: int = with_default(RunConfig, "batch_size", 64, help="stage-1 batch size per process")
    num_workers: int = with_default(RunConfig, "num_workers", 4)
    checkpointing_steps: int = with_default(RunConfig, "checkpointing_steps", 5000, help="save_state every N steps of either stage (0 = only at the end)", aliases=["save_every"])
    checkpoints_total_limit: Optional[int] = with_default(RunConfig, "checkpoints_total_limit", 2)
    tracker_project_name: str = with_default(RunConfig, "tracker_project_name", "train_latent_lpips")
    stage: str = field(default="classifier", metadata={"help": "classifier, calibrate or both", "choices": STAGES})
    # VAE whose latent space the metric lives in.
    vae: str = field(default="", metadata={"help": "diffusers model path or Hub id holding the AutoencoderKL", "aliases": ["pretrained_model_name_or_path"]})
    vae_subfolder: Optional[str] = field(default="vae", metadata={"help": "subfolder of `vae` (empty / null / . for the root)"})
    latent_sampling: str = field(default="sample", metadata={"help": "latents from the VAE posterior", "choices": ("sample", "mode")})
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
    optimizer: str = field(default="sgd", metadata={"help": "stage-1 optimizer", "choices": ("sgd", "adamw")})
    lr: float = field(default=0.02, metadata={"help": "stage-1 peak learning rate", "aliases": ["learning_rate"]})
    weight_decay: float = field(default=5e-4, metadata={"help": "stage-1 weight decay"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warmup, then cosine decay"})
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


class StageState:
    """Where the run is (stage, its step, the global step) and the unprepared LR scheduler's state; registered
    with accelerate once, so every checkpoint carries it (accelerate steps a prepared scheduler once per process)."""

    def __init__(self):
        self.stage, self.step, self.global_step, self.scheduler = "classifier", 0, 0, None

    def state_dict(self):
        return {"stage": self.stage, "step": self.step, "global_step": self.global_step,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state):
        self.stage, self.step, self.global_step = state["stage"], int(state["step"]), int(state["global_step"])
        self._scheduler_state = state.get("scheduler")

    def attach(self, scheduler, *, resumed: bool) -> None:
        """Track ``scheduler`` from now on; on a resumed stage, restore its saved state."""
        self.scheduler = scheduler
        if resumed and getattr(self, "_scheduler_state", None) is not None:
            scheduler.load_state_dict(self._scheduler_state)


# ------------------------------------------------------------------------------------------- stages


class Run:
    """What both stages share: the config, accelerator, VAE, metrics log, run directory and the resumable state."""

    def __init__(self, cfg, acc, vae, log: MetricsLog, out: Path, state: StageState, resume: Path | None):
        self.cfg, self.acc, self.vae, self.log, self.out, self.state, self.resume = cfg, acc, vae, log, out, state, resume

    def resuming(self, stage: str) -> bool:
        return self.resume is not None and self.state.stage == stage

    def start(self, stage: str, total: int, *, offset: int):
        """Load the checkpoint into the objects just prepared when it belongs to ``stage``; the progress bar."""
        if self.resuming(stage):
            self.acc.load_state(str(self.resume))
            self.acc.print(f"resumed {stage} from {self.resume} at step {self.state.step}")
        else:
            self.state.stage, self.state.step, self.state.global_step = stage, 0, offset
        return tqdm(total=total, initial=self.state.step, desc=stage, disable=not self.acc.is_main_process, dynamic_ncols=True)

    def advance(self, net_fn, *, last: bool) -> None:
        """One optimiser step done: count it, and checkpoint every ``checkpointing_steps`` steps."""
        self.state.step += 1
        self.state.global_step += 1
        every = self.cfg.checkpointing_steps
        if every and self.state.global_step % every == 0 and not last:
            save_checkpoint(self, net_fn())


def save_checkpoint(run: Run, net: LatentLPIPSNet) -> None:
    """accelerate ``save_state`` (models, optimisers, RNG, the stage state) + the net's weights, written atomically."""
    acc, out, step = run.acc, run.out, run.state.global_step
    tmp = ckpt.temporary_dir(out, step, clear=acc.is_main_process)
    acc.wait_for_everyone()
    with ckpt.partial_save(out, tmp, estimate_bytes=lambda: sum(t.numel() * t.element_size() for t in net.state_dict().values()) * 4):
        acc.save_state(str(tmp))
        if acc.is_main_process:
            net.save_pretrained(tmp / "latent_lpips")  # a checkpoint's network loads on its own, too
            position = {k: v for k, v in run.state.state_dict().items() if k != "scheduler"}
            (tmp / TRAINER_STATE).write_text(json.dumps(position) + "\n")
            ckpt.finalize(out, tmp, step, total_limit=run.cfg.checkpoints_total_limit)
    acc.wait_for_everyone()


def train_classifier(run: Run) -> LatentLPIPSNet:
    from distill.losses.elatentlpips import LatentLPIPSNet
    from distill.losses.elatentlpips_weights import FetchOptions, load_latent_lpips

    cfg, acc, vae, log = run.cfg, run.acc, run.vae, run.log
    # 1. Load: the labelled images; the trunk from init_from, or a new one recording the VAE's convention.
    ds, num_classes = load_image_dataset(cfg.dataset, split=cfg.dataset_split, image_column=cfg.image_column,
                                         label_column=cfg.label_column, max_samples=cfg.max_train_samples)
    scale, shift = vae_factors(vae.config)
    if cfg.init_from:
        net = load_latent_lpips(cfg.init_from, fetch=FetchOptions.for_accelerator(acc))
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

    # 2. Build: the data loader, the trunk + linear classifier, the optimiser and its schedule.
    loader = classifier_loader(ds, image_column=cfg.image_column, label_column=cfg.label_column, resolution=cfg.resolution,
                               crop_scale_min=cfg.crop_scale_min, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    net.heads.requires_grad_(False)  # unused by the classifier; frozen so DDP does not wait for their grads
    model = TrunkClassifier(net, num_classes)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.max_train_steps))

    # 3. Prepare: DDP, the stage's progress and resumed schedule.
    # The scheduler is not prepared: accelerate would step it once per process per optimiser step.
    model, opt, loader = acc.prepare(model, opt, loader)
    bar = run.start("classifier", cfg.max_train_steps, offset=0)
    run.state.attach(sched, resumed=run.resuming("classifier"))
    vae.to(acc.device)
    model.train()

    # 4. Loop: images -> latents -> classify; logs and checkpoints.
    t0 = time.time()
    batches = cycle(loader)
    for step in range(run.state.step + 1, cfg.max_train_steps + 1):
        batch = next(batches)
        latents = encode(vae, batch["pixels"], cfg.latent_sampling)
        with acc.autocast():
            logits = model(latents)
            loss = F.cross_entropy(logits.float(), batch["label"])
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == 1 or step == cfg.max_train_steps:
            top1 = (logits.argmax(1) == batch["label"]).float().mean()
            loss_m, top1_m = acc.reduce(torch.stack([loss.detach(), top1]), reduction="mean").tolist()
            log.write(stage="classifier", step=step, global_step=run.state.global_step + 1, loss=loss_m, top1=top1_m,
                      lr=sched.get_last_lr()[0], sec=time.time() - t0)
            bar.set_postfix(loss=f"{loss_m:.3g}", top1=f"{top1_m:.3f}", refresh=False)
        bar.update(1)
        run.advance(lambda: acc.unwrap_model(model).net, last=step == cfg.max_train_steps and cfg.stage == "classifier")
    bar.close()

    # 5. Save: the classifier head next to the run (the trunk is saved by the caller).
    acc.wait_for_everyone()
    net = acc.unwrap_model(model).net
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file(acc.unwrap_model(model).fc.state_dict(), str(run.out / "classifier_head.safetensors"))
    acc.free_memory()  # stage 2 prepares (and checkpoints) its own objects only
    return net


def calibrate_heads(run: Run, net: LatentLPIPSNet) -> LatentLPIPSNet:
    cfg, acc, vae, log = run.cfg, run.acc, run.vae, run.log
    # 1. Load: BAPPS 2AFC triplets.
    if not cfg.bapps_dir:
        raise ValueError("stage calibrate needs `bapps_dir` (BAPPS 2AFC layout: ref/ p0/ p1/ judge/)")
    train_set = BAPPS2AFC(cfg.bapps_dir, cfg.calib_resolution)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.calib_batch_size, shuffle=True, num_workers=cfg.num_workers, drop_last=False
    )

    # 2. Build: trainable heads on the frozen trunk, the ranking head, the optimiser and its schedule.
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

    # 3. Prepare: DDP, the stage's progress and resumed schedule; the trunk's BN statistics fixed.
    net, rank, opt, loader = acc.prepare(net, rank, opt, loader)  # scheduler unprepared, as in stage 1
    bar = run.start("calibrate", cfg.calib_steps, offset=cfg.max_train_steps if cfg.stage == "both" else 0)
    run.state.attach(sched, resumed=run.resuming("calibrate"))
    vae.to(acc.device)
    raw_net = acc.unwrap_model(net)
    raw_net.eval()  # BN statistics of the trunk stay fixed ...
    raw_net.dropout.train()  # ... while the heads see dropout, as in LPIPS training

    # 4. Loop: which of two distortions is closer to the reference; heads kept non-negative.
    t0 = time.time()
    batches = cycle(loader)
    for step in range(run.state.step + 1, cfg.calib_steps + 1):
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
            log.write(stage="calibrate", step=step, global_step=run.state.global_step + 1, loss=loss_m, train_2afc=agree_m,
                      lr=sched.get_last_lr()[0], sec=time.time() - t0)
            bar.set_postfix(loss=f"{loss_m:.3g}", agree=f"{agree_m:.3f}", refresh=False)
        bar.update(1)
        run.advance(lambda: raw_net, last=step == cfg.calib_steps)
    bar.close()

    # 5. Finish: no dropout in the saved metric; the held-out 2AFC score, when given.
    raw_net.dropout = nn.Identity()
    raw_net.register_to_config(head_dropout=0.0)
    if cfg.bapps_val_dir and acc.is_main_process:
        val = torch.utils.data.DataLoader(BAPPS2AFC(cfg.bapps_val_dir, cfg.calib_resolution), batch_size=cfg.calib_batch_size)
        log.write(stage="calibrate", step=cfg.calib_steps, global_step=run.state.global_step,
                  val_2afc=score_2afc(raw_net, vae, val, "mode", acc.device))
    return raw_net


def save_net(acc, net: LatentLPIPSNet, out: Path) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        net.save_pretrained(out / "latent_lpips")  # safetensors + config.json


def validate(cfg: TrainLatentLPIPSConfig) -> None:
    """Fail on a bad combination of keys before anything heavy is loaded (choices: parse_config)."""
    if not cfg.vae:
        raise ConfigError("set `vae` to a diffusers model path or Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    if cfg.stage in ("classifier", "both") and not cfg.dataset:
        raise ConfigError("stage classifier needs `dataset` (a save_to_disk dir, parquet file/dir, or datasets Hub name)")
    if cfg.stage == "calibrate" and not cfg.init_from:
        raise ConfigError("stage calibrate needs `init_from` (a stage-1 run's latent_lpips dir, a .pth, or a published name)")
    if cfg.stage in ("calibrate", "both") and not cfg.bapps_dir:
        raise ConfigError("stage calibrate needs `bapps_dir` (BAPPS 2AFC layout: ref/ p0/ p1/ judge/)")
    check_run_keys(cfg)
    require_positive(cfg, "lr", "calib_steps", "calib_batch_size", "calib_lr", "resolution", "calib_resolution", "log_every")
    require_non_negative(cfg, "warmup_steps", "weight_decay", "checkpointing_steps", "max_train_samples")
    require_between(cfg, "crop_scale_min", 0.0, 1.0)
    require_between(cfg, "head_dropout", 0.0, 1.0, high_inclusive=False)
    n = len(cfg.stage_channels)
    if not cfg.init_from and not (len(cfg.convs_per_stage) == len(cfg.pool_after_stage) == n):
        raise ConfigError("stage_channels, convs_per_stage and pool_after_stage need one entry per stage")


@command
def main() -> None:
    cfg = parse_config(TrainLatentLPIPSConfig, description=__doc__)
    validate(cfg)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # 1. Prepare: the accelerator, seeds, the resumed stage, logs and trackers; a finished run stops here.
    out = Path(cfg.output_dir)
    resume = ckpt.resolve_resume(out, cfg.resume_from_checkpoint)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with=None if cfg.report_to == "none" else cfg.report_to,
                      project_dir=str(out))
    cfg.mixed_precision = acc.mixed_precision  # the launcher's choice when unset: printed and saved with the run
    acc.print(f"mixed precision: {cfg.mixed_precision}")
    set_seed(cfg.seed, device_specific=True)
    state = StageState()
    acc.register_for_checkpointing(state)
    if resume is not None:
        # Which stage to rebuild is needed before anything is prepared; accelerate restores the rest later.
        state.load_state_dict(json.loads((resume / TRAINER_STATE).read_text()))
    log = MetricsLog(out / "metrics.jsonl", acc.is_main_process, track=acc.log)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.truncate(global_step=state.global_step if resume is not None else 0)
        acc.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))
    last = ("classifier", cfg.max_train_steps) if cfg.stage == "classifier" else ("calibrate", cfg.calib_steps)
    if resume is not None and (state.stage, state.step) == last:
        acc.print(f"{out} is finished ({resume.name}, {state.stage} step {state.step}): weights in {out / 'latent_lpips'}")
        acc.end_training()
        return

    # 2. Stage 1: the trunk, trained as a latent classifier here, restored for calibration, or loaded.
    run = Run(cfg, acc, load_vae(cfg.vae, subfolder=cfg.vae_subfolder), log, out, state, resume)
    net = None
    if cfg.stage in ("classifier", "both") and not run.resuming("calibrate"):
        net = train_classifier(run)
    elif run.resuming("calibrate"):
        from distill.losses.elatentlpips import LatentLPIPSNet

        net = LatentLPIPSNet.from_pretrained(resume / "latent_lpips")  # the weights load_state then restores
    else:
        from distill.losses.elatentlpips_weights import FetchOptions, load_latent_lpips

        net = load_latent_lpips(cfg.init_from, fetch=FetchOptions.for_accelerator(acc))

    # 3. Stage 2: the heads calibrated on BAPPS 2AFC.
    if cfg.stage in ("calibrate", "both"):
        net = calibrate_heads(run, net)

    # 4. Save: the network, and a final checkpoint.
    save_net(acc, net.eval(), out)
    save_checkpoint(run, net)  # the finished run, resumable (a rerun of the same command does nothing more)
    if acc.is_main_process:
        print(f"saved {out / 'latent_lpips'}", flush=True)
    acc.end_training()


if __name__ == "__main__":
    main()
