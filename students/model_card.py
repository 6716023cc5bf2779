"""The model card of an exported student: ``README.md`` in the pipeline folder, in the Hub's format
(YAML metadata, then Markdown), written with ``huggingface_hub.ModelCard`` so that a pushed folder shows
its teacher, training data, samples, metrics and licence terms.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

CARD_FILE = "README.md"
METRICS_START, METRICS_END = "<!-- metrics:start -->", "<!-- metrics:end -->"
NONCOMMERCIAL_NOTICE = (
    "**Non-commercial training loss.** This student was trained with the published E-LatentLPIPS weights "
    "(Kang et al., Diffusion2GAN), released under CC BY-NC 4.0: check whether their terms reach your use "
    "before using the student commercially, or retrain it with your own E-LatentLPIPS weights "
    "(`distill/train_latent_lpips.py`)."
)
TAGS = ["diffusion2gan", "one-step", "gan", "distillation", "text-to-image"]


def write_model_card(
    folder: str | os.PathLike,
    *,
    teacher: str,
    teacher_revision: str | None,
    base_model: str | None,
    license: str | None,
    student: str,
    pairs: dict,
    training_config: dict,
    images_seen: int,
    steps: int,
    sample_grid: str | None = None,
    noncommercial_lpips: bool = False,
    metrics: dict | None = None,
) -> Path:
    """Write ``folder/README.md``. ``base_model``: the teacher's hub id (None for a local teacher);
    ``license``: the teacher's licence when known (the student inherits its terms); ``pairs``: the
    training pairs' ``path``, ``manifest_sha256``, ``count`` and ``bytes``; ``sample_grid``: an image
    file in ``folder`` (teacher row above, student row below); ``metrics``: held-out numbers from
    ``distill/evaluate.py`` (it adds them itself when run on the folder)."""
    data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=[*TAGS, f"student-{student}"],
    )
    revision = f" (revision `{teacher_revision}`)" if teacher_revision else ""
    size = f"{pairs['count']} pairs" + (f", {pairs['bytes'] / 2**20:.1f} MiB" if pairs.get("bytes") else "")
    config = yaml.safe_dump(training_config, sort_keys=False).rstrip()
    lines = [
        f"# One-step {student} student of {teacher}",
        "",
        f"A one-step text-to-image generator distilled from the diffusion model `{teacher}`{revision} with "
        "[Diffusion2GAN](https://arxiv.org/abs/2405.05967) (Kang et al., ECCV 2024): the teacher's ODE "
        "solutions (noise, prompt -> latent) are regressed with E-LatentLPIPS plus a conditional GAN loss.",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        "# The folder carries its own pipeline and generator code (pipeline_one_step_gan.py, student/*.py).",
        'pipe = DiffusionPipeline.from_pretrained("path/or/hub-id", trust_remote_code=True)',
        'image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0).images[0]',
        "```",
        "",
    ]
    if sample_grid:
        lines += [
            "## Samples",
            "",
            f"![teacher (top) and one-step student (bottom), same noise and prompts]({sample_grid})",
            "",
            "Top: the teacher; bottom: this student, on the same noise and prompts.",
            "",
        ]
    lines += [
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{teacher}`{revision} |",
        f"| student | `{student}` |",
        f"| pairs | `{pairs.get('path', '')}`: {size} |",
        f"| pairs manifest sha256 | `{pairs.get('manifest_sha256', '')}` |",
        f"| training images seen | {images_seen} ({steps} steps) |",
        "",
        "<details><summary>training config</summary>",
        "",
        "```yaml",
        config,
        "```",
        "",
        "</details>",
        "",
        "## Evaluation",
        "",
        METRICS_START,
        *_metrics_lines(metrics, source=None),
        METRICS_END,
        "",
        "## License",
        "",
        f"The student is derived from `{teacher}`, so its licence ({license or 'see the teacher'}) applies to it.",
    ]
    if noncommercial_lpips:
        lines += ["", NONCOMMERCIAL_NOTICE]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = Path(folder) / CARD_FILE
    card.save(path)
    return path


def _metrics_lines(metrics: dict | None, *, source: str | None) -> list[str]:
    if not metrics:
        return ["Not evaluated yet: `python distill/evaluate.py --pipeline THIS_FOLDER ...` adds its numbers here."]
    rows = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    return [*rows, "", f"Measured by {source}." if source else ""]


def update_model_card_metrics(folder: str | os.PathLike, metrics: dict, *, source: str) -> Path | None:
    """Merge ``metrics`` into the Evaluation section of ``folder/README.md`` (None when there is no card);
    ``source``: how they were measured (a line of text)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text()
    if METRICS_START not in text or METRICS_END not in text:
        return None  # a card written by hand: leave it alone
    head, rest = text.split(METRICS_START, 1)
    old, tail = rest.split(METRICS_END, 1)
    merged = {**_read_metrics(old), **{k: float(v) for k, v in metrics.items()}}
    path.write_text(
        head + METRICS_START + "\n" + "\n".join(_metrics_lines(merged, source=source)) + "\n" + METRICS_END + tail
    )
    return path


def _read_metrics(section: str) -> dict[str, float]:
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2:
            try:
                out[cells[0]] = float(cells[1])
            except ValueError:
                continue  # the header and separator rows
    return out
