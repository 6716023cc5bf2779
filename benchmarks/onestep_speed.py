"""Latency of the one-step pipeline vs. the teacher pipeline, and vs. the unavoidable floor.

Same resolution, VAE decode included everywhere; the teacher runs N steps with CFG. The floor is one
generator forward + one VAE decode timed alone (text encoding excluded), i.e. the work the one-step
pipeline cannot avoid; ``overhead`` is what the pipeline adds on top. Runs alternate and medians are
compared. Last line: ``speedup=<teacher/student> overhead=<student/floor>``.

    python benchmarks/onestep_speed.py                         # tiny random SD1.5-style models (CPU)
    python benchmarks/onestep_speed.py --size full --resolution 512 --steps 25   # SD1.5 shapes (GPU)
    python benchmarks/onestep_speed.py --teacher teachers/assets/digits-teacher --batch_size 64   # the digits testbed
    python benchmarks/onestep_speed.py --teacher teachers/assets/digits-teacher-sd3 --batch_size 64
    --max_sequence_length 4
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

from students import OneStepGANPipeline, SD3TransformerStudent, UNetStudent
from teachers import load_teacher
from teachers.testing import build_random_teacher


def _enc(pipe, prompts, resolution, device, dtype):
    cond = pipe.encode_prompt(prompts, (resolution, resolution)).to(device=device, dtype=dtype)
    return cond.prompt_embeds, cond.added_cond_kwargs()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teacher", default="", help="a teacher folder / hub id to time (default: a random one of --family/--size)"
    )
    p.add_argument("--family", default="sd15")
    p.add_argument("--size", default="tiny", help="tiny or full (published SD shapes, random weights)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--max_sequence_length", type=int, default=None, help="SD3 teachers: T5 tokens (zero tokens without T5)"
    )
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = args.teacher or build_random_teacher(Path(tmp) / "teacher", family=args.family, size=args.size)
        teacher = load_teacher(str(path), torch_dtype=dtype, device=device)
        tp = teacher.pipe
        teacher_kwargs, sd3 = {}, {}
        if teacher.family == "sd3":  # the transformer student, with SD3's text conditioning and T5 length
            length = args.max_sequence_length if args.max_sequence_length is not None else 256
            teacher_kwargs = {"max_sequence_length": length}
            student = SD3TransformerStudent.from_teacher(tp.transformer, tp.scheduler).to(device, dtype)
            sd3 = dict(
                text_encoder_3=tp.text_encoder_3,
                tokenizer_3=tp.tokenizer_3,
                text_conditioning="sd3",
                max_sequence_length=length,
                joint_attention_dim=tp.transformer.config.joint_attention_dim,
            )
        else:
            student = UNetStudent.from_teacher(tp.unet, tp.scheduler).to(device, dtype)
        pipe = OneStepGANPipeline(
            student=student,
            vae=tp.vae,
            text_encoder=tp.text_encoder,
            tokenizer=tp.tokenizer,
            text_encoder_2=getattr(tp, "text_encoder_2", None),
            tokenizer_2=getattr(tp, "tokenizer_2", None),
            **sd3,
        )
        pipe.set_progress_bar_config(disable=True)
        shape = (args.batch_size, *teacher.latent_shape(args.resolution))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        prompts = [f"a photo of object number {i}" for i in range(args.batch_size)]
        cond = pipe.encode_prompt(prompts, (args.resolution, args.resolution)).to(device=device, dtype=dtype)

        def timed(fn) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        runs = {
            "teacher": lambda: tp(
                prompt=prompts,
                latents=noise,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
                output_type="pt",
                **teacher_kwargs,
            ),
            "student": lambda: pipe(prompts, latents=noise, output_type="pt"),
            "floor": lambda: pipe.decode_latents(
                student(noise, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs())
            ),
            # The same plus prompt encoding, which a text-conditioned pipeline cannot skip either.
            "floor+text": lambda: pipe.decode_latents(
                student(noise, *_enc(pipe, prompts, args.resolution, device, dtype))
            ),
        }
        for fn in runs.values():  # warm-up
            timed(fn)
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    models = args.teacher or f"random-{args.family}-{args.size}"
    print(
        f"device={device} models={models} resolution={args.resolution} batch={args.batch_size} "
        f"teacher_steps={args.steps} cfg={args.guidance_scale}"
    )
    for k, v in med.items():
        print(f"{k:10s} {v * 1000:9.1f} ms/batch  {v / args.batch_size * 1000:8.2f} ms/image")
    print(f"overhead over floor+text (pipeline bookkeeping alone): {med['student'] / med['floor+text']:.3f}")
    print(f"speedup={med['teacher'] / med['student']:.2f} overhead={med['student'] / med['floor']:.3f}")


if __name__ == "__main__":
    main()
