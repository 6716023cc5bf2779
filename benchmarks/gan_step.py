"""Images per second of the from-scratch GAN step on the digits, side by side in one run: ``train_gan.py``'s step at the
recipe against a bare PyTorch loop of the same modules and losses, and the recipe against the previous one.

    python benchmarks/gan_step.py [--steps 40] [--warmup 8]

1. ``train_gan.py`` as a user runs it (a process of its own) with ``--recipe`` for ``--steps`` steps; its images/s from
   the ``step_time`` of stats.jsonl after ``--warmup`` steps (a step's data reading, phases, EMA and logs; checkpoints
   and sample grids are not steps).
2. A bare loop in this process: the generator, discriminator and optimisers made by the same builders from the same
   config, the same terms (the trainer's view and GAN step: augmentation, mismatch, mode seeking, lazy R1), on real
   images already in memory with their captions encoded once: G step, D step; no TrainLoop, checkpoints, EMA, logs or
   data reading. Its top operations (torch.profiler)
   are printed: docs/from-scratch.md quotes them.
3. ``train_gan.py`` with ``--previous`` (the recipe before the from-scratch redesign: a projected D on the digits
   classifier beside a multiscale D, in the digits VAE's latent space; its latent cache is made first), as in 1.
4. With ``--previous_tree DIR`` (a checkout of the code before the redesign), that tree's train_gan.py and its own
   ``digits_gigagan.yaml`` (the same previous recipe, on the code as it was), timed by two runs' wall times.
Last line: ``overhead_ratio=<train_gan / bare> recipe_over_previous=<images per minute, recipe / previous>``
[``recipe_over_previous_code=<recipe / the previous recipe on its own code>``].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_train_gan(config: str, dataset: Path, out: Path, *, steps: int, warmup: int, threads: int) -> float:
    """Images per second of train_gan.py's steps after ``warmup`` (median step time)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        str(ROOT / "distill" / "train_gan.py"),
        "--config",
        config,
        "--dataset",
        str(dataset),
        "--output_dir",
        str(out),
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(steps),
        "--validation_steps",
        str(steps),
        "--report_to",
        "none",
        "--resume_from_checkpoint",
        "none",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: train_gan.py failed ({config}):\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_time" in r][warmup:]
    return rows[0]["nimg"] / rows[0]["step"] / statistics.median(r["step_time"] for r in rows)


def wall_images_per_second(tree: Path, config: str, dataset: Path, out: Path, *, steps: int, threads: int) -> float:
    """Images per second of another checkout's train_gan.py (``tree``, whose stats.jsonl may have no step_time): two
    runs of ``steps`` and ``2 * steps`` steps, the difference of their wall times, so start-up and export cancel."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(tree),
    )
    wall = {}
    for n in (steps, 2 * steps):
        cmd = [
            sys.executable,
            str(tree / "distill" / "train_gan.py"),
            "--config",
            config,
            "--dataset",
            str(dataset),
            "--output_dir",
            str(out / str(n)),
            "--max_train_steps",
            str(n),
            "--checkpointing_steps",
            str(2 * steps),
            "--validation_steps",
            str(2 * steps),
            "--report_to",
            "none",
            "--resume_from_checkpoint",
            "none",
        ]
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        wall[n] = time.perf_counter() - start
        if res.returncode:
            sys.exit(f"error: {tree}'s train_gan.py failed ({config}):\n{res.stderr[-3000:]}")
    row = json.loads((out / str(steps) / "stats.jsonl").read_text().splitlines()[0])
    return steps * row["nimg"] / row["step"] / (wall[2 * steps] - wall[steps])


def bare_loop(config: str, dataset: Path, *, steps: int, warmup: int, profile_steps: int) -> float:
    """Images per second of the same modules and losses in a plain loop (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from data_gen.image_text import image_transform, open_image_text, read_rows
    from distill.core.config import parse_config
    from distill.scratch.phases import RealBatch, RealImagesView
    from distill.scratch.setup import add_networks, load_frozen
    from distill.train_gan import GANConfig
    from distill.training.gan_step import GANStep, build_gan_optimizers, to_channels_last

    cfg = parse_config(GANConfig, ["--config", config, "--dataset", str(dataset)])
    torch.manual_seed(cfg.seed)
    parts = load_frozen(cfg, device=torch.device("cpu"))
    ds = open_image_text(str(dataset), caption_column=cfg.caption_column)
    images, captions = read_rows(
        ds,
        list(range(len(ds))),
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        transform=image_transform(cfg.resolution),
        generator=torch.Generator().manual_seed(0),
    )
    parts.tabulate(captions)
    flat = images.transpose(0, 1).flatten(1)
    add_networks(parts, cfg, device=torch.device("cpu"), latent_stats=(flat.mean(1).tolist(), flat.std(1).tolist()))
    gen, disc = parts.generator, parts.discriminator
    if cfg.channels_last:
        to_channels_last(gen, disc)
    opt_g, opt_d = build_gan_optimizers(
        generator=gen,
        discriminator=disc,
        optimizer=cfg.optimizer,
        learning_rate_g=cfg.learning_rate_g,
        learning_rate_d=cfg.learning_rate_d,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        linear_lr_by_fan_in=cfg.linear_lr_by_fan_in,
        d_lr_by_fan_in=cfg.d_lr_by_fan_in,
    )
    shape = (gen.config.latent_channels, gen.config.sample_size, gen.config.sample_size)
    # The trainer's own terms (augmentation, mismatch, mode seeking, R1 weight) without its loop: no TrainLoop phases,
    # per-micro-batch streams, gradient clipping, EMA, logs, checkpoints or data reading.
    view = RealImagesView(
        generator=gen,
        discriminator=disc,
        discriminator_unwrapped=disc,
        noise_shape=shape,
        mismatch=cfg.mismatch_weight > 0,
        mode_seeking_weight=cfg.mode_seeking_weight,
    )
    terms = GANStep(
        None,
        view=view,
        generator=gen,
        discriminator=disc,
        discriminator_unwrapped=disc,
        opt_g=opt_g,
        opt_d=opt_d,
        loss=cfg.loss,
        mismatch_weight=cfg.mismatch_weight,
        r1_gamma=cfg.r1_gamma,
        r1_interval=cfg.r1_interval,
        max_grad_norm=0.0,
    )
    d_params = [p for p in disc.parameters() if p.requires_grad]
    rng = torch.Generator().manual_seed(cfg.seed)

    def loss_of(t: dict) -> torch.Tensor:
        return sum(v for k, v in t.items() if not k.endswith("_logit"))  # the mean logits are logged only

    def step(i: int) -> None:
        rows = torch.randint(len(images), (cfg.batch_size,), generator=rng)
        picked = [captions[int(r)] for r in rows]
        batch = RealBatch(images[rows], parts.encode(picked), picked)
        for p in d_params:
            p.requires_grad_(False)
        generated, g = terms.g_terms(batch, rng)
        opt_g.zero_grad(set_to_none=True)
        loss_of(g).backward()
        opt_g.step()
        for p in d_params:
            p.requires_grad_(True)
        fake, pyramid, cond = generated
        d = terms.d_terms(batch, (fake.detach(), [x.detach() for x in pyramid], cond), rng, r1=terms.r1_due(i))
        opt_d.zero_grad(set_to_none=True)
        loss_of(d).backward()
        opt_d.step()

    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(profile_steps):
            step(i)
    print(f"bare loop: top operations over {profile_steps} steps (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return cfg.batch_size / statistics.median(times[warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "configs" / "scratch" / "digits_gigagan.yaml"))
    p.add_argument("--previous", default=str(ROOT / "configs" / "scratch" / "digits_gigagan_projected.yaml"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--previous_tree",
        default="",
        help="a checkout of the code before the from-scratch redesign "
        "(`git worktree add /tmp/before af713c1^`): its own train_gan.py and configs/scratch/digits_gigagan.yaml "
        "are timed too, the previous recipe as it ran then",
    )
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from data_gen.digits import save_digits_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits = save_digits_imagefolder(tmp / "digits-train")
        recipe = run_train_gan(
            args.recipe, digits, tmp / "recipe", steps=args.steps, warmup=args.warmup, threads=args.threads
        )
        print(f"train_gan.py, recipe ({Path(args.recipe).name}): {recipe:.1f} images/s", flush=True)
        bare = bare_loop(args.recipe, digits, steps=args.steps, warmup=args.warmup, profile_steps=5)
        print(f"bare loop, same modules and losses: {bare:.1f} images/s", flush=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        res = subprocess.run(
            [
                sys.executable,
                str(ROOT / "distill" / "cache_latents.py"),
                "--dataset",
                str(digits),
                "--vae",
                str(ROOT / "teachers" / "assets" / "digits-teacher"),
                "--resolution",
                "32",
                "--output_dir",
                str(tmp / "latents"),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode:
            sys.exit(f"error: cache_latents.py failed:\n{res.stderr[-3000:]}")
        previous = run_train_gan(
            args.previous, tmp / "latents", tmp / "previous", steps=args.steps, warmup=args.warmup, threads=args.threads
        )
        print(f"train_gan.py, previous recipe ({Path(args.previous).name}): {previous:.1f} images/s", flush=True)
        last = f"overhead_ratio={recipe / bare:.3f} recipe_over_previous={recipe / previous:.2f}"
        if args.previous_tree:
            tree = Path(args.previous_tree).resolve()
            before = wall_images_per_second(
                tree,
                str(tree / "configs" / "scratch" / "digits_gigagan.yaml"),
                tmp / "latents",
                tmp / "before",
                steps=args.steps,
                threads=args.threads,
            )
            print(f"{tree}'s train_gan.py, its digits_gigagan.yaml: {before:.1f} images/s", flush=True)
            last += f" recipe_over_previous_code={recipe / before:.2f}"
    print(last)


if __name__ == "__main__":
    main()
