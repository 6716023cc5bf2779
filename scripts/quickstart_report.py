"""Combine the quickstart's teacher and student evaluations into OUT/metrics.json, a side-by-side grid
and a short text report. Both evaluations use the same prompts and seed, so sample i of each was made
from the same prompt and noise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(out: Path) -> None:
    teacher = json.loads((out / "eval-teacher" / "metrics.json").read_text())["metrics"]
    student = json.loads((out / "eval-student" / "metrics.json").read_text())["metrics"]
    result = {
        "teacher": teacher,
        "student": student,
        "speedup": teacher["seconds_per_image"] / student["seconds_per_image"],
        "student_vs_teacher": {
            "prompt_accuracy_ratio": student["prompt_accuracy"] / max(teacher["prompt_accuracy"], 1e-9),
            "fid_ratio": student["fid"] / max(teacher["fid"], 1e-9),
        },
    }
    stats = [json.loads(line) for line in (out / "student" / "stats.jsonl").read_text().splitlines()]
    val = [r for r in stats if "val_lpips" in r]
    if val:
        result["student_training"] = {"val_lpips_init": val[0]["val_lpips"], "val_lpips_final": val[-1]["val_lpips"],
                                      "val_mse_init": val[0]["val_mse"], "val_mse_final": val[-1]["val_mse"]}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for name in ("eval-teacher", "eval-student"):  # top row teacher, bottom row student
        rows.append(np.concatenate([np.asarray(Image.open(out / name / "samples" / f"{i:07d}.png").convert("RGB"))
                                    for i in range(10)], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * 3, rows[0].shape[0] * 2 * 3), Image.NEAREST).save(
        out / "teacher_vs_student.png")
    lines = [
        "Diffusion2GAN quickstart on the digits testbed (teacher: 25 DDIM steps, CFG 4; student: one step)",
        f"prompt accuracy  teacher {teacher['prompt_accuracy']:.3f}  student {student['prompt_accuracy']:.3f}"
        f"  (ratio {result['student_vs_teacher']['prompt_accuracy_ratio']:.3f}, goal >= 0.95)",
        f"classifier FID   teacher {teacher['fid']:.2f}  student {student['fid']:.2f}"
        f"  (ratio {result['student_vs_teacher']['fid_ratio']:.3f}, goal <= 1.2)",
        f"latency          teacher {teacher['seconds_per_image'] * 1000:.1f} ms/img  student "
        f"{student['seconds_per_image'] * 1000:.2f} ms/img  speedup {result['speedup']:.1f}x (goal >= 20)",
    ]
    if "e_latent_lpips" in student:
        lines.append(f"fidelity to the teacher on held-out pairs: E-LatentLPIPS {student['e_latent_lpips']:.4f}, PSNR "
                     f"{student['psnr']:.1f} dB (the teacher against its own pairs: {teacher['e_latent_lpips']:.4f}, "
                     f"{teacher['psnr']:.1f} dB)")
    if val:
        t = result["student_training"]
        lines.append(f"held-out E-LatentLPIPS to the teacher: {t['val_lpips_init']:.4f} at init -> {t['val_lpips_final']:.4f}")
    lines.append(f"grid: {out / 'teacher_vs_student.png'} (top: teacher, bottom: student, same noise and prompts)")
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))
