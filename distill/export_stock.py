"""Export a UNet student as a stock diffusers pipeline (``StableDiffusionPipeline`` / ``…XLPipeline``).

    python distill/export_stock.py --pipeline runs/student-sd15/pipeline --output_dir runs/student-sd15/stock

The folder then runs anywhere diffusers does, without this project and without ``trust_remote_code``:
``AutoPipelineForText2Image.from_pretrained(folder)(prompt, num_inference_steps=1, guidance_scale=0.0)``.
The one-step DDIM scheduler is built from the teacher's noise schedule: by default the teacher named in
the pairs the student trained on (``pipeline/pairs_split.json`` -> the pairs' ``manifest.json``), or ``teacher``.
The folder is written under a temporary name beside ``output_dir`` and renamed into place when complete: a kill or a
full disk leaves the earlier folder (or none), never a mix of old and new files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from data_gen.pairs import SPLIT_FILE, read_manifest
from distill.core.atomic import atomic_folder, folder_bytes
from distill.core.config import ConfigError, command, parse_config
from distill.distillation.run_checks import read_split
from students import OneStepGANPipeline, UNetStudent
from students.stock import save_stock_pipeline


@dataclass
class ExportStockConfig:
    pipeline: str = field(
        default="", metadata={"help": "a UNet student's pipeline folder (train_student.py: …/pipeline)"}
    )
    output_dir: str = field(default="", metadata={"help": "where the stock pipeline folder is written"})
    teacher: str = field(
        default="",
        metadata={
            "help": "teacher hub id / folder whose scheduler gives the noise schedule (empty: the pairs' teacher)"
        },
    )
    revision: Optional[str] = field(default=None, metadata={"help": "teacher revision"})
    safe_serialization: bool = field(default=True, metadata={"help": "safetensors weights"})


def scheduler_config(cfg: ExportStockConfig) -> dict:
    """The teacher's scheduler config: from ``teacher`` if given, else from the pairs manifest the student trained
    on."""
    if cfg.teacher:
        from diffusers import DDIMScheduler

        return dict(DDIMScheduler.load_config(cfg.teacher, subfolder="scheduler", revision=cfg.revision))
    split = read_split(cfg.pipeline)
    if split is None:
        raise ConfigError(
            f"{cfg.pipeline} has no {SPLIT_FILE} naming its pairs: set `teacher` to the teacher's hub id or folder"
        )
    try:
        return read_manifest(split["pairs"])["scheduler_config"]
    except FileNotFoundError:
        raise ConfigError(
            f"the student's pairs {split['pairs']} are gone: set `teacher` to the teacher's hub id or folder"
        ) from None


@command
def main() -> None:
    # 1. Load: the config, the student, the teacher's schedule.
    cfg = parse_config(ExportStockConfig, description=__doc__)
    if not cfg.pipeline or not cfg.output_dir:
        raise ConfigError("set `pipeline` (a UNet student's pipeline folder) and `output_dir`")
    if Path(cfg.output_dir).resolve() == Path(cfg.pipeline).resolve():
        raise ConfigError("output_dir must differ from pipeline: the stock folder is a second copy, not a rewrite")
    pipe = OneStepGANPipeline.from_pretrained(cfg.pipeline)
    if not isinstance(pipe.student, UNetStudent):  # before asking for a teacher it would not need
        raise ConfigError(
            f"{cfg.pipeline} holds a {type(pipe.student).__name__} student: only UNet students export to a stock "
            "StableDiffusion(XL)Pipeline; load this folder as it is (DiffusionPipeline.from_pretrained(folder, "
            "trust_remote_code=True)) or with distill/sample.py"
        )
    schedule = scheduler_config(cfg)
    # 2. Save: the stock folder (refused for students the one-step DDIM cannot reproduce), whole or not at all.
    out = Path(cfg.output_dir)
    with atomic_folder(out, need_bytes=lambda: folder_bytes(cfg.pipeline), what="the stock pipeline") as tmp:
        save_stock_pipeline(pipe, tmp, scheduler_config=schedule, safe_serialization=cfg.safe_serialization)
    print(
        f"stock pipeline in {out.resolve()}: AutoPipelineForText2Image.from_pretrained(...)(prompt, "
        "num_inference_steps=1, "
        "guidance_scale=0.0)"
    )


if __name__ == "__main__":
    main()
