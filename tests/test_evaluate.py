"""distill/evaluate.py end to end on a tiny student: every metric, resume, process-count independence, errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import accelerate_launch, run_script
from PIL import Image

QUALITY = ("fid", "clip_score", "e_latent_lpips", "lpips", "psnr")
ALL = (*QUALITY, "seconds_per_image", "images_per_second", "peak_memory_mb")
TINY = [
    "--fid_extractor",
    "random-tiny",
    "--clip_model",
    "random-tiny",
    "--elatentlpips",
    "random-tiny",
    "--pixel_lpips",
    "random-tiny",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sd15_teacher, prompt_file):
    """A tiny one-step pipeline, 4 teacher pairs, 8 reference images; the common CLI arguments."""
    from students import OneStepGANPipeline, UNetStudent
    from teachers import load_teacher

    root = tmp_path_factory.mktemp("eval")
    pipe = load_teacher(str(sd15_teacher)).pipe
    student = UNetStudent.from_teacher(pipe.unet, pipe.scheduler)
    OneStepGANPipeline(
        student=student, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    ).save_pretrained(root / "student")
    code, _ = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            sd15_teacher,
            "--prompts",
            prompt_file,
            "--num_pairs",
            4,
            "--resolution",
            32,
            "--num_inference_steps",
            2,
            "--guidance_scale",
            3.0,
            "--batch_size",
            4,
            "--shard_size",
            4,
            "--output_dir",
            root / "pairs",
        ],
    )
    assert code == 0
    rng = np.random.default_rng(0)
    (root / "ref").mkdir()
    for i in range(8):  # non-square: the reference is center-cropped
        Image.fromarray(rng.integers(0, 255, (40, 32, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    args = [
        "--pipeline",
        root / "student",
        "--prompts",
        prompt_file,
        "--num_samples",
        6,
        "--batch_size",
        4,
        "--reference",
        root / "ref",
        "--pairs",
        root / "pairs",
        "--fidelity_start",
        -3,
        "--metrics_cache",
        root / "cache",
        "--metric_workers",
        0,
        *TINY,
    ]
    return root, args


@pytest.fixture(scope="module")
def single(setup):
    """One single-process run with every metric: (output dir, stdout, metrics.json)."""
    root, args = setup
    out = root / "one"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code, _ = run_script(
            "evaluate.py", [*args, "--latency_warmup", 1, "--latency_iterations", 2, "--output_dir", out]
        )
    assert code == 0
    return out, stdout.getvalue(), json.loads((out / "metrics.json").read_text())


def test_evaluate_writes_every_metric(single):
    out, stdout, result = single
    values = result["metrics"]
    assert set(values) == set(ALL) and all(np.isfinite(v) for v in values.values())
    for name in ALL:  # one `name: value` line per metric
        assert any(line.startswith(f"{name}: ") for line in stdout.splitlines()), stdout
    assert values["fid"] >= 0 and -1 <= values["clip_score"] <= 1 and values["seconds_per_image"] > 0
    assert values["psnr"] > 0 and values["lpips"] >= 0 and values["e_latent_lpips"] >= 0
    assert result["test_only_models"] == ["fid_extractor", "clip_model", "elatentlpips", "pixel_lpips"]
    assert result["details"]["fidelity"]["rows"] == 3 and result["details"]["fidelity"]["indices"] == [1, 3]
    assert result["pipeline"]["kind"] == "one-step student"
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"{i:07d}.png" for i in range(6)]
    with Image.open(out / "samples_grid.png") as grid:
        assert grid.size == (3 * 32, 2 * 32)  # 6 samples of 32 px in a 3x2 grid


def test_evaluation_is_resumable_from_cached_images(setup, single, capsys):
    root, args = setup
    out = root / "resume"
    shutil.copytree(single[0], out)
    first = (out / "samples" / "0000000.png").stat().st_mtime_ns
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code, err = run_script(
            "evaluate.py", [*args, "--num_samples", 8, "--metrics", "fid", "--output_dir", out], capsys
        )
    assert code == 0, err
    # Batch [0,4) was cached; batch [4,8) is remade whole (4,5 were a partial batch), so samples never
    # depend on where a previous run stopped.
    assert "resuming: 4 of 8 samples" in stdout.getvalue()
    assert (out / "samples" / "0000000.png").stat().st_mtime_ns == first
    assert len(list((out / "samples").glob("*.png"))) == 8
    code, err = run_script("evaluate.py", [*args, "--num_samples", 8, "--metrics", "fid", "--output_dir", out], capsys)
    assert code == 0 and "samples (rank 0" not in err  # every sample cached: no bar stuck at 0 img
    # Samples made with another config are refused rather than mixed in.
    code, err = run_script("evaluate.py", [*args, "--seed", 1, "--metrics", "fid", "--output_dir", out], capsys)
    assert code == 2 and "different config" in err and "seed" in err
    # So are samples of a student re-saved (retrained) into the same folder.
    weights = next((root / "student" / "student").glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        code, err = run_script("evaluate.py", [*args, "--metrics", "fid", "--output_dir", out], capsys)
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert code == 2 and "pipeline_files" in err


def test_two_processes_give_the_same_numbers(setup, single):
    root, args = setup
    run = accelerate_launch(
        "evaluate.py", [*args, "--metrics", "fid,clip_score,fidelity", "--output_dir", root / "two"], num_processes=2
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # What every evaluation printed and no user acts on: library loading bars, pyarrow's and clean-fid's warnings.
    for noise in ("Loading pipeline components", "FutureWarning", "LinAlgWarning", "Matrix is singular"):
        assert noise not in run.stderr, (noise, run.stderr[-3000:])
    two = json.loads((root / "two" / "metrics.json").read_text())
    assert two["num_processes"] == 2
    for name in QUALITY:
        # Same images (checked bit for bit below); the metric networks may sum in another order
        # under a different thread count, so equality is to float32 precision.
        assert two["metrics"][name] == pytest.approx(single[2]["metrics"][name], rel=1e-6, abs=1e-8), name
    for i in range(6):
        a = np.asarray(Image.open(single[0] / "samples" / f"{i:07d}.png"))
        b = np.asarray(Image.open(root / "two" / "samples" / f"{i:07d}.png"))
        np.testing.assert_array_equal(a, b)


def test_teacher_against_its_own_pairs_has_zero_fidelity_gap(setup, sd15_teacher, capsys):
    root, _ = setup
    code, err = run_script(
        "evaluate.py",
        [
            "--pipeline",
            sd15_teacher,
            "--num_inference_steps",
            2,
            "--guidance_scale",
            3.0,
            "--metrics",
            "fidelity",
            "--pairs",
            root / "pairs",
            "--fidelity_start",
            0,
            *TINY,
            "--output_dir",
            root / "teacher",
        ],
        capsys,
    )
    assert code == 0, err
    values = json.loads((root / "teacher" / "metrics.json").read_text())["metrics"]
    # The targets were stored in float16, so the gap is rounding only.
    assert values["e_latent_lpips"] < 1e-4 and values["lpips"] < 1e-4 and values["psnr"] > 60


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--metrics", "clip_score", "--clip_model", "ViT-g-14"], "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"),
        (["--metrics", "fid", "--fid_extractor", "inception"], "inception-2015-12-05.pt"),
        (["--metrics", "fid,bogus"], "unknown metric"),
        (["--metrics", "fidelity", "--fidelity_count", -1], "fidelity_count must not be negative"),
        (["--metrics", "fidelity", "--pixel_lpips", "vgg"], "vgg16-397923af.pth"),
        (["--metrics", "fid_to_teacher"], "fid_to_teacher needs `teacher_reference`"),
    ],
)
def test_missing_weights_and_bad_config_fail_in_one_line_before_generating(
    setup, capsys, monkeypatch, tmp_path, extra, needle
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torchvision weights, whatever this machine has cached
    root, args = setup
    out = root / "err"
    code, err = run_script("evaluate.py", [*args, *extra, "--output_dir", out], capsys)
    last = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and last.startswith("error: ") and needle in last and "Traceback" not in err, err
    assert not list(out.glob("samples/*.png"))


def test_fid_to_teacher_needs_a_reference_drawn_from_other_noise(setup, capsys):
    """The teacher's reference set must come from another seed: the same noise would couple the two sets."""
    root, args = setup
    assert (
        run_script(
            "evaluate.py", [*args, "--metrics", "samples", "--seed", 2, "--output_dir", root / "ref-seed2"], capsys
        )[0]
        == 0
    )
    ref = ["--metrics", "fid_to_teacher", "--teacher_reference", root / "ref-seed2" / "samples"]
    code, err = run_script("evaluate.py", [*args, *ref, "--seed", 2, "--output_dir", root / "same"], capsys)
    assert code == 2 and "would share their noise" in err.rstrip().splitlines()[-1]
    assert not list((root / "same").glob("samples/*.png"))  # refused before generating
    code, err = run_script("evaluate.py", [*args, *ref, "--output_dir", root / "other"], capsys)
    assert code == 0, err
    assert json.loads((root / "other" / "metrics.json").read_text())["metrics"]["fid_to_teacher"] > 0


@pytest.mark.parametrize("name", ["sd15_coco2014_30k", "sdxl_coco2017_5k", "teacher_sd15_coco2014_30k"])
def test_shipped_configs_parse(name):
    from conftest import ROOT

    from distill.core.config import parse_config
    from distill.evaluate import EvalConfig, validate

    cfg = parse_config(EvalConfig, ["--config", str(ROOT / "configs" / "eval" / f"{name}.yaml")])
    assert validate(cfg) == ["fid", "clip_score", "fidelity", "latency"]


def test_prompt_accuracy_of_the_digits_teacher(tmp_path, capsys):
    """The committed digits teacher draws the digit its prompt names; shuffled labels score far lower."""
    root = Path(__file__).resolve().parents[1]
    teacher, classifier = root / "teachers/assets/digits-teacher", root / "teachers/assets/digits-classifier"
    rows = [json.loads(line) for line in (root / "configs/digits/prompts.jsonl").read_text().splitlines()][
        ::5
    ]  # one per digit
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps({**r, "label": (r["label"] + 3) % 10}) + "\n" for r in rows))
    from data_gen.digits import load_digits_images
    from distill.metrics.fid import images_to_uint8
    from distill.metrics.fid_features import load_classifier_extractor
    from teachers.digits_classifier import DigitClassifier

    reference = tmp_path / "real"
    reference.mkdir()
    real, _ = load_digits_images(split="held_out")
    for i, image in enumerate(images_to_uint8(real[:100])):
        Image.fromarray(image).save(reference / f"{i:03d}.png")
    common = [
        "--pipeline",
        teacher,
        "--num_inference_steps",
        10,
        "--guidance_scale",
        4.0,
        "--classifier",
        classifier,
        "--num_samples",
        20,
        "--batch_size",
        10,
        "--grid_size",
        0,
        "--reference",
        reference,
        "--metric_workers",
        0,
    ]
    code, err = run_script(
        "evaluate.py",
        [
            *common,
            "--prompts",
            prompts,
            "--output_dir",
            tmp_path / "right",
            "--metrics",
            "prompt_accuracy,fid",
            "--fid_extractor",
            classifier,
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((tmp_path / "right" / "metrics.json").read_text())
    right = result["metrics"]["prompt_accuracy"]
    # FID in the classifier's feature space (the testbed's FID): finite, positive, keyed by that extractor.
    assert 0 < result["metrics"]["fid"] < 1e4
    assert (
        result["details"]["fid"]["extractor_id"]
        == load_classifier_extractor(classifier, load_classifier=DigitClassifier.from_pretrained).extractor_id
    )
    code, err = run_script(
        "evaluate.py",
        [*common, "--prompts", shuffled, "--output_dir", tmp_path / "wrong", "--metrics", "prompt_accuracy"],
        capsys,
    )
    assert code == 0, err
    wrong = json.loads((tmp_path / "wrong" / "metrics.json").read_text())["metrics"]["prompt_accuracy"]
    assert right >= 0.8 and wrong <= 0.3, (right, wrong)
