"""Summarise a from-scratch digits run (distill/digits/scratch.sh): OUT/metrics-GEN.json, OUT/report-GEN.txt and
OUT/grid-GEN.png (the run's last sample grid: one row per digit class, one column per noise map).

    python distill/digits/scratch_report.py OUT GEN [--train_seconds S] [--total_seconds S]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# Issue 21: accuracy >= 0.90, FID <= 1.5 x the teacher's, recall >= 0.5 x the teacher's, within-digit diversity >= 0.5 x
# the real digits' (mode collapse shows in the last two: one style per prompt keeps accuracy and precision but not
# them).
TARGETS = {"prompt_accuracy": 0.90, "fid_ratio": 1.5, "recall_ratio": 0.5, "diversity_ratio": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("out")
    parser.add_argument("gen")
    parser.add_argument("--train_seconds", type=float, default=None)
    parser.add_argument("--total_seconds", type=float, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    teacher = json.loads((out / "eval-teacher" / "metrics.json").read_text())["metrics"]
    gan = json.loads((out / f"eval-{args.gen}" / "metrics.json").read_text())["metrics"]
    stats = [json.loads(line) for line in (out / args.gen / "stats.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "generator": args.gen,
        "teacher": teacher,
        "gan": gan,
        "fid_ratio": gan["fid"] / teacher["fid"],
        "train_steps": stats[-1]["step"],
        "train_images": stats[-1]["nimg"],
        "train_seconds": args.train_seconds,
        "total_seconds": args.total_seconds,
    }
    if "recall" in gan and "recall" in teacher:
        result["recall_ratio"] = gan["recall"] / max(teacher["recall"], 1e-9)
    if "diversity_ratio" in gan:
        result["diversity_ratio"] = gan["diversity_ratio"]
    met = {
        "prompt_accuracy": gan["prompt_accuracy"] >= TARGETS["prompt_accuracy"],
        "fid_ratio": result["fid_ratio"] <= TARGETS["fid_ratio"],
        **{k: result[k] >= TARGETS[k] for k in ("recall_ratio", "diversity_ratio") if k in result},
    }
    result["targets"] = met
    result["targets_met"] = all(met.values()) and len(met) == len(TARGETS)
    (out / f"metrics-{args.gen}.json").write_text(json.dumps(result, indent=2) + "\n")
    grids = sorted((out / args.gen / "samples").glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], out / f"grid-{args.gen}.png")
    minutes = lambda s: "-" if s is None else f"{s / 60:.1f} min"  # noqa: E731
    lines = [
        f"{args.gen} trained from scratch on the digits (no teacher): {result['train_steps']} steps, "
        f"{result['train_images']} images, "
        f"training {minutes(args.train_seconds)}, everything {minutes(args.total_seconds)}",
        f"prompt accuracy  {gan['prompt_accuracy']:.3f}  (teacher {teacher['prompt_accuracy']:.3f}; goal >= "
        f"{TARGETS['prompt_accuracy']})",
        f"FID vs held-out real digits (digits-classifier features)  {gan['fid']:.1f}  teacher {teacher['fid']:.1f}  "
        f"ratio {result['fid_ratio']:.2f} (goal <= {TARGETS['fid_ratio']})",
    ]
    if "recall_ratio" in result:
        lines.append(
            f"precision / recall vs real digits (k-NN manifolds, same features)  {gan['precision']:.3f} / "
            f"{gan['recall']:.3f}  "
            f"teacher {teacher['precision']:.3f} / {teacher['recall']:.3f}  recall ratio {result['recall_ratio']:.2f} "
            f"(goal >= {TARGETS['recall_ratio']})"
        )
    if "diversity_ratio" in result:
        lines.append(
            f"within-digit diversity (mean pairwise feature distance per prompt)  {gan['diversity']:.3g} = "
            f"{result['diversity_ratio']:.2f}x the real digits' (teacher "
            f"{teacher.get('diversity_ratio', float('nan')):.2f}x; "
            f"goal >= {TARGETS['diversity_ratio']}; near 0: one style per prompt)"
        )
    missed = ", ".join(k for k, v in met.items() if not v) or "recall / diversity not evaluated"
    lines.append(
        f"targets {'met' if result['targets_met'] else 'NOT met: ' + missed}; grid: {out / f'grid-{args.gen}.png'} "
        "(row = digit 0..9)"
    )
    (out / f"report-{args.gen}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
