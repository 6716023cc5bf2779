"""The regression-loss / GAN / generator ablation on the digits testbed, as one table.

    python distill/digits/ablation.py [OUTPUT_DIR]        # default runs/ablation

Every variant of ``configs/digits/ablation.yaml`` trains with the public entry point
(``accelerate launch distill/train_student.py --config configs/digits/student.yaml <variant args>``)
on the same pairs and is evaluated by ``distill/evaluate.py --config configs/digits/eval.yaml`` with
the same prompts, noise and reference set, plus fidelity to the teacher on the held-out pairs. The
teacher is evaluated once. Finished variants are skipped on a rerun (a killed one resumes from its
checkpoint), so the command can be repeated. Writes ``OUTPUT_DIR/ablation.md`` and ``ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repo root with output in ``log``; seconds taken. A failure names the log."""
    start = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        sys.exit(f"error: {Path(cmd[min(len(cmd) - 1, len(LAUNCH))]).name} failed ({tail[0].strip()}); full log: {log}")
    return time.time() - start


def evaluate(pipeline: str, out: Path, *, reference: Path, args: list[str]) -> dict:
    """``distill/evaluate.py`` with the testbed's eval config (skipped when ``out`` already has metrics)."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        run(
            [
                sys.executable,
                "distill/evaluate.py",
                "--config",
                "configs/digits/eval.yaml",
                "--pipeline",
                pipeline,
                "--reference",
                str(reference),
                "--output_dir",
                str(out),
                *args,
            ],
            out.with_suffix(".log"),
        )
    return json.loads(metrics.read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("output_dir", nargs="?", default="runs/ablation")
    parser.add_argument("--config", default="configs/digits/ablation.yaml", help="variants table")
    parser.add_argument("--variants", default="", help="comma-separated subset of variant names (default: all)")
    parser.add_argument(
        "--pairs", default="", help="existing pairs folder to reuse (default: OUTPUT_DIR/pairs, generated)"
    )
    parser.add_argument("--pairs_args", default="", help="extra --key value overrides for generate_pairs.py")
    parser.add_argument("--student_args", default="", help="extra overrides for every train_student.py run")
    parser.add_argument("--eval_args", default="", help="extra overrides for every evaluate.py run")
    parser.add_argument(
        "--seeds",
        default="0",
        help="training seeds per variant, e.g. 0,1,2: the table shows mean ± std "
        "(the teacher's floor: over as many teacher sample sets, evaluation seeds 1, 3, 5, ...)",
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # accelerate would set 1 for one process
    table = OmegaConf.to_container(OmegaConf.load(ROOT / args.config))
    variants = table["variants"]
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(wanted) - {v["name"] for v in variants})
        if unknown:
            sys.exit(
                f"error: unknown variant(s) {', '.join(unknown)}; {args.config} has "
                f"{', '.join(v['name'] for v in variants)}"
            )
        variants = [v for v in variants if v["name"] in wanted]
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pairs = Path(args.pairs).resolve() if args.pairs else out / "pairs"
    if args.pairs and not (pairs / "manifest.json").is_file():
        sys.exit(f"error: --pairs {pairs} is not a pairs folder (no manifest.json); omit it to generate pairs")
    if not args.pairs:  # generate_pairs.py resumes / skips a complete folder by itself
        run(
            [
                *LAUNCH,
                "distill/generate_pairs.py",
                "--config",
                "configs/digits/pairs.yaml",
                "--output_dir",
                str(pairs),
                *shlex.split(args.pairs_args),
            ],
            out / "pairs.log",
        )
    reference = out / "reference"
    if not reference.is_dir():
        from data_gen.digits import save_digits_reference

        save_digits_reference(reference)
    student_cfg = OmegaConf.load(ROOT / "configs/digits/student.yaml")
    # Fidelity is measured on the pairs every variant held out (the same `holdout` for all of them).
    holdout = int(dict(_pairs_of(shlex.split(args.student_args))).get("--holdout", student_cfg.holdout))
    # Headline: FID against the teacher's own samples drawn with other noise (seed 2; the evaluations
    # use seed 1): how close the student's distribution is to the one it is distilled from. Scored for
    # the teacher itself it is the floor of that FID at this sample size. The real-digit reference
    # favours blur, because the real digits are 8 px images upsampled to 32 px.
    teacher_reference = out / "teacher-reference"
    if not (teacher_reference / "samples" / "manifest.json").is_file() or not list(
        (teacher_reference / "samples").glob("*.png")
    ):
        run(
            [
                sys.executable,
                "distill/evaluate.py",
                "--config",
                "configs/digits/eval.yaml",
                "--pipeline",
                "teachers/assets/digits-teacher",
                "--metrics",
                "samples",
                "--seed",
                "2",
                "--output_dir",
                str(teacher_reference),
                *shlex.split(args.eval_args),
            ],
            out / "teacher-reference.log",
        )
    eval_args = [
        "--metrics",
        "fid_to_teacher,prompt_accuracy,fid,fidelity",
        "--pairs",
        str(pairs),
        "--fidelity_start",
        str(-holdout),
        "--teacher_reference",
        str(teacher_reference / "samples"),
        *shlex.split(args.eval_args),
    ]

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    teacher_runs = [
        evaluate(
            "teachers/assets/digits-teacher",
            out / ("eval-teacher" if k == 0 else f"eval-teacher-seed{1 + 2 * k}"),
            reference=reference,
            args=[*eval_args, *([] if k == 0 else ["--seed", str(1 + 2 * k)])],
        )
        for k in range(len(seeds))
    ]
    rows = [{"name": "teacher", "about": "the digits teacher, 25 DDIM steps, CFG 4", **_aggregate(teacher_runs)}]
    for v in variants:
        runs, seconds = [], []
        variant_seeds = [
            int(x) for x in v.get("seeds", seeds)
        ]  # a variant may pin its own (e.g. one seed for a cheap baseline)
        for seed in variant_seeds:
            run_dir = out / v["name"] if len(seeds) == 1 else out / v["name"] / f"seed-{seed}"
            seconds_file = run_dir / "train_seconds.txt"
            if not (run_dir / "student" / "pipeline" / "model_index.json").is_file():
                run_dir.mkdir(parents=True, exist_ok=True)
                took = run(
                    [
                        *LAUNCH,
                        "distill/train_student.py",
                        "--config",
                        v.get("config", "configs/digits/student.yaml"),
                        "--pairs",
                        str(pairs),
                        "--output_dir",
                        str(run_dir / "student"),
                        "--seed",
                        str(seed),
                        *shlex.split(v.get("args") or ""),
                        *shlex.split(args.student_args),
                    ],
                    run_dir / "train.log",
                )
                seconds_file.write_text(f"{took:.1f}\n")
            runs.append(
                evaluate(str(run_dir / "student" / "pipeline"), run_dir / "eval", reference=reference, args=eval_args)
            )
            if seconds_file.is_file():
                seconds.append(float(seconds_file.read_text()))
        rows.append(
            {
                "name": v["name"],
                "about": v.get("about", ""),
                "seeds": variant_seeds,
                **_aggregate(runs),
                "train_seconds": sum(seconds) / len(seconds) if seconds else None,
            }
        )

    teacher_fid, floor = rows[0]["fid"], rows[0]["fid_to_teacher"]
    for r in rows:
        r["fid_ratio"] = r["fid"] / max(teacher_fid, 1e-9)
        r["fid_to_teacher_over_floor"] = r["fid_to_teacher"] / max(floor, 1e-9)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| variant | runs | FID to teacher samples | / floor | prompt accuracy | E-LatentLPIPS to teacher | "
        "PSNR to teacher (dB) | FID vs real digits | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-"
        name = f"{r['name']} (floor: vs itself, other seeds)" if r["name"] == "teacher" else r["name"]
        spread = len(r["fid_to_teacher_runs"]) > 1
        cell = lambda key, fmt: fmt.format(r[key]) + (f" ± {fmt.format(r[key + '_std'])}" if spread else "")  # noqa: E731
        lines.append(
            f"| {name} | {len(r['fid_to_teacher_runs'])} | {cell('fid_to_teacher', '{:.1f}')} | "
            f"{r['fid_to_teacher_over_floor']:.2f} | "
            f"{cell('prompt_accuracy', '{:.3f}')} | {cell('e_latent_lpips', '{:.3f}')} | {cell('psnr', '{:.1f}')} | "
            f"{cell('fid', '{:.1f}')} | {train} |"
        )
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _aggregate(runs: list[dict]) -> dict:
    """Mean of each metric over runs, with ``<metric>_std`` (population std) and the per-run values."""
    import statistics

    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        out[f"{key}_runs"] = values
    return out


def _pairs_of(tokens: list[str]) -> list[tuple[str, str]]:
    """``--key value`` tokens -> [(key, value)]."""
    return [(tokens[i], tokens[i + 1]) for i in range(0, len(tokens) - 1, 2) if tokens[i].startswith("--")]


if __name__ == "__main__":
    main()
