"""One-step latency of the three student architectures at the same batch, side by side in one process.

Each student is built for one teacher (the UNet student from its weights, GigaGAN and StyleGAN-T at a
preset size: latency does not depend on the weights) and wrapped in ``OneStepGANPipeline`` with the
teacher's VAE and text encoder; the whole call is timed (prompt encoding and VAE decode included), the
students alternate and medians are compared. Also prints each generator's parameter count.
Last line: ``gigagan_over_unet=<ms ratio> stylegan_t_over_unet=<ms ratio>`` (below 1: faster than the UNet).

    python benchmarks/student_speed.py                                   # the digits testbed, batch 64, CPU
    python benchmarks/student_speed.py --teacher runwayml/stable-diffusion-v1-5 --student_size base --batch_size 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from students import GigaGANGenerator, OneStepGANPipeline, StyleGANTGenerator, UNetStudent
from teachers import load_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="teachers/assets/digits-teacher", help="teacher folder or hub id")
    p.add_argument("--student_size", default="small", help="gigagan / stylegan_t preset: tiny, small, base")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    teacher = load_teacher(args.teacher, torch_dtype=dtype, device=device)
    tp = teacher.pipe
    unet = tp.unet
    shape = dict(
        latent_channels=teacher.latent_channels,
        sample_size=int(unet.config.sample_size),
        cross_attention_dim=int(unet.config.cross_attention_dim),
        pooled_dim=int(tp.text_encoder_2.config.projection_dim) if getattr(tp, "text_encoder_2", None) else 0,
    )
    torch.manual_seed(0)
    students = {
        "unet": UNetStudent.from_teacher(unet, tp.scheduler),
        "gigagan": GigaGANGenerator.for_latents(**shape, size=args.student_size),
        "stylegan_t": StyleGANTGenerator.for_latents(**shape, size=args.student_size),
    }
    pipes = {}
    for name, student in students.items():
        pipes[name] = OneStepGANPipeline(
            student=student.to(device, dtype).eval(),
            vae=tp.vae,
            text_encoder=tp.text_encoder,
            tokenizer=tp.tokenizer,
            text_encoder_2=getattr(tp, "text_encoder_2", None),
            tokenizer_2=getattr(tp, "tokenizer_2", None),
        )
        pipes[name].set_progress_bar_config(disable=True)
    noise = torch.randn(
        args.batch_size,
        *teacher.latent_shape(int(unet.config.sample_size) * tp.vae_scale_factor),
        generator=torch.Generator().manual_seed(0),
    ).to(device, dtype)
    prompts = [f"a handwritten digit {i % 10}" for i in range(args.batch_size)]

    def timed(pipe) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(prompts, latents=noise, output_type="pt")
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for pipe in pipes.values():  # warm-up
        timed(pipe)
    times = {k: [] for k in pipes}
    for _ in range(args.repeats):
        for k, pipe in pipes.items():
            times[k].append(timed(pipe))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"device={device} teacher={args.teacher} batch={args.batch_size} student_size={args.student_size} "
        f"latent={tuple(noise.shape[1:])} (prompt encoding and VAE decode included; medians of {args.repeats})"
    )
    for k, v in med.items():
        params = sum(q.numel() for q in students[k].parameters()) / 1e6
        print(f"{k:11s} {params:7.2f} M params  {v * 1000:8.1f} ms/batch  {v / args.batch_size * 1000:7.2f} ms/image")
    print(
        f"gigagan_over_unet={med['gigagan'] / med['unet']:.3f} "
        f"stylegan_t_over_unet={med['stylegan_t'] / med['unet']:.3f}"
    )


if __name__ == "__main__":
    main()
