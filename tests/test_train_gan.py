"""distill/train_gan.py through its CLI: from-scratch text-to-image GAN training on a tiny generated set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, accelerate_launch, run_script
from safetensors.torch import load_file
from test_image_text import make_imagefolder, make_mixed_imagefolder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 images of 16x16 px: red squares captioned "red", blue ones "blue" (a two-class text-to-image set)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("gan-data") / "images"
    path.mkdir()
    with open(path / "metadata.jsonl", "w") as fh:
        for i in range(16):
            red = i % 2 == 0
            image = Image.new("RGB", (16, 16), (0, 0, 0))
            image.paste((230, 30, 30) if red else (30, 30, 230), (2 + i % 5, 2 + i % 3, 10 + i % 5, 10 + i % 3))
            image.save(path / f"{i:03d}.png")
            fh.write(
                json.dumps(
                    {
                        "file_name": f"{i:03d}.png",
                        "caption": ["a red square", "red"] if red else ["a blue square", "blue"],
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture
def common(images, classifier_dir, sd15_teacher):
    return [
        "--dataset",
        images,
        "--caption_column",
        "caption",
        "--text_encoder",
        sd15_teacher,
        "--vae",
        sd15_teacher,
        "--resolution",
        16,
        "--generator",
        "gigagan",
        "--generator_size",
        "tiny",
        "--d_feature_network",
        classifier_dir,
        "--d_virtual_batch",
        4,
        "--d_text_dim",
        16,
        "--d_cmap_dim",
        8,
        "--batch_size",
        8,
        "--report_to",
        "none",
        "--validation_images",
        2,
        "--validation_rows",
        2,
        "--ema_half_life_kimg",
        0.1,
    ]


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_training_moves_the_logits_apart_and_exports_a_pipeline(common, images, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_script(
        "train_gan.py",
        [
            *common,
            "--output_dir",
            run,
            "--max_train_steps",
            12,
            "--checkpointing_steps",
            6,
            "--validation_steps",
            6,
            "--discriminator",
            "multiscale",
            "--d_channels",
            "8,16",
            "--space",
            "pixel",
            "--learning_rate_d",
            "1e-2",
            "--learning_rate_g",
            "1e-4",
            "--blur_sigma",
            0,
        ],
        capsys,
    )
    assert code == 0, err
    stats = _stats(run)
    assert [r["step"] for r in stats] == list(range(1, 13)) and [r["nimg"] for r in stats][:2] == [8, 16]
    assert all(torch.isfinite(torch.tensor(list(r.values()), dtype=torch.float64)).all() for r in stats)
    assert {"g_adv", "d_real", "d_fake", "blur_sigma"} <= set(stats[0])
    gap = [r["d_real_logit"] - r["d_fake_logit"] for r in stats]
    assert gap[-1] > 0.2 and gap[-1] > gap[0] + 0.2, gap  # D tells the real from the generated
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-000000.png",
        "step-000006.png",
        "step-000012.png",
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-6"]
    # The exported pipeline reloads and samples, from Python and through sample.py / evaluate.py unchanged.
    from students import GigaGANGenerator, OneStepGANPipeline

    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert isinstance(pipe.student, GigaGANGenerator) and pipe.vae is None  # pixel space
    out = pipe(["a red square", "blue"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    again = OneStepGANPipeline.from_pretrained(run / "checkpoints" / "checkpoint-12" / "pipeline")
    torch.testing.assert_close(
        pipe("red", latents=z, output_type="latent").images, again("red", latents=z, output_type="latent").images
    )
    code, err = run_script(
        "sample.py",
        ["--pipeline", run / "pipeline", "--prompt", "red", "--seeds", "0-1", "--output_dir", tmp_path / "samples"],
        capsys,
    )
    assert code == 0, err
    code, err = run_script(
        "evaluate.py",
        [
            "--pipeline",
            run / "pipeline",
            "--prompts",
            images / "metadata.jsonl",
            "--prompt_column",
            "caption",
            "--metrics",
            "fid",
            "--reference",
            images,
            "--fid_extractor",
            "random-tiny",
            "--num_samples",
            8,
            "--metric_workers",
            0,
            "--output_dir",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["fid"] >= 0


@pytest.mark.parametrize(
    "discriminator, extra",
    [
        ("projected", []),
        (
            "projected",
            ["--d_norm", "mixed", "--gradient_accumulation_steps", 2],
        ),  # the G phase normalises with real samples
        (
            "projected",
            ["--space", "pixel", "--d_mbstd_group", 2, "--mismatch_weight", 1.0],
        ),  # the digits recipe's D, minibatch-std on
        (
            "multiscale",
            [
                "--space",
                "pixel",
                "--d_channels",
                "8,16",
                "--r1_gamma",
                1.0,
                "--r1_interval",
                2,
                "--loss",
                "non_saturating",
                "--mismatch_weight",
                1.0,
                "--d_mbstd_group",
                2,
                "--d_pyramid",
                "downsample",
            ],
        ),
        (
            "projected+multiscale",
            [
                "--d_channels",
                "8",
                "--d_pyramid",
                "downsample",
                "--d_mbstd_group",
                2,
                "--r1_gamma",
                1.0,
                "--r1_interval",
                2,
                "--mismatch_weight",
                1.0,
            ],
        ),  # both Ds as one, in latent space
        (
            "unet",
            [
                "--teacher",
                "TEACHER",
                "--d_heads",
                "before,final",
                "--generator",
                "stylegan_t",
                "--gradient_accumulation_steps",
                2,
            ],
        ),
    ],
)
def test_other_discriminators_train_and_export(common, sd15_teacher, tmp_path, capsys, discriminator, extra):
    run = tmp_path / discriminator
    extra = [sd15_teacher if a == "TEACHER" else a for a in extra]  # noqa: F841
    code, err = run_script(
        "train_gan.py",
        [
            *common,
            "--output_dir",
            run,
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            3,
            "--validation_steps",
            3,
            "--discriminator",
            discriminator,
            *extra,
        ],
        capsys,
    )
    assert code == 0, err
    stats = _stats(run)
    assert len(stats) == 3 and all(r["d_real"] == r["d_real"] for r in stats)
    if "multiscale" in discriminator:
        assert "d_r1" in stats[0] and "d_r1" not in stats[1]  # lazy R1, every r1_interval steps
        assert all("d_mismatch" in r for r in stats)  # the matching-aware term
    from students import OneStepGANPipeline

    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert (pipe.vae is None) == ("pixel" in extra)  # pixel space: no VAE, the output is the image
    assert pipe("red", output_type="pt", generator=torch.Generator().manual_seed(0)).images.shape == (1, 3, 16, 16)


def test_resume_continues_identically(common, tmp_path, capsys):
    args = [*common, "--checkpointing_steps", 2, "--validation_steps", 100, "--mismatch_weight", 0.5]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_script("train_gan.py", [*args, "--output_dir", straight, "--max_train_steps", 4], capsys)[0] == 0
    assert run_script("train_gan.py", [*args, "--output_dir", resumed, "--max_train_steps", 2], capsys)[0] == 0
    code, err = run_script("train_gan.py", [*args, "--output_dir", resumed, "--max_train_steps", 4], capsys)
    assert code == 0, err
    for name in ("model.safetensors", "model_1.safetensors"):  # G and D
        a, b = (load_file(run / "checkpoints" / "checkpoint-4" / name) for run in (straight, resumed))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["step"] for r in _stats(resumed)] == [1, 2, 3, 4]


def test_resume_refuses_another_dataset_or_generator_and_records_allowed_changes(common, own_images, tmp_path, capsys):
    """The same rule as train_student.py's (distill/training/run_record.py): a changed dataset or generator size is one
    line before anything loads (not a size-mismatch traceback), config.yaml untouched; a longer run is recorded."""
    run = tmp_path / "run"
    args = [*common, "--output_dir", run, "--checkpointing_steps", 1, "--validation_steps", 100]
    assert run_script("train_gan.py", [*args, "--max_train_steps", 1], capsys)[0] == 0
    before = (run / "config.yaml").read_text()
    for changed, expected in (
        (["--dataset", own_images], f"dataset: '{common[1]}' -> '{own_images}'"),
        (["--generator_size", "small"], "generator_size: 'tiny' -> 'small'"),
    ):
        code, err = run_script("train_gan.py", [*args, "--max_train_steps", 2, *changed], capsys)
        line = _last_line(err)
        assert code == 2 and f"{run} holds a run made with another config ({expected}" in line, err[-3000:]
        assert (run / "config.yaml").read_text() == before
    assert run_script("train_gan.py", [*args, "--max_train_steps", 2], capsys)[0] == 0
    record = json.loads((run / "config_changes.jsonl").read_text())
    assert record["step"] == 1 and record["changes"] == {"max_train_steps": [1, 2]}


def test_clip_guidance_term_and_its_absence(common, tmp_path, capsys, monkeypatch):
    run = tmp_path / "clip"
    code, err = run_script(
        "train_gan.py",
        [
            *common,
            "--output_dir",
            run,
            "--max_train_steps",
            1,
            "--checkpointing_steps",
            1,
            "--validation_steps",
            100,
            "--clip_guidance_weight",
            0.2,
            "--clip_model",
            "random-tiny",
        ],
        capsys,
    )
    assert code == 0, err
    assert _stats(run)[0]["g_clip"] > 0

    def absent(model, pretrained, cache_dir):  # what resolve_clip_weights raises offline without the weights
        raise FileNotFoundError(
            f"CLIP score needs the open_clip weights {model} / {pretrained}, which are not available locally"
        )

    monkeypatch.setattr("distill.core.pretrained.resolve_clip_weights", absent)
    code, err = run_script(
        "train_gan.py",
        [
            *common,
            "--output_dir",
            tmp_path / "noclip",
            "--max_train_steps",
            1,
            "--checkpointing_steps",
            1,
            "--validation_steps",
            100,
            "--clip_guidance_weight",
            0.2,
        ],
        capsys,
    )
    assert code == 0, err
    assert "warning: CLIP guidance is off" in err and "g_clip" not in _stats(tmp_path / "noclip")[0]


@pytest.mark.slow
def test_two_processes_keep_replicas_identical(common, tmp_path):
    run = tmp_path / "ddp"
    res = accelerate_launch(
        "train_gan.py",
        [
            *common,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
            "--validation_steps",
            100,
            "--batch_size",
            4,
            "--mismatch_weight",
            0.5,
        ],
        num_processes=2,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["nimg"] for r in _stats(run)] == [8, 16]  # 2 processes x batch 4
    assert (run / "pipeline" / "model_index.json").is_file()


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.rstrip().splitlines()[-1]


def test_bad_input_is_one_line(common, images, tmp_path, capsys):
    cases = [
        (["--caption_column", "text"], "caption column 'text' is not in dataset"),
        (
            ["--resolution", 18],
            "resolution 18 is not a multiple of 4 (VAE factor 2 x 2**1 for the 2 levels of gigagan tiny): use 16 or 20",
        ),
        (
            ["--generator", "unet"],
            "unknown generator 'unet'; choose one of gigagan, stylegan_t; the unet student needs a teacher",
        ),
        (["--discriminator", "unet"], "set `teacher`"),
        (["--d_feature_network", "torchvision:resnet18"], "needs its weights"),
        (["--validation_prompt_file", tmp_path / "none.txt"], "validation_prompt_file"),
    ]
    for args, message in cases:
        code, err = run_script("train_gan.py", [*common, "--output_dir", tmp_path / "x", *args], capsys)
        assert code == 2 and message in _last_line(err), (args, err[-2000:])
        assert not (tmp_path / "x").exists()
    broken = tmp_path / "broken"
    make_imagefolder(broken, n=8, size=(16, 16))
    (broken / "005.png").write_bytes(b"\x89PNG truncated")
    code, err = run_script(
        "train_gan.py",
        [
            *common,
            "--dataset",
            broken,
            "--caption_column",
            "text",
            "--output_dir",
            tmp_path / "y",
            "--max_train_steps",
            2,
        ],
        capsys,
    )
    assert code == 2 and "005.png) cannot be read" in _last_line(err) and "replace or remove it" in _last_line(err)
    assert not (tmp_path / "y").exists()  # found before the run takes its output folder


@pytest.mark.parametrize("name", ["digits_gigagan", "digits_gigagan_projected", "digits_stylegan_t", "sd15_gigagan"])
def test_shipped_configs_pass_the_checks(name):
    from conftest import ROOT

    from distill.core.config import parse_config
    from distill.train_gan import GANConfig, check

    cfg = parse_config(GANConfig, ["--config", str(ROOT / "configs" / "scratch" / f"{name}.yaml")])
    check(cfg)
    assert cfg.generator == name.split("_", 1)[1].removesuffix("_pixel").removesuffix("_projected")


# A user's own folder (docs/from-scratch.md): PNGs of mixed sizes and modes + metadata.jsonl, pixel or latent space,
# the multiscale D (no pretrained network), through the CLI only.


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    """12 images of 20x28 .. 40x40 px in modes RGB, L, RGBA, LA, P (with and without transparency), I;16, CMYK (a JPEG),
    bilevel, L / RGB with a tRNS colour; captions in metadata.jsonl's `text`."""
    return make_mixed_imagefolder(tmp_path_factory.mktemp("own") / "my-images")


@pytest.fixture
def own(own_images, sd15_teacher):
    return [
        "--dataset",
        own_images,
        "--text_encoder",
        sd15_teacher,
        "--space",
        "pixel",
        "--resolution",
        16,
        "--generator_size",
        "tiny",
        "--discriminator",
        "multiscale",
        "--d_channels",
        "8,16",
        "--d_text_dim",
        16,
        "--d_cmap_dim",
        8,
        "--loss",
        "non_saturating",
        "--r1_gamma",
        0.1,
        "--r1_interval",
        2,
        "--mismatch_weight",
        1.0,
        "--batch_size",
        4,
        "--report_to",
        "none",
        "--validation_images",
        2,
        "--validation_rows",
        2,
        "--validation_steps",
        100,
        "--ema_half_life_kimg",
        0.1,
    ]


def test_own_folder_in_pixels_trains_and_resumes_exactly(own, tmp_path, capsys):
    """4 steps straight vs 2 + resume to 4 (crossing an epoch of the 12 rows, R1 at steps 0 and 2): the same G, D and
    EMA."""
    args = [*own, "--checkpointing_steps", 2]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
        code, err = run_script("train_gan.py", [*args, "--output_dir", run, "--max_train_steps", steps], capsys)
        assert code == 0, err
    stats = _stats(straight)
    assert [r["step"] for r in stats] == [1, 2, 3, 4] and [r["step"] for r in _stats(resumed)] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(list(r.values()), dtype=torch.float64)).all() for r in stats)
    assert "d_r1" in stats[0] and "d_r1" in stats[2] and "d_r1" not in stats[1]
    for name in ("model.safetensors", "model_1.safetensors"):  # G and D
        a, b = (load_file(run / "checkpoints" / "checkpoint-4" / name) for run in (straight, resumed))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    from students import OneStepGANPipeline

    pipes = [OneStepGANPipeline.from_pretrained(run / "pipeline") for run in (straight, resumed)]  # the EMA generator
    for (k, a), b in zip(pipes[0].student.state_dict().items(), pipes[1].student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert pipes[0].vae is None
    assert pipes[0]("image 3, LA", output_type="pt", generator=torch.Generator().manual_seed(0)).images.shape == (
        1,
        3,
        16,
        16,
    )


def test_channels_last_is_a_layout_only(own, tmp_path, capsys):
    """``channels_last`` (the default) changes how the convolution weights are laid out, not what is trained: the same
    step with the layout off gives the same G and D up to the kernels' rounding (far below one Adam step), and every
    saved tensor is contiguous (safetensors' requirement)."""
    runs = {}
    for layout in ("true", "false"):
        runs[layout] = tmp_path / layout
        code, err = run_script(
            "train_gan.py",
            [
                *own,
                "--output_dir",
                runs[layout],
                "--max_train_steps",
                2,
                "--checkpointing_steps",
                2,
                "--channels_last",
                layout,
            ],
            capsys,
        )
        assert code == 0, err
    for name in ("model.safetensors", "model_1.safetensors"):
        a, b = (load_file(runs[layout] / "checkpoints" / "checkpoint-2" / name) for layout in ("true", "false"))
        assert a.keys() == b.keys() and all(t.is_contiguous() for t in a.values())
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)  # an Adam step is 1e-3


def test_own_folder_in_latent_space(own, sd15_teacher, tmp_path, capsys):
    run = tmp_path / "latent"
    code, err = run_script(
        "train_gan.py",
        [
            *own,
            "--space",
            "latent",
            "--vae",
            sd15_teacher,
            "--output_dir",
            run,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
        ],
        capsys,
    )
    assert code == 0, err
    assert len(_stats(run)) == 2
    from students import OneStepGANPipeline

    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert pipe.vae is not None and pipe(
        "a cat", output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images.shape == (1, 3, 16, 16)


def _cli(args, timeout=300):
    """``python distill/train_gan.py ARGS`` as a user runs it (a process of its own)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "distill" / "train_gan.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "case", ["no_metadata", "unknown_caption_column", "empty_caption", "number_caption", "number_column"]
)
def test_a_bad_folder_is_one_line_and_writes_nothing(own, tmp_path, case):
    folder = make_imagefolder(tmp_path / "my-images", n=8, size=(20, 28), captions="string")
    extra = []
    if case == "no_metadata":
        (folder / "metadata.jsonl").unlink()
        message = "has images but no captions (columns: image): put a metadata.jsonl next to the images"
    elif case == "unknown_caption_column":
        extra, message = ["--caption_column", "prompt"], "caption column 'prompt' is not in dataset"
        message += f" {folder} (columns: image, text): set `caption_column` to one of them"
    elif case == "empty_caption":
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        lines[5] = json.dumps({"file_name": "005.png", "text": ""})
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        message = "005.png) has an empty caption in column 'text': fill it in or drop the row"
    elif case == "number_caption":  # not "cannot open dataset ... JSON parse error ... pass a local folder"
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        lines[5] = json.dumps({"file_name": "005.png", "text": 5})
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        message = (
            f"column 'text' of {folder / 'metadata.jsonl'} holds a number at row 5 where the rows before hold a "
            "string: "
            "a caption must be text"
        )
    else:
        lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        (folder / "metadata.jsonl").write_text(
            "".join(json.dumps({**row, "text": i}) + "\n" for i, row in enumerate(lines))
        )
        message = "000.png) has a caption of type int in column 'text' (0): a caption must be text"
    out = tmp_path / "runs" / "mine"
    res = _cli([*own, "--dataset", folder, "--output_dir", out, "--max_train_steps", 2, *extra])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        res.stderr[-3000:]
    )
    assert not (tmp_path / "runs").exists()  # no output folder, lock or config.yaml


def test_an_image_damaged_past_its_header_stops_mid_run_keeping_the_checkpoints(own, tmp_path, capsys):
    from data_gen.image_text import open_image_text
    from distill.training.seeds import batch_indices

    folder = make_imagefolder(tmp_path / "my-images", n=8, size=(16, 16), captions="string")
    first, second = (batch_indices(seed=0, step=m, rank=0, world=1, batch_size=4, num_rows=8) for m in (0, 1))
    row = next(r for r in second if r not in first)  # read at step 2 only
    path = Path(open_image_text(str(folder))[row]["image"]["path"])
    path.write_bytes(path.read_bytes()[:45])  # the header reads (the up-front check passes), the pixels do not
    run = tmp_path / "run"
    code, err = run_script(
        "train_gan.py",
        [
            *own,
            "--dataset",
            folder,
            "--output_dir",
            run,
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            1,
            "--num_workers",
            1,
            "--output_latent_stats",
            "false",
        ],
        capsys,
    )
    line = _last_line(err)
    assert (
        code == 2
        and f"image of row {row} ({path}) cannot be read" in line
        and "checkpoints written so far are kept" in line
    ), err
    assert (run / "checkpoints" / "checkpoint-1").is_dir() and not (run / "checkpoints" / "checkpoint-2").exists()
    assert not (run / ".lock").exists()
    # The output statistics read the first rows before training: the same image stops the run there, in the same line.
    code, err = run_script(
        "train_gan.py",
        [
            *own,
            "--dataset",
            folder,
            "--output_dir",
            tmp_path / "stats",
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            1,
        ],
        capsys,
    )
    line = _last_line(err)
    assert code == 2 and f"({path}) cannot be read" in line and "checkpoints written so far are kept" in line, err


def test_my_dataset_config_parses_and_trains_with_tiny_parts(own_images, sd15_teacher, tmp_path, capsys):
    from distill.core.config import parse_config
    from distill.train_gan import GANConfig, check

    config = ROOT / "configs" / "scratch" / "my_dataset.yaml"
    cfg = parse_config(GANConfig, ["--config", str(config)])
    check(cfg)
    assert (cfg.space, cfg.discriminator, cfg.loss, cfg.vae, cfg.caption_column) == (
        "pixel",
        "multiscale",
        "non_saturating",
        "",
        "text",
    )
    assert (
        cfg.r1_gamma > 0 and cfg.dataset.startswith("path/to/") and cfg.text_encoder.startswith("path/to/")
    )  # placeholders
    # The config offered for a user's data is the measured digits recipe: only data, text encoder, resolution, steps
    # differ.
    digits = parse_config(GANConfig, ["--config", str(ROOT / "configs" / "scratch" / "digits_gigagan.yaml")])
    method = (
        "space",
        "generator",
        "generator_size",
        "output_latent_stats",
        "discriminator",
        "d_channels",
        "d_pyramid",
        "d_mbstd_group",
        "d_lr_by_fan_in",
        "loss",
        "mismatch_weight",
        "mode_seeking_weight",
        "r1_gamma",
        "r1_interval",
        "augment",
        "blur_sigma",
        "batch_size",
        "learning_rate_g",
        "learning_rate_d",
        "lr_warmup_steps",
        "max_grad_norm",
        "ema_half_life_kimg",
        "ema_rampup",
        "optimizer",
        "d_feature_network",
    )
    assert {k: getattr(cfg, k) for k in method} == {k: getattr(digits, k) for k in method}
    run = tmp_path / "my_dataset"
    code, err = run_script(
        "train_gan.py",
        [
            "--config",
            config,
            "--dataset",
            own_images,
            "--text_encoder",
            sd15_teacher,
            "--output_dir",
            run,
            "--resolution",
            16,
            "--generator_size",
            "tiny",
            "--d_channels",
            "8,16",
            "--batch_size",
            4,
            "--num_workers",
            0,
            "--max_train_steps",
            2,
            "--report_to",
            "none",
            "--validation_rows",
            2,
            "--validation_images",
            2,
        ],
        capsys,
    )
    assert code == 0, err
    assert [r["step"] for r in _stats(run)] == [1, 2] and (run / "pipeline" / "model_index.json").is_file()


def test_an_ensemble_that_would_read_the_generator_pyramid_is_refused_before_anything_is_written(
    common, tmp_path, capsys
):
    code, err = run_script(
        "train_gan.py",
        [*common, "--output_dir", tmp_path / "ens", "--discriminator", "projected+multiscale", "--max_train_steps", 1],
        capsys,
    )
    assert code == 2 and "set d_pyramid downsample" in _last_line(err) and not (tmp_path / "ens").exists()


def test_validation_prompts_is_a_list_as_in_train_student_and_a_file_is_its_own_key(common, tmp_path, capsys):
    """One meaning of ``--validation_prompts`` in both trainers (diffusers': the prompts); the sample grid has a
    row per prompt. ``validation_prompt_file`` reads a file when no prompts are given."""
    from PIL import Image

    prompt_file = tmp_path / "grid.txt"
    prompt_file.write_text("red\nblue\n")
    for name, args, rows in (
        ("list", ["--validation_prompts", "red", "a blue square", "blue"], 3),
        ("file", ["--validation_prompt_file", prompt_file], 2),
    ):
        run = tmp_path / name
        code, err = run_script(
            "train_gan.py",
            [
                *common,
                "--output_dir",
                run,
                "--max_train_steps",
                1,
                "--discriminator",
                "multiscale",
                "--d_channels",
                "8,16",
                "--space",
                "pixel",
                "--validation_rows",
                10,
                *args,
            ],
            capsys,
        )
        assert code == 0, err
        grid = Image.open(run / "samples" / "step-000000.png")
        assert grid.size == (2 * 16, rows * 16), (name, grid.size)  # 2 noise maps x one row per prompt


def test_the_default_sample_grid_shows_every_subject_of_a_sorted_folder():
    """Without validation prompts the grid reads captions of rows spread over an indexed set: a folder sorted by
    subject (its first 64 rows all one caption) still shows every subject, in the set's order."""
    from types import SimpleNamespace

    from distill.scratch.data import RealData

    rows = [{"text": f"subject {i // 100}"} for i in range(800)]  # 8 subjects of 100 rows, sorted
    data = SimpleNamespace(ds=rows, cursor=None, columns=("image", "text"))
    assert RealData.some_captions(data, 64) == [f"subject {i}" for i in range(8)]
    assert RealData.some_captions(SimpleNamespace(ds=rows[:5], cursor=None, columns=("image", "text")), 64) == [
        "subject 0"
    ]
