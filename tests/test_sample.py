"""distill/sample.py through its CLI: images for (prompt, seed), bad values in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import run_script


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, sd15_teacher):
    from students import OneStepGANPipeline, UNetStudent
    from teachers import load_teacher

    pipe = load_teacher(str(sd15_teacher)).pipe
    out = tmp_path_factory.mktemp("sample") / "pipeline"
    OneStepGANPipeline(
        student=UNetStudent.from_teacher(pipe.unet, pipe.scheduler),
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    ).save_pretrained(out)
    return out


def test_sample_writes_one_image_per_prompt_and_seed(pipeline_dir, tmp_path, capsys):
    code, err = run_script(
        "sample.py",
        [
            "--pipeline",
            pipeline_dir,
            "--prompt",
            "a cat",
            "--seeds",
            "0-2",
            "--batch_size",
            2,
            "--output_dir",
            tmp_path / "s",
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == [
        "0000-seed0.png",
        "0000-seed1.png",
        "0000-seed2.png",
        "grid.png",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch_size", 0], "batch_size must be positive, got 0"),
        (["--batch_size=-1"], "batch_size must be positive, got -1"),
        (["--batch_size", "-1"], "batch_size must be positive, got -1"),
        (["--resolution", "-32"], "resolution must be positive, got -32"),
        (["--device", "tpu9"], "unknown device 'tpu9'"),
        pytest.param(
            ["--device", "cuda"],
            "CUDA is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA"),
        ),
    ],
)
def test_bad_values_are_one_line(pipeline_dir, tmp_path, capsys, args, message):
    code, err = run_script(
        "sample.py", ["--pipeline", pipeline_dir, "--prompt", "a cat", "--output_dir", tmp_path / "s", *args], capsys
    )
    assert code == 2
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists()


def test_a_folder_that_is_not_a_student_is_named_for_what_it_is(pipeline_dir, tmp_path, capsys):
    """Not "not found" for a folder that exists: what it is (pairs, a run, a checkpoint) and what to pass instead."""
    pairs, run = tmp_path / "pairs", tmp_path / "run"
    (pairs / "data").mkdir(parents=True)
    (pairs / "manifest.json").write_text("{}")
    (run / "pipeline").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    for folder, what in (
        (pairs, "is a pairs folder (written by generate_pairs.py), not a student"),
        (run, f"is a training run folder; its student pipeline is {run / 'pipeline'}"),
        (tmp_path / "missing", "does not exist"),
    ):
        code, err = run_script(
            "sample.py", ["--pipeline", folder, "--prompt", "a cat", "--output_dir", tmp_path / "s"], capsys
        )
        line = err.strip().splitlines()[-1]
        assert code == 2 and line.startswith(f"error: pipeline '{folder}' {what}: pass a student's pipeline folder"), (
            line
        )
