"""Live demo of a one-step student: a Gradio page whose image follows the prompt as you type.

    python -m distill.demo --pipeline runs/quickstart/student/pipeline      # then open http://127.0.0.1:7860

One generator step is fast enough to redraw on every keystroke; a call waits ``debounce`` seconds and is
dropped when a newer one from the same page arrived meanwhile, so a burst of typing costs one image.
Seed slider: image ``seed`` uses the noise of a pairs row with that seed (as ``distill/sample.py``);
truncation ψ slider for style students (gigagan, stylegan_t). With ``--teacher`` (default ``auto``: the
teacher that made the student's pairs, when its pairs folder is at hand) a checkbox shows the teacher's
image for the same noise beside it, with the time each took.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from distill.core.config import ConfigError, command, parse_config, require_non_negative, require_positive
from distill.core.folders import describe

QUICKSTART_PIPELINE = "runs/quickstart/student/pipeline"
EXAMPLE_PROMPT = "a handwritten digit seven"
# small testbed images, enlarged crisp
CSS = "#student img, #teacher img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;}"


@dataclass
class DemoConfig:
    pipeline: str = field(
        default=QUICKSTART_PIPELINE,
        metadata={
            "help": "an exported student folder (train_student.py's output_dir/pipeline); default: the quickstart's "
            "digits student"
        },
    )
    teacher: str = field(
        default="auto",
        metadata={
            "help": "teacher shown beside the student on request: auto (the one that made the student's pairs), "
            "none, or a hub id / folder"
        },
    )
    teacher_steps: Optional[int] = field(
        default=None, metadata={"help": "teacher ODE steps (default: as in the student's pairs, else 25)"}
    )
    teacher_guidance_scale: Optional[float] = field(
        default=None, metadata={"help": "teacher CFG scale (default: as in the student's pairs, else 7.5)"}
    )
    prompt: str = field(default=EXAMPLE_PROMPT, metadata={"help": "the prompt the page opens with"})
    debounce: float = field(default=0.25, metadata={"help": "seconds of quiet typing before an image is made"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:N"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to serve on (0.0.0.0: every interface)"})
    port: int = field(default=7860, metadata={"help": "port to serve on"})


def pairs_teacher(pipeline: str) -> dict | None:
    """The teacher and sampler that made the student's pairs (its ``pairs_split.json`` names the pairs), if readable."""
    split = Path(pipeline) / "pairs_split.json"
    if not split.is_file():
        return None
    manifest = Path(json.loads(split.read_text())["pairs"]) / "manifest.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    return {
        "teacher": m["teacher"]["name_or_path"],
        "scheduler": m["config"]["scheduler"],
        "steps": m["config"]["num_inference_steps"],
        "guidance_scale": m["config"]["guidance_scale"],
        "negative_prompt": m["config"].get("negative_prompt"),
        "max_sequence_length": m["config"].get("max_sequence_length"),
    }


class Painter:
    """Prompt + seed (+ ψ) -> the student's image (and the teacher's, on request), one call at a time."""

    def __init__(self, pipe, *, teacher=None, sampler: dict | None = None, debounce: float):
        import torch

        self.pipe, self.teacher, self.sampler, self.debounce = pipe, teacher, sampler or {}, debounce
        self.has_truncation = hasattr(pipe.student, "encode")
        side = pipe.default_resolution() // pipe.vae_scale_factor
        self.shape = (pipe.student.latent_channels, side, side)
        self.lock = threading.Lock()  # one model call at a time: concurrent calls would only slow each other
        self.latest: dict[str, int] = {}
        self.counter = 0
        self.torch = torch

    def newest(self, session: str) -> int:
        with self.lock:
            self.counter += 1
            self.latest[session] = self.counter
            return self.counter

    def paint(self, prompt: str, seed: float, psi: float, with_teacher: bool, session: str = ""):
        """(student image, teacher image or None, timing text); None when a newer request superseded this one."""
        ticket = self.newest(session)
        time.sleep(self.debounce)
        if self.latest.get(session) != ticket:
            return None  # the user kept typing: only the newest request makes an image
        from data_gen.noise import noise_for_seed

        noise = noise_for_seed(int(seed), self.shape)[None]  # [1,C,h,w], the pairs' per-seed noise
        with self.lock:
            t0 = time.perf_counter()
            extra = {"truncation_psi": float(psi)} if self.has_truncation else {}
            student = self.pipe(prompt or "", latents=noise, **extra).images[0]
            student_ms = (time.perf_counter() - t0) * 1000
            text = f"one-step student: **{student_ms:.1f} ms**"
            teacher = None
            if with_teacher and self.teacher is not None:
                t0 = time.perf_counter()
                denoiser = getattr(self.teacher, "transformer", None) or self.teacher.unet  # SD3 / SD, SDXL
                length = self.sampler.get("max_sequence_length")  # SD3: the pairs' T5 length
                teacher = self.teacher(
                    prompt or "",
                    latents=noise.to(self.teacher.device, denoiser.dtype),
                    num_inference_steps=self.sampler["steps"],
                    guidance_scale=self.sampler["guidance_scale"],
                    negative_prompt=self.sampler.get("negative_prompt"),
                    **({"max_sequence_length": length} if length is not None else {}),
                ).images[0]
                teacher_ms = (time.perf_counter() - t0) * 1000
                steps = self.sampler["steps"]
                text += f" · teacher ({steps} steps): **{teacher_ms:.0f} ms** ({teacher_ms / student_ms:.0f}x)"
        return student, teacher, text


def build_page(painter: Painter, *, prompt: str, teacher_label: str | None):
    """The Gradio Blocks: prompt box, seed and ψ sliders, the teacher checkbox, the image(s) and their times."""
    import gradio as gr

    with gr.Blocks(title="diffusion2gan one-step demo", analytics_enabled=False) as page:
        gr.Markdown("## One-step student\nThe image follows the prompt as you type.")
        with gr.Row():
            box = gr.Textbox(label="prompt", value=prompt, elem_id="prompt", scale=4)
            seed = gr.Slider(0, 9999, value=0, step=1, label="seed", elem_id="seed", scale=2)
            psi = gr.Slider(
                0.0,
                1.0,
                value=1.0,
                step=0.05,
                label="truncation ψ (1 = none)",
                elem_id="psi",
                visible=painter.has_truncation,
                scale=2,
            )
        compare = gr.Checkbox(
            label=f"show the teacher beside it ({teacher_label})" if teacher_label else "teacher",
            value=False,
            visible=teacher_label is not None,
            elem_id="compare",
        )
        with gr.Row():
            student = gr.Image(
                label="one-step student", type="pil", format="png", elem_id="student", height=320, interactive=False
            )
            teacher = gr.Image(
                label="teacher",
                type="pil",
                format="png",
                elem_id="teacher",
                height=320,
                interactive=False,
                visible=False,
            )
        timing = gr.Markdown(elem_id="timing")

        def redraw(text, seed_value, psi_value, with_teacher, request):
            out = painter.paint(
                text, seed_value, psi_value, bool(with_teacher), session=getattr(request, "session_hash", "") or ""
            )
            if out is None:
                return gr.skip(), gr.skip(), gr.skip()
            image, teacher_image, text_out = out
            return image, gr.update(value=teacher_image, visible=teacher_image is not None), text_out

        # Gradio passes the page's request to a parameter annotated gr.Request; set as a class, not the string
        # that `from __future__ import annotations` would leave.
        redraw.__annotations__["request"] = gr.Request

        inputs, outputs = [box, seed, psi, compare], [student, teacher, timing]
        # "multiple": every keystroke reaches the server, where the debounce keeps only the newest.
        gr.on(
            [box.input, seed.change, psi.change, compare.change],
            redraw,
            inputs,
            outputs,
            trigger_mode="multiple",
            concurrency_limit=None,
            show_progress="hidden",
        )
        page.load(redraw, inputs, outputs, show_progress="hidden")
    return page


def load_parts(cfg: DemoConfig):
    import torch

    from students import OneStepGANPipeline
    from teachers.loading import dtype_from_name

    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    pipe = OneStepGANPipeline.from_pretrained(cfg.pipeline, dtype=dtype_from_name(dtype_name)).to(device)
    pipe.set_progress_bar_config(disable=True)
    sampler = pairs_teacher(cfg.pipeline) if cfg.teacher == "auto" else None
    name = sampler["teacher"] if sampler else (None if cfg.teacher in ("auto", "none", "") else cfg.teacher)
    teacher = None
    if name is not None:
        from teachers import load_teacher

        try:
            teacher = load_teacher(
                name,
                scheduler=(sampler or {}).get("scheduler", "auto"),
                device=device,
                torch_dtype=dtype_from_name(dtype_name),
            ).pipe
        except (ValueError, OSError) as exc:
            if cfg.teacher != "auto":
                raise
            # The pairs' teacher is optional here: the demo runs without the comparison.
            sys.stderr.write(
                f"warning: the student's teacher {name} did not load ({str(exc).splitlines()[0]}): no teacher "
                "comparison; pass --teacher\n"
            )
            return pipe, None, None
        teacher.set_progress_bar_config(disable=True)
        sampler = {
            **(sampler or {"steps": 25, "guidance_scale": 7.5}),
            **({"steps": cfg.teacher_steps} if cfg.teacher_steps else {}),
            **({"guidance_scale": cfg.teacher_guidance_scale} if cfg.teacher_guidance_scale is not None else {}),
        }
    return pipe, teacher, sampler


@command
def main() -> None:
    cfg = parse_config(DemoConfig, description=__doc__)
    require_non_negative(cfg, "debounce", "teacher_guidance_scale")
    require_positive(cfg, "port")
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("the demo needs gradio: pip install -e '.[demo]'")
    from students.export import is_one_step_folder

    if not is_one_step_folder(cfg.pipeline):
        if cfg.pipeline == QUICKSTART_PIPELINE:
            raise ConfigError(
                f"no student at {cfg.pipeline}: make the digits one with `bash distill/digits/quickstart.sh` "
                "(about 13 min on 2 CPU cores), or pass --pipeline DIR (a train_student.py output_dir/pipeline)"
            )
        raise ConfigError(
            f"{cfg.pipeline} {describe(cfg.pipeline)}: pass a student's pipeline folder (train_student.py's "
            "output_dir/pipeline)"
        )

    # 1. Load: the student pipeline and, for the comparison, its teacher.
    pipe, teacher, sampler = load_parts(cfg)

    # 2. Build: the painter (debounced redraws) and the page.
    painter = Painter(pipe, teacher=teacher, sampler=sampler, debounce=cfg.debounce)
    label = f"{sampler['steps']} steps, CFG {sampler['guidance_scale']:g}" if teacher is not None else None
    page = build_page(painter, prompt=cfg.prompt, teacher_label=label)

    # 3. Serve: locally, no share link.
    import gradio as gr

    # No web fonts: the page must not reach out to the internet (offline machines, tests).
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.queue().launch(
        server_name=cfg.host,
        server_port=cfg.port,
        share=False,
        ssr_mode=False,
        theme=theme,
        css=CSS,
        footer_links=[],
        quiet=False,
    )


if __name__ == "__main__":
    main()
