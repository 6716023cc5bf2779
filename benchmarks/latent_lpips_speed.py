"""E-LatentLPIPS vs decode + pixel LPIPS: loss+backward time and peak extra memory (Diffusion2GAN Table 1).

The paper reports, per iteration on an A100, 117 ms / 15 GB (pixel LPIPS) vs 12.1 ms / 0.6 GB
(E-LatentLPIPS). Both losses here see the same random latents and batch; weights are random (timing
does not depend on them): the E-LatentLPIPS net has the published VGG16-BN layout, the VAE is built
from the SD1.5 VAE config, LPIPS is ``lpips.LPIPS(net="vgg", pnet_rand=True)`` (no download).

Each method runs in its own spawned process so that its memory peak is not hidden by the other's:
  - CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the first loss call;
  - CPU: peak RSS (``resource.getrusage(...).ru_maxrss``) minus the RSS (/proc/self/statm) just before
    the first loss call, i.e. the extra host memory the loss+backward needs on top of models and inputs.
Time is the mean wall time of ``loss(pred, target).mean().backward()`` after warm-up (synchronised).

    python benchmarks/latent_lpips_speed.py                       # GPU: 512 px, batch 8, SD1.5 VAE
    python benchmarks/latent_lpips_speed.py --device cpu          # CPU: the small setting (128 px, batch 2)

On CPU the small setting is the default (512 px, batch 8 takes over 5 minutes and 20 GB there); pass
``--resolution`` / ``--batch`` to override. A worker that dies (killed, out of memory) or exceeds
``--timeout`` ends the run with one line and a non-zero exit code (the worker's, 128 + signal if killed).

The last line printed is ``time_ratio=<pixel/latent> memory_ratio=<pixel/latent>``.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_lib
import resource
import sys
import time

import torch
import torch.multiprocessing as mp

# The SD1.5 VAE config (stable-diffusion-v1-5, vae/config.json).
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build(method: str, device: torch.device, dtype: torch.dtype):
    from distill.losses import ELatentLPIPS, LatentLPIPSNet, PixelLPIPS, build_pixel_lpips

    def place(m):  # .to(dtype) only when asked: diffusers warns on any dtype cast
        m = m.to(device)
        return m if dtype == torch.float32 else m.to(dtype)

    torch.manual_seed(0)
    if method == "latent":
        return ELatentLPIPS(place(LatentLPIPSNet(latent_channels=4)), augment="bg", l1_weight=1.0)
    from diffusers import AutoencoderKL

    vae = place(AutoencoderKL(**SD15_VAE))
    return PixelLPIPS(vae, lpips_net=build_pixel_lpips(net="vgg", pretrained_trunk=False).to(device))


def _worker(method: str, args, queue) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    loss_fn = _build(method, device, dtype)
    lat = args.resolution // 8
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(args.batch, 4, lat, lat, generator=g).to(device, dtype).requires_grad_(True)
    target = torch.randn(args.batch, 4, lat, lat, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        pred.grad = None
        loss_fn(pred, target).float().mean().backward()

    # Memory of the first call (nothing cached from earlier iterations on the CPU side).
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()) - base
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    queue.put((method, (time.perf_counter() - t0) / args.iters, max(peak, 1)))


def _run_worker(ctx, method: str, args) -> tuple[float, int]:
    """Run one worker; wait for its result while checking it is alive, within ``args.timeout`` seconds."""
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(method, args, queue))
    proc.start()
    print(f"{method}: worker pid {proc.pid}", flush=True)
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            name, sec, mem = queue.get(timeout=1.0)
            break
        except queue_lib.Empty:
            if not proc.is_alive():
                code = proc.exitcode
                status = 128 - code if code is not None and code < 0 else (code or 1)
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
                sys.stderr.write(
                    f"error: the {method} worker (pid {proc.pid}) {how} before reporting: "
                    "out of memory? try --small or a smaller --resolution / --batch\n"
                )
                sys.exit(status)
            if time.monotonic() > deadline:
                proc.kill()
                proc.join()
                sys.stderr.write(
                    f"error: the {method} worker took over --timeout {args.timeout:.0f} s: "
                    "try --small or a smaller --resolution / --batch\n"
                )
                sys.exit(124)
    proc.join()
    return sec, mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="small run: 128 px (16x16 latents), batch 2 (the CPU default)")
    p.add_argument(
        "--resolution", type=int, default=None, help="pixel size (latents are 8x smaller); default 512 on GPU"
    )
    p.add_argument("--batch", type=int, default=None, help="batch size; default 8 on GPU (2 with --small)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations; default 20 (3 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations; default 5 (1 with --small)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per worker")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds each worker may take before the run fails")
    args = p.parse_args()
    if args.device == "cpu" and not args.small and args.resolution is None and args.batch is None:
        args.small = True
        print(
            "CPU: using the small setting (128 px, batch 2; the GPU default of 512 px, batch 8 needs over 20 GB and "
            "5 minutes here); pass --resolution / --batch to override",
            flush=True,
        )
    args.resolution = args.resolution or (128 if args.small else 512)
    args.batch = args.batch or (2 if args.small else 8)
    args.iters = args.iters or (3 if args.small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    if min(args.resolution, args.batch, args.iters, args.threads) <= 0 or args.warmup < 0 or args.resolution % 8:
        p.error("resolution (a multiple of 8), batch, iters and threads must be positive; warmup must not be negative")
    mem_kind = "CUDA max_memory_allocated delta" if args.device.startswith("cuda") else "peak RSS delta"
    print(
        f"device={args.device} dtype={args.dtype} resolution={args.resolution}px latents={args.resolution // 8}x"
        f"{args.resolution // 8} batch={args.batch} iters={args.iters} vae=SD1.5-config memory={mem_kind}",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    results = {}
    for method in ("latent", "pixel"):  # one process each, one after the other: no shared peaks or cores
        sec, mem = _run_worker(ctx, method, args)
        results[method] = (sec, mem)
        label = "E-LatentLPIPS" if method == "latent" else "VAE decode + pixel LPIPS"
        print(f"{label:26s} time={sec * 1e3:9.1f} ms/iter  extra_memory={mem / 2**20:9.1f} MiB", flush=True)
    (t_lat, m_lat), (t_pix, m_pix) = results["latent"], results["pixel"]
    print(f"time_ratio={t_pix / t_lat:.2f} memory_ratio={m_pix / m_lat:.2f}", flush=True)


if __name__ == "__main__":
    main()
