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
``report_to`` trackers; ``stats.jsonl`` holds one row per step. Both stages run on the trainers' shared loop
(distill/training/loop.py: NaN stop, checkpoint cadence, exact counters), one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from data_gen.bapps import BAPPS2AFC
from distill.core.config import (
    ConfigError,
    command,
    parse_config,
    require_between,
    require_non_negative,
    require_positive,
    save_config,
    with_default,
)
from distill.core.pretrained import load_vae
from distill.latent_lpips.training import (
    Dist2Logit,
    TrunkClassifier,
    classifier_loader,
    cycle,
    encode,
    load_image_dataset,
    lr_lambda,
    score_2afc,
)
from distill.training import checkpoint as ckpt
from distill.training.loop import TrainLoop, read_position
from distill.training.run_config import RunConfig, check_run_keys
from distill.training.trackers import tracker_config
from students.latents import vae_factors

if TYPE_CHECKING:
    from distill.losses.elatentlpips import LatentLPIPSNet


STAGES = ("classifier", "calibrate", "both")


@dataclass
class TrainLatentLPIPSConfig(RunConfig):
    output_dir: str = with_default(
        RunConfig,
        "output_dir",
        "runs/latent_lpips",
        help="run directory (config, metrics, checkpoints, weights)",
        aliases=["out_dir"],
    )
    max_train_steps: int = with_default(
        RunConfig, "max_train_steps", 100000, help="stage-1 optimizer steps", aliases=["steps"]
    )
    batch_size: int = with_default(RunConfig, "batch_size", 64, help="stage-1 batch size per process")
    num_workers: int = with_default(RunConfig, "num_workers", 4)
    checkpointing_steps: int = with_default(
        RunConfig,
        "checkpointing_steps",
        5000,
        help="save_state every N steps of the run (both stages counted), and at the end of each stage (0 = only there)",
        aliases=["save_every"],
    )
    checkpoints_total_limit: Optional[int] = with_default(RunConfig, "checkpoints_total_limit", 2)
    tracker_project_name: str = with_default(RunConfig, "tracker_project_name", "train_latent_lpips")
    stage: str = field(default="classifier", metadata={"help": "classifier, calibrate or both", "choices": STAGES})
    # VAE whose latent space the metric lives in.
    vae: str = field(
        default="",
        metadata={
            "help": "diffusers model path or Hub id holding the AutoencoderKL",
            "aliases": ["pretrained_model_name_or_path"],
        },
    )
    vae_subfolder: Optional[str] = field(
        default="vae", metadata={"help": "subfolder of `vae` (empty / null / . for the root)"}
    )
    latent_sampling: str = field(
        default="sample", metadata={"help": "latents from the VAE posterior", "choices": ("sample", "mode")}
    )
    # Network (stage 1 builds it from these; `init_from` loads one instead).
    init_from: str = field(default="", metadata={"help": "start from a save_pretrained dir, a published .pth or name"})
    stage_channels: list[int] = field(
        default_factory=lambda: [64, 128, 256, 512, 512], metadata={"help": "trunk widths"}
    )
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


# ------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """What both stages are given: the config, accelerator, frozen VAE and the shared loop."""

    cfg: TrainLatentLPIPSConfig
    acc: object
    vae: torch.nn.Module
    loop: TrainLoop
    resume: Optional[Path]  # the checkpoint to load when it belongs to the stage being started
    resume_stage: Optional[str]  # its stage (read once, before anything was prepared)


def start_stage(run: Stage, name: str, *, steps: int, batch_size: int, model, export, checkpoint_bytes) -> None:
    """Begin ``name`` on the loop with its prepared ``model``; load the checkpoint when it belongs to this stage."""
    run.loop.begin_stage(
        name,
        max_train_steps=steps,
        batch_size=batch_size,
        model=model,
        export=export,
        checkpoint_bytes=checkpoint_bytes,
    )
    if run.resume is not None and run.resume_stage == name:
        run.loop.resume(str(run.resume))


def _weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) * 4  # + optimiser states, roughly


def train_classifier(run: Stage) -> LatentLPIPSNet:
    from distill.losses.elatentlpips import LatentLPIPSNet
    from distill.losses.elatentlpips_weights import FetchOptions, load_latent_lpips

    cfg, acc, vae, loop = run.cfg, run.acc, run.vae, run.loop
    # 1. Load: the labelled images; the trunk from init_from, or a new one recording the VAE's convention.
    ds, num_classes = load_image_dataset(
        cfg.dataset,
        split=cfg.dataset_split,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        max_samples=cfg.max_train_samples,
    )
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
        raise ValueError(
            f"network takes {net.config.latent_channels} channels but the VAE has {vae.config.latent_channels}"
        )

    # 2. Build: the data loader, the trunk + linear classifier, the optimiser and its schedule.
    loader = classifier_loader(
        ds,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        resolution=cfg.resolution,
        crop_scale_min=cfg.crop_scale_min,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
    )
    net.heads.requires_grad_(False)  # unused by the classifier; frozen so DDP does not wait for their grads
    model = TrunkClassifier(net, num_classes)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.max_train_steps))

    # 3. Prepare: DDP (the scheduler steps once per optimiser step: step_scheduler_with_optimizer=False), the
    # stage on the loop, resumed when the checkpoint is this stage's.
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    trunk = lambda: acc.unwrap_model(model).net  # noqa: E731
    start_stage(
        run,
        "classifier",
        steps=cfg.max_train_steps,
        batch_size=cfg.batch_size,
        model=model,
        export=lambda path: trunk().save_pretrained(path),
        checkpoint_bytes=lambda: _weights_bytes(model),
    )
    vae.to(acc.device)
    model.train()

    # 4. Loop: images -> latents (the VAE outside autocast) -> classify.
    batches = cycle(loader)

    def micro_step(m, generator, latents, labels):
        logits = model(latents)
        loss = F.cross_entropy(logits.float(), labels)
        return None, {"loss": loss, "top1": (logits.argmax(1) == labels).float().mean()}, loss

    with loop.progress():
        while not loop.done:
            batch = next(batches)
            latents = encode(vae, batch["pixels"], cfg.latent_sampling)
            logs: dict[str, torch.Tensor] = {}
            loop.phase(
                purpose="classifier",
                model=model,
                optimizer=opt,
                params=model.parameters(),
                logs=logs,
                max_grad_norm=0.0,
                micro_step=lambda m, g: micro_step(m, g, latents, batch["label"]),
            )
            sched.step()
            loop.end_step(logs, extra={"lr": sched.get_last_lr()[0]})

    # 5. Save: the classifier head next to the run (the trunk is saved by the caller).
    acc.wait_for_everyone()
    net = trunk()
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file(acc.unwrap_model(model).fc.state_dict(), str(Path(cfg.output_dir) / "classifier_head.safetensors"))
    acc.free_memory()  # stage 2 prepares (and checkpoints) its own objects only
    return net


def calibrate_heads(run: Stage, net: LatentLPIPSNet) -> LatentLPIPSNet:
    cfg, acc, vae, loop = run.cfg, run.acc, run.vae, run.loop
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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.0, min(1.0, 2.0 * (1 - s / max(1, cfg.calib_steps))))
    )

    # 3. Prepare: DDP, the stage on the loop (resumed when the checkpoint is this stage's); the trunk's BN statistics
    # fixed.
    net, rank, opt, loader, sched = acc.prepare(net, rank, opt, loader, sched)
    raw_net = acc.unwrap_model(net)
    start_stage(
        run,
        "calibrate",
        steps=cfg.calib_steps,
        batch_size=cfg.calib_batch_size,
        model=net,
        export=lambda path: raw_net.save_pretrained(path),
        checkpoint_bytes=lambda: _weights_bytes(raw_net),
    )
    vae.to(acc.device)
    raw_net.eval()  # BN statistics of the trunk stay fixed ...
    raw_net.dropout.train()  # ... while the heads see dropout, as in LPIPS training

    # 4. Loop: which of two distortions is closer to the reference; heads kept non-negative.
    batches = cycle(loader)

    def micro_step(m, generator, ref, p0, p1, judge):
        # One forward for both pairs: DDP allows one forward per backward.
        d0, d1 = net(torch.cat([ref, ref]), torch.cat([p0, p1])).chunk(2)
        loss = F.binary_cross_entropy_with_logits(rank(d0.float(), d1.float()), judge.float())
        agree = ((d0 < d1).float() * (1 - judge) + (d1 < d0).float() * judge).mean()
        return None, {"loss": loss, "train_2afc": agree}, loss

    with loop.progress():
        while not loop.done:
            ref, p0, p1, judge = next(batches)
            ref, p0, p1 = (encode(vae, t, cfg.latent_sampling) for t in (ref, p0, p1))
            logs: dict[str, torch.Tensor] = {}
            loop.phase(
                purpose="calibrate",
                model=net,
                optimizer=opt,
                params=params,
                logs=logs,
                max_grad_norm=0.0,
                micro_step=lambda m, g: micro_step(m, g, ref, p0, p1, judge),
            )
            sched.step()
            raw_net.clamp_heads_()  # heads stay non-negative (projected gradient), as LPIPS does
            loop.end_step(logs, extra={"lr": sched.get_last_lr()[0]})

    # 5. Finish: no dropout in the saved metric; the held-out 2AFC score, when given.
    raw_net.dropout = nn.Identity()
    raw_net.register_to_config(head_dropout=0.0)
    if cfg.bapps_val_dir:
        score = None
        if acc.is_main_process:
            val = torch.utils.data.DataLoader(
                BAPPS2AFC(cfg.bapps_val_dir, cfg.calib_resolution), batch_size=cfg.calib_batch_size
            )
            score = score_2afc(raw_net, vae, val, "mode", acc.device)
        loop.record({"val_2afc": score} if score is not None else {})
    return raw_net


def save_net(acc, net: LatentLPIPSNet, out: Path) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        net.save_pretrained(out / "latent_lpips")  # safetensors + config.json


def validate(cfg: TrainLatentLPIPSConfig) -> None:
    """Fail on a bad combination of keys before anything heavy is loaded (choices: parse_config)."""
    if not cfg.vae:
        raise ConfigError(
            "set `vae` to a diffusers model path or Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    if cfg.stage in ("classifier", "both") and not cfg.dataset:
        raise ConfigError(
            "stage classifier needs `dataset` (a save_to_disk dir, parquet file/dir, or datasets Hub name)"
        )
    if cfg.stage == "calibrate" and not cfg.init_from:
        raise ConfigError(
            "stage calibrate needs `init_from` (a stage-1 run's latent_lpips dir, a .pth, or a published name)"
        )
    if cfg.stage in ("calibrate", "both") and not cfg.bapps_dir:
        raise ConfigError("stage calibrate needs `bapps_dir` (BAPPS 2AFC layout: ref/ p0/ p1/ judge/)")
    check_run_keys(cfg)
    require_positive(cfg, "lr", "calib_steps", "calib_batch_size", "calib_lr", "resolution", "calib_resolution")
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

    # 1. Prepare: the accelerator, seeds, the checkpoint to resume and its stage, trackers; a finished run stops here.
    out = Path(cfg.output_dir)
    resume = ckpt.resolve_resume(out, cfg.resume_from_checkpoint)
    position = (
        read_position(resume) if resume is not None else None
    )  # which stage to build, before anything is prepared
    # step_scheduler_with_optimizer=False: a prepared LR scheduler steps once per optimiser step on any number of
    # processes.
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,
    )
    cfg.mixed_precision = acc.mixed_precision  # the launcher's choice when unset: printed and saved with the run
    acc.print(f"mixed precision: {cfg.mixed_precision}")
    set_seed(cfg.seed, device_specific=True)
    stages = {"classifier": ("classifier",), "calibrate": ("calibrate",), "both": ("classifier", "calibrate")}[
        cfg.stage
    ]
    if position is not None and "nimg" not in position:
        raise ConfigError(
            f"{resume} was written by train_latent_lpips.py before it ran on the shared loop and cannot be "
            "resumed: use a new output_dir, or --resume_from_checkpoint none to start over in this one"
        )
    if position is not None and position["stage"] not in stages:
        raise ConfigError(
            f"{resume} is a checkpoint of stage {position['stage']}, which stage {cfg.stage} does not run: "
            "use a new output_dir, or --resume_from_checkpoint none to start over in this one"
        )
    last = (stages[-1], cfg.max_train_steps if stages[-1] == "classifier" else cfg.calib_steps)
    # Finished: the last step's checkpoint and the saved network (a kill between the two finishes the run again).
    if (
        position is not None
        and (position["stage"], position["step"]) == last
        and (out / "latent_lpips" / "config.json").is_file()
    ):
        acc.print(
            f"{out} is finished ({resume.name}, {position['stage']} step {position['step']}): weights in "
            f"{out / 'latent_lpips'}"
        )
        return
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        acc.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))
    loop = TrainLoop(
        acc,
        output_dir=out,
        seed=cfg.seed,
        max_train_steps=cfg.max_train_steps,
        gradient_accumulation_steps=1,
        batch_size=cfg.batch_size,
        checkpointing_steps=cfg.checkpointing_steps,
        validation_steps=0,
        checkpoints_total_limit=cfg.checkpoints_total_limit,
        ema=None,
        model=None,
        export=None,
        validate=None,
        checkpoint_bytes=lambda: 0,
        export_name="latent_lpips",
    )
    if resume is None:
        loop.resume("none")  # a fresh run: stats.jsonl starts empty
    run = Stage(
        cfg, acc, load_vae(cfg.vae, subfolder=cfg.vae_subfolder), loop, resume, position["stage"] if position else None
    )

    # 2. Stage 1: the trunk, trained as a latent classifier here, restored for calibration, or loaded.
    resuming_calibration = run.resume_stage == "calibrate"
    if cfg.stage in ("classifier", "both") and not resuming_calibration:
        net = train_classifier(run)
    elif resuming_calibration:
        from distill.losses.elatentlpips import LatentLPIPSNet

        net = LatentLPIPSNet.from_pretrained(resume / "latent_lpips")  # the weights load_state then restores
    else:
        from distill.losses.elatentlpips_weights import FetchOptions, load_latent_lpips

        net = load_latent_lpips(cfg.init_from, fetch=FetchOptions.for_accelerator(acc))

    # 3. Stage 2: the heads calibrated on BAPPS 2AFC.
    if cfg.stage in ("calibrate", "both"):
        net = calibrate_heads(run, net)

    # 4. Save: the network (the last stage's final step is a checkpoint too: a rerun does nothing more).
    save_net(acc, net.eval(), out)
    if acc.is_main_process:
        print(f"saved {out / 'latent_lpips'}", flush=True)
    acc.end_training()


if __name__ == "__main__":
    main()
