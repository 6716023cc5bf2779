"""Pairs/s of generate_pairs' shard loop vs. a bare loop calling the diffusers pipeline.

Same teacher, batch, steps, CFG and row count; runs alternate (ours, bare, ours, bare, ...) and the
median of each is compared, so machine noise hits both alike. Last line: ``ratio=<ours/bare>``.

    python benchmarks/pairs_throughput.py                      # tiny random SD1.5-style teacher (CPU)
    python benchmarks/pairs_throughput.py --size full --resolution 512 --steps 50   # SD1.5 shapes (GPU)
    python benchmarks/pairs_throughput.py --teacher /path/to/pipeline
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from distill.generate_pairs import PairsConfig, generate_shards
from teachers import load_teacher
from teachers.testing import build_random_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="pipeline folder or hub id; default: a random teacher")
    p.add_argument("--family", default="sd15", help="random teacher family: sd15, sd2-v, sdxl")
    p.add_argument("--size", default="tiny", help="random teacher size: tiny or full")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rows", type=int, default=32, help="rows per timed run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = args.teacher or str(build_random_teacher(Path(tmp) / "teacher", family=args.family, size=args.size))
        teacher = load_teacher(path, torch_dtype=dtype, device=device)
        shape = teacher.latent_shape(args.resolution)
        prompts = [f"a photo of object number {i}" for i in range(args.rows)]
        cfg = PairsConfig(
            teacher=path,
            num_pairs=args.rows,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            resolution=args.resolution,
            batch_size=args.batch_size,
            shard_size=args.rows,
        )

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        def ours(run: int) -> float:
            out = Path(tmp) / f"ours-{run}"
            (out / "data").mkdir(parents=True)
            sync()
            t = time.perf_counter()
            generate_shards(teacher, cfg=cfg, prompts=prompts, shards=[0], out=out, latent_shape=shape)
            sync()
            return time.perf_counter() - t

        def bare(run: int) -> float:
            gen = torch.Generator("cpu").manual_seed(run)
            sync()
            t = time.perf_counter()
            for b in range(0, args.rows, args.batch_size):
                n = min(args.batch_size, args.rows - b)
                noise = torch.randn((n, *shape), generator=gen).to(device, dtype)
                teacher.pipe(
                    prompt=prompts[b : b + n],
                    latents=noise,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    output_type="latent",
                ).images.cpu()
            sync()
            return time.perf_counter() - t

        ours(-1), bare(-1)  # warm-up
        t_ours, t_bare = [], []
        for r in range(args.repeats):
            t_ours.append(ours(r))
            t_bare.append(bare(r))
    ours_rate = args.rows / statistics.median(t_ours)
    bare_rate = args.rows / statistics.median(t_bare)
    print(
        f"device={device} teacher={'random-' + args.family + '-' + args.size if not args.teacher else args.teacher} "
        f"resolution={args.resolution} steps={args.steps} batch={args.batch_size} rows={args.rows}"
    )
    print(f"ours={ours_rate:.3f} pairs/s bare={bare_rate:.3f} pairs/s")
    print(f"ratio={ours_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
