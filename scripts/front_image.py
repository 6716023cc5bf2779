"""The front page's image: the teacher and a one-step student on the same noise and prompts, with the
time each took per image.

    python scripts/front_image.py --pipeline runs/quickstart/student/pipeline [--output
    configs/digits/figures/teacher_vs_student.png]

Top row: the teacher (its ODE sampler as in the student's pairs: DDIM, steps and CFG from the pairs'
manifest); bottom row: the student, one generator step. Image i uses the noise of a pairs row with
``seed == i`` and the prompt ``a handwritten digit <i>`` unless ``--prompts`` is given. Times: the median
of ``--repeats`` timed batches after one warm-up, VAE decode included, on this machine's CPU or GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def timed(fn, repeats: int) -> tuple[list[Image.Image], float]:
    """(images, median seconds per call) after one untimed warm-up call."""
    images = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return images, statistics.median(times)


def render(
    teacher: list[Image.Image], student: list[Image.Image], *, labels: tuple[str, str], scale: int
) -> Image.Image:
    side = teacher[0].width * scale
    pad, label_h = 6, 26
    width = len(teacher) * (side + pad) + pad
    out = Image.new("RGB", (width, 2 * (label_h + side + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=16)
    for row, (images, label) in enumerate(zip((teacher, student), labels)):
        y = pad + row * (label_h + side + pad)
        draw.text((pad, y + 3), label, fill="black", font=font)
        for i, image in enumerate(images):
            out.paste(image.resize((side, side), Image.NEAREST), (pad + i * (side + pad), y + label_h))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--pipeline", required=True, help="an exported one-step student folder")
    parser.add_argument("--output", default="configs/digits/figures/teacher_vs_student.png")
    parser.add_argument("--prompts", nargs="+", default=[f"a handwritten digit {d}" for d in DIGITS])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=3, help="nearest-neighbour enlargement of each image")
    args = parser.parse_args()

    from data_gen.noise import noise_for_seed
    from distill.demo import pairs_teacher
    from students import OneStepGANPipeline
    from teachers import load_teacher

    torch.set_grad_enabled(False)
    student = OneStepGANPipeline.from_pretrained(args.pipeline)
    sampler = pairs_teacher(args.pipeline)
    if sampler is None:
        sys.exit(
            f"error: {args.pipeline} names no readable pairs folder (pairs_split.json): the teacher and its sampler "
            "are unknown"
        )
    teacher = load_teacher(sampler["teacher"], scheduler=sampler["scheduler"]).pipe
    side = student.default_resolution() // student.vae_scale_factor
    noise = torch.stack(
        [noise_for_seed(i, (student.student.latent_channels, side, side)) for i in range(len(args.prompts))]
    )
    teacher_images, teacher_s = timed(
        lambda: (
            teacher(
                args.prompts,
                latents=noise,
                num_inference_steps=sampler["steps"],
                guidance_scale=sampler["guidance_scale"],
            ).images
        ),
        args.repeats,
    )
    student_images, student_s = timed(lambda: student(args.prompts, latents=noise).images, args.repeats)
    n = len(args.prompts)
    labels = (
        f"teacher: {sampler['steps']} {sampler['scheduler'].upper()} steps, CFG {sampler['guidance_scale']:g} "
        f"- {teacher_s / n * 1000:.1f} ms per image",
        f"one-step student - {student_s / n * 1000:.2f} ms per image ({teacher_s / student_s:.0f}x faster)",
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(teacher_images, student_images, labels=labels, scale=args.scale).save(out, optimize=True)
    diff = np.mean(
        [
            np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean()
            for a, b in zip(teacher_images, student_images)
        ]
    )
    print(f"{labels[0]}\n{labels[1]}\nmean |teacher - student| = {diff:.1f} / 255\nwrote {out}")


if __name__ == "__main__":
    main()
