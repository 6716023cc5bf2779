"""Combine the quickstart's teacher and student evaluations into OUT/metrics.json (OUT/metrics-NAME.json
for a student other than the default), a side-by-side grid and a short report (report.txt, and
report.md embedding the grid and the run's curves.png). Both evaluations use the same prompts and seed,
so sample i of each was made from the same prompt and noise.

    python distill/digits/quickstart_report.py OUT [NAME]      # NAME: the student's run folder (default: student)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOLVER_NAMES = {"ddim": "DDIM", "dpmpp": "DPM-Solver++", "euler": "Euler", "flow_euler": "flow-matching Euler"}


def _diversity(metrics: dict) -> str:
    """A run's within-digit diversity, and its ratio to the real digits' when the reference was labelled."""
    ratio = f" ({metrics['diversity_ratio']:.2f}x the real digits')" if "diversity_ratio" in metrics else ""
    return f"{metrics['diversity']:.3g}{ratio}"


def main(out: Path, name: str = "student") -> None:
    teacher = json.loads((out / "eval-teacher" / "metrics.json").read_text())["metrics"]
    student = json.loads((out / f"eval-{name}" / "metrics.json").read_text())["metrics"]
    # Scored for the teacher, FID to the teacher's other-seed samples is the floor of that metric.
    teacher["fid_to_teacher_floor"] = teacher.pop("fid_to_teacher")
    config = (out / name / "config.yaml").read_text()
    kind = next((line.split(":", 1)[1].strip() for line in config.splitlines() if line.startswith("student:")), "?")
    result = {
        "student_kind": kind,
        "teacher": teacher,
        "student": student,
        "speedup": teacher["seconds_per_image"] / student["seconds_per_image"],
        "student_vs_teacher": {
            "prompt_accuracy_ratio": student["prompt_accuracy"] / max(teacher["prompt_accuracy"], 1e-9),
            "fid_to_teacher_over_floor": student["fid_to_teacher"] / max(teacher["fid_to_teacher_floor"], 1e-9),
            "fid_ratio": student["fid"] / max(teacher["fid"], 1e-9),
        },
    }
    if "diversity" in student and "diversity" in teacher:  # evaluations made before these metrics have none
        result["student_vs_teacher"]["diversity_over_teacher"] = student["diversity"] / max(teacher["diversity"], 1e-12)
    stats = [json.loads(line) for line in (out / name / "stats.jsonl").read_text().splitlines()]
    val = [r for r in stats if "val_lpips" in r]
    if val:
        result["student_training"] = {
            "val_lpips_init": val[0]["val_lpips"],
            "val_lpips_final": val[-1]["val_lpips"],
            "val_mse_init": val[0]["val_mse"],
            "val_mse_final": val[-1]["val_mse"],
        }
    suffix = "" if name == "student" else f"-{name}"
    (out / f"metrics{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for folder in ("eval-teacher", f"eval-{name}"):  # top row teacher, bottom row student
        rows.append(
            np.concatenate(
                [np.asarray(Image.open(out / folder / "samples" / f"{i:07d}.png").convert("RGB")) for i in range(10)],
                axis=1,
            )
        )
    grid = out / f"teacher_vs_{name}.png"
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (rows[0].shape[1] * 3, rows[0].shape[0] * 2 * 3), Image.NEAREST
    ).save(grid)
    ratios = result["student_vs_teacher"]
    sampler = json.loads((out / "pairs" / "manifest.json").read_text())[
        "config"
    ]  # the teacher's sampler, as the pairs used it
    solver = SOLVER_NAMES.get(sampler["scheduler"], sampler["scheduler"])
    lines = [
        f"Diffusion2GAN quickstart on the digits testbed (teacher: {sampler['num_inference_steps']} {solver} steps, "
        f"CFG {sampler['guidance_scale']:g}; {kind} student: one step)",
        f"FID to the teacher's samples  student {student['fid_to_teacher']:.2f}  floor (teacher vs itself, other "
        "seeds) "
        f"{teacher['fid_to_teacher_floor']:.2f}  (ratio {ratios['fid_to_teacher_over_floor']:.2f}; 1 = "
        "indistinguishable at this sample size)",
        f"prompt accuracy  teacher {teacher['prompt_accuracy']:.3f}  student {student['prompt_accuracy']:.3f}"
        f"  (ratio {ratios['prompt_accuracy_ratio']:.3f}, goal >= 0.95)",
        f"latency          teacher {teacher['seconds_per_image'] * 1000:.1f} ms/img  student "
        f"{student['seconds_per_image'] * 1000:.2f} ms/img  speedup {result['speedup']:.1f}x (goal >= 20)",
        f"FID to real digits (secondary: the 8 px originals reward blur)  teacher {teacher['fid']:.2f}  student "
        f"{student['fid']:.2f}",
    ]
    if (
        "precision" in student and "precision" in teacher
    ):  # mode collapse: realistic samples (precision) that miss the data's spread (recall)
        lines.append(
            "precision / recall vs real digits (k-NN manifolds, classifier features)  teacher "
            f"{teacher['precision']:.3f} / "
            f"{teacher['recall']:.3f}  student {student['precision']:.3f} / {student['recall']:.3f}"
        )
    if "diversity_over_teacher" in ratios:
        lines.append(
            f"diversity within a digit (mean pairwise feature distance)  teacher {_diversity(teacher)}  student "
            f"{_diversity(student)}  (student / teacher {ratios['diversity_over_teacher']:.2f}; near 0: mode collapse)"
        )
    if "e_latent_lpips" in student:
        lines.append(
            f"fidelity to the teacher on held-out pairs: E-LatentLPIPS {student['e_latent_lpips']:.4f}, PSNR "
            f"{student['psnr']:.1f} dB (the teacher against its own pairs: {teacher['e_latent_lpips']:.4f}, "
            f"{teacher['psnr']:.1f} dB)"
        )
    if val:
        t = result["student_training"]
        lines.append(
            f"held-out E-LatentLPIPS to the teacher: {t['val_lpips_init']:.4f} at init -> {t['val_lpips_final']:.4f}"
        )
    lines.append(f"grid: {grid} (top: teacher, bottom: student, same noise and prompts)")
    (out / f"report{suffix}.txt").write_text("\n".join(lines) + "\n")
    pictures = [f"![teacher (top) and student (bottom), same noise and prompts]({grid.name})"]
    if (out / name / "curves.png").is_file():  # written by train_student.py at every validation
        pictures.append(f"![training curves]({name}/curves.png)")
    markdown = [f"# {lines[0]}", "", *pictures, "", *(f"- {line}" for line in lines[1:-1])]
    (out / f"report{suffix}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"), sys.argv[2] if len(sys.argv) > 2 else "student")
