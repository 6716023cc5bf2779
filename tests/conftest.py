"""Shared fixtures: tiny random-weight teachers saved to disk and loaded like hub ids."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_teacher_factory(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            from teachers.testing import build_random_teacher

            cache[family] = build_random_teacher(tmp_path_factory.mktemp(f"teacher-{family}"), family=family)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def sd15_teacher(tiny_teacher_factory) -> Path:
    return tiny_teacher_factory("sd15")


@pytest.fixture(scope="session")
def sdxl_teacher(tiny_teacher_factory) -> Path:
    return tiny_teacher_factory("sdxl")


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    """A small digits-classifier folder (random weights), read as a frozen feature network by the from-scratch D."""
    import torch

    from teachers.digits_classifier import DigitClassifier

    path = tmp_path_factory.mktemp("classifier") / "clf"
    torch.manual_seed(0)
    DigitClassifier(channels=(8, 16), feature_dim=16, image_size=16).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red apple on a table\n\na photo of a cat\n  \na blue car in the rain\na bowl of soup\n")
    return path


def tiny_pairs(teacher, prompt_file, out: Path, *, steps: int) -> Path:
    """24 pairs at 32 px from a tiny teacher, written by generate_pairs.py (a ``steps``-step sampler)."""
    code, err = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            teacher,
            "--prompts",
            prompt_file,
            "--num_pairs",
            24,
            "--resolution",
            32,
            "--num_inference_steps",
            steps,
            "--batch_size",
            8,
            "--output_dir",
            out,
        ],
    )
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def pairs_dir(sd15_teacher, prompt_file, tmp_path_factory):
    """24 pairs from the tiny SD1.5-form teacher (a 3-step sampler), made once per test module that reads them."""
    return tiny_pairs(sd15_teacher, prompt_file, tmp_path_factory.mktemp("pairs") / "pairs", steps=3)


def text_conditioning(teacher, prompts):
    """A loaded SD / SDXL teacher's conditioning of ``prompts`` at 32 px, as stage two encodes them."""
    from students import encode_text

    p = teacher.pipe
    return encode_text(
        prompts,
        tokenizer=p.tokenizer,
        text_encoder=p.text_encoder,
        tokenizer_2=getattr(p, "tokenizer_2", None),
        text_encoder_2=getattr(p, "text_encoder_2", None),
        resolution=(32, 32),
    )


def pairs_gan_step(disc, *, mix_fraction=0.0, r1_gamma=0.0, student=None, loss="non_saturating", regression="mse"):
    """The shared GAN step over stage two's view of ``disc`` (the prepared and unwrapped module alike), as train_student
    builds it."""
    from distill.distillation.phases import PairsView
    from distill.training.gan_step import GANStep

    view = PairsView(
        student=student,
        discriminator=disc,
        discriminator_unwrapped=disc,
        lpips_loss=None,
        regression=regression,
        lpips_weight=1.0,
        mix_fraction=mix_fraction,
    )
    return GANStep(
        None,
        view=view,
        generator=student,
        discriminator=None,
        discriminator_unwrapped=disc,
        opt_g=None,
        opt_d=None,
        loss=loss,
        gan_weight=0.5,
        r1_gamma=r1_gamma,
        r1_interval=1,
        max_grad_norm=0.0,
    )


def fresh_accelerator_state() -> None:
    """Forget the Accelerator singletons, as a new process would, through accelerate's own test case (public API:
    ``accelerate.test_utils.testing.AccelerateTestCase`` resets the state after each test that uses it)."""
    from accelerate.test_utils.testing import AccelerateTestCase

    AccelerateTestCase().tearDown()


def run_script(script: str, args: list[str], capsys=None) -> tuple[int, str]:
    """Run ``distill/<script>`` in this process as ``python distill/<script> args`` would; (exit code, stderr)."""
    fresh_accelerator_state()  # each run is a fresh "process"
    argv = sys.argv
    sys.argv = [str(ROOT / "distill" / script), *map(str, args)]
    code = 0
    try:
        runpy.run_path(str(ROOT / "distill" / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def accelerate_launch(
    script: str,
    args: list[str],
    *,
    num_processes: int = 1,
    timeout: int = 600,
    config_file: str | None = None,
    **kwargs,
):
    """``accelerate launch`` on CPU; two processes use gloo via --multi_gpu with ACCELERATE_USE_CPU, or via a shipped
    ``configs/accelerate`` file (``config_file``; its mixed precision overridden to none)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        launch += [
            "--config_file",
            str(ROOT / config_file),
            "--num_processes",
            str(num_processes),
            "--mixed_precision",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
    elif num_processes > 1:
        launch += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(_free_port())]
    else:
        launch += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*launch, str(ROOT / "distill" / script), *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctrl_c_able() -> None:
    """``Popen(preexec_fn=ctrl_c_able)``: the child takes SIGINT as Ctrl-C even when pytest itself runs in the
    background (a shell starts background jobs with SIGINT ignored, and Python then installs no handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
