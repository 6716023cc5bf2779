"""Learning curves of stage-two runs, side by side: metric vs. training images.

    python scripts/curves.py RUN_DIR [RUN_DIR ...] [--output runs/curves] [--eval] [--eval_args "..."]

For every run (a ``train_student.py`` or ``train_gan.py`` output_dir): the held-out E-LatentLPIPS and MSE to the teacher
that training logs at each validation (``stats.jsonl``); with ``--eval``, every kept checkpoint's
pipeline (``checkpoints/checkpoint-N/pipeline``, keep them with ``--checkpoints_total_limit null``)
and the final one are also scored by ``distill/evaluate.py --config EVAL_CONFIG`` (default: the digits
testbed's, metrics ``fid_to_teacher,prompt_accuracy``), cached in ``RUN_DIR/curve-eval/``. Writes
``OUTPUT/curves.png``, ``OUTPUT/curves.json`` and a Markdown table ``OUTPUT/curves.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LABELS = {
    "val_lpips": "held-out E-LatentLPIPS to the teacher",
    "val_mse": "held-out MSE to the teacher",
    "fid_to_teacher": "FID to the teacher's samples",
    "prompt_accuracy": "prompt accuracy",
    "fid": "FID to the reference",
    "recall": "recall vs the reference",
    "diversity_ratio": "within-prompt diversity / real",
}


def training_curve(run: Path) -> tuple[list[dict], dict[int, int]]:
    """Validation records [{nimg, val_lpips, val_mse}] and the images seen at each step (the per-run reader
    that train_student.py's own curves.png uses)."""
    from distill.training.curves import read_stats

    train, val = read_stats(run / "stats.jsonl")
    nimg = {0: 0, **{r["step"]: r["nimg"] for r in train}}
    return [
        {"nimg": r["nimg"], **{k: r[k] for k in ("val_lpips", "val_mse") if k in r}} for r in val if "val_mse" in r
    ], nimg


def evaluated_curve(
    run: Path, nimg: dict[int, int], *, eval_config: str, eval_args: list[str], every: int = 1
) -> list[dict]:
    """Score the kept checkpoints' pipelines whose step is a multiple of ``every``, and the final one (cached);
    [{nimg, metric: value}]."""
    pipelines = {
        int(m.group(1)): p / "pipeline"
        for p in (run / "checkpoints").glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
        and (p / "pipeline").is_dir()
        and int(m.group(1)) % every == 0
    }
    if (run / "pipeline").is_dir():
        pipelines.setdefault(max(nimg), run / "pipeline")
    out = []
    for step, pipeline in sorted(pipelines.items()):
        dest = run / "curve-eval" / f"step-{step:07d}"
        if not (dest / "metrics.json").is_file():
            cmd = [
                sys.executable,
                "distill/evaluate.py",
                "--config",
                eval_config,
                "--pipeline",
                str(pipeline),
                "--output_dir",
                str(dest),
                *eval_args,
            ]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"error: evaluating {pipeline} failed: {done.stderr.strip().splitlines()[-1:]}")
        out.append(
            {"nimg": nimg.get(step, 0), "step": step, **json.loads((dest / "metrics.json").read_text())["metrics"]}
        )
    return out


def plot(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        m
        for m in ("val_lpips", "fid_to_teacher", "fid", "prompt_accuracy", "recall", "diversity_ratio")
        if any(m in r for c in curves.values() for r in c["validation"] + c["evaluation"])
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, c in curves.items():
            rows = [r for r in c["validation" if metric.startswith("val_") else "evaluation"] if metric in r]
            if rows:
                ax.plot([r["nimg"] / 1000 for r in rows], [r[metric] for r in rows], marker="o", ms=3, label=name)
        ax.set_xlabel("training images (thousands)")
        if metric in ("val_lpips", "fid_to_teacher", "fid"):
            ax.set_yscale("log")  # from-scratch runs start orders of magnitude above where they end
        ax.set_title(LABELS.get(metric, metric) + (" (log)" if ax.get_yscale() == "log" else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("runs", nargs="+", help="train_student.py output folders; NAME=DIR to label one")
    parser.add_argument("--output", default="runs/curves")
    parser.add_argument("--eval", action="store_true", help="also score every kept checkpoint with evaluate.py")
    parser.add_argument(
        "--eval_every",
        type=int,
        default=1,
        help="--eval: only checkpoints whose step is a multiple of this (+ the final pipeline)",
    )
    parser.add_argument("--eval_config", default="configs/digits/eval.yaml")
    parser.add_argument(
        "--eval_args",
        default="--metrics fid_to_teacher,prompt_accuracy",
        help="extra evaluate.py overrides for the checkpoint scores",
    )
    args = parser.parse_args()
    curves = {}
    for spec in args.runs:
        name, _, folder = spec.rpartition("=")
        run = Path(folder)
        if not (run / "stats.jsonl").is_file():
            sys.exit(f"error: {run} has no stats.jsonl: pass train_student.py output folders")
        validation, nimg = training_curve(run)
        evaluation = (
            evaluated_curve(
                run, nimg, eval_config=args.eval_config, eval_args=shlex.split(args.eval_args), every=args.eval_every
            )
            if args.eval
            else []
        )
        curves[name or run.name] = {"run": str(run), "validation": validation, "evaluation": evaluation}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=2) + "\n")
    plot(curves, out / "curves.png")
    lines = [
        "| run | kimg | held-out E-LatentLPIPS | FID to teacher | FID to the reference | prompt accuracy | recall | "
        "diversity / real |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in curves.items():
        by_nimg: dict[int, dict] = {}
        for r in c["validation"] + c["evaluation"]:
            by_nimg.setdefault(r["nimg"], {}).update(r)
        for n, r in sorted(by_nimg.items()):
            if "fid_to_teacher" in r or "fid" in r or n == max(by_nimg):
                cell = lambda k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
                lines.append(
                    f"| {name} | {n / 1000:.1f} | {cell('val_lpips', '{:.3f}')} | {cell('fid_to_teacher', '{:.1f}')} | "
                    f"{cell('fid', '{:.1f}')} | {cell('prompt_accuracy', '{:.3f}')} | {cell('recall', '{:.3f}')} | "
                    f"{cell('diversity_ratio', '{:.2f}')} |"
                )
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'curves.png'}")


if __name__ == "__main__":
    main()
