"""A stage-two run's curves from its ``stats.jsonl``: losses, held-out fidelity to the teacher and the
discriminator's mean real / fake logits, against training images seen (``curves.png``).

``scripts/curves.py`` compares several runs with the same reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOSS_PREFIXES = ("g_", "d_")
LOGIT_KEYS = {"d_real_logit": "real", "d_fake_logit": "fake"}
VALIDATION_KEYS = {"val_lpips": "E-LatentLPIPS", "val_mse": "MSE"}


def read_stats(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training records, validation records), each with ``nimg``; validation records carry only their
    step, so their images seen are the training record's at that step (0 before the first)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "nimg" in r]
    nimg = {0: 0, **{r["step"]: r["nimg"] for r in train}}
    val = [{**r, "nimg": nimg.get(r["step"], 0)} for r in rows if any(k in r for k in VALIDATION_KEYS)]
    return train, val


def plot_run(stats_path: str | os.PathLike, output: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write ``output`` (a PNG): losses, held-out fidelity to the teacher, D logits vs. thousands of images."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    train, val = read_stats(stats_path)
    kimg = lambda rows: [r["nimg"] / 1000 for r in rows]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    losses = sorted({k for r in train for k in r if k.startswith(LOSS_PREFIXES) and k not in LOGIT_KEYS})
    for key in losses:
        rows = [r for r in train if key in r]
        axes[0].plot(kimg(rows), [r[key] for r in rows], label=key, lw=1)
    axes[0].set_title("losses (weighted terms)", fontsize=10)
    # E-LatentLPIPS and MSE differ in scale by orders of magnitude: MSE on its own (right, dashed) axis.
    mse_axis = axes[1].twinx()
    for (key, label), ax, style in zip(VALIDATION_KEYS.items(), (axes[1], mse_axis), ("-", "--")):
        rows = [r for r in val if key in r]
        if rows:
            ax.plot(
                kimg(rows),
                [r[key] for r in rows],
                style,
                marker="o",
                ms=3,
                color=f"C{0 if style == '-' else 1}",
                label=label,
            )
            ax.set_ylabel(label, fontsize=9)
    handles = [h for ax in (axes[1], mse_axis) for h in ax.get_legend_handles_labels()[0]]
    if handles:
        axes[1].legend(handles=handles, fontsize=8)
    axes[1].set_title("held-out distance to the teacher", fontsize=10)
    for key, label in LOGIT_KEYS.items():
        rows = [r for r in train if key in r]
        if rows:
            axes[2].plot(kimg(rows), [r[key] for r in rows], label=label, lw=1)
    axes[2].axhline(0, color="grey", lw=0.5)
    axes[2].set_title("discriminator: mean logit (real > 0 > fake when D wins)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training images (thousands)")
        ax.grid(alpha=0.3)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        elif ax.get_legend() is None:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, output)  # a reader never sees a half-written PNG
    return output
