"""distill/train_gan.py through its CLI: from-scratch text-to-image GAN training on a tiny generated set."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, run_script
from test_image_text import make_imagefolder


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
            fh.write(json.dumps({"file_name": f"{i:03d}.png", "caption": ["a red square", "red"] if red else ["a blue square", "blue"]}) + "\n")
    return path


@pytest.fixture
def common(images, classifier_dir, sd15_teacher):
    return ["--dataset", images, "--caption_column", "caption", "--text_encoder", sd15_teacher, "--vae", sd15_teacher,
            "--resolution", 16, "--generator", "gigagan", "--generator_size", "tiny", "--d_feature_network", classifier_dir,
            "--d_virtual_batch", 4, "--d_text_dim", 16, "--d_cmap_dim", 8, "--batch_size", 8, "--report_to", "none",
            "--validation_images", 2, "--validation_rows", 2, "--ema_half_life_kimg", 0.1]


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_training_moves_the_logits_apart_and_exports_a_pipeline(common, images, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_script("train_gan.py", [*common, "--output_dir", run, "--max_train_steps", 12, "--checkpointing_steps", 6,
                                            "--validation_steps", 6, "--discriminator", "multiscale", "--d_channels", "8,16", "--space", "pixel",
                                            "--learning_rate_d", "1e-2", "--learning_rate_g", "1e-4", "--blur_sigma", 0], capsys)
    assert code == 0, err
    stats = _stats(run)
    assert [r["step"] for r in stats] == list(range(1, 13)) and [r["nimg"] for r in stats][:2] == [8, 16]
    assert all(torch.isfinite(torch.tensor(list(r.values()), dtype=torch.float64)).all() for r in stats)
    assert {"g_adv", "d_real", "d_fake", "blur_sigma"} <= set(stats[0])
    gap = [r["d_real_logit"] - r["d_fake_logit"] for r in stats]
    assert gap[-1] > 0.2 and gap[-1] > gap[0] + 0.2, gap  # D tells the real from the generated
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000000.png", "step-000006.png", "step-000012.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-6"]
    # The exported pipeline reloads and samples, from Python and through sample.py / evaluate.py unchanged.
    from students import GigaGANGenerator, OneStepGANPipeline

    pipe = OneStepGANPipeline.from_pretrained(run / "pipeline")
    assert isinstance(pipe.student, GigaGANGenerator) and pipe.vae is None  # pixel space
    out = pipe(["a red square", "blue"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    again = OneStepGANPipeline.from_pretrained(run / "checkpoints" / "checkpoint-12" / "pipeline")
    torch.testing.assert_close(pipe("red", latents=z, output_type="latent").images, again("red", latents=z, output_type="latent").images)
    code, err = run_script("sample.py", ["--pipeline", run / "pipeline", "--prompt", "red", "--seeds", "0-1",
                                         "--output_dir", tmp_path / "samples"], capsys)
    assert code == 0, err
    code, err = run_script("evaluate.py", ["--pipeline", run / "pipeline", "--prompts", images / "metadata.jsonl", "--prompt_column", "caption",
                                           "--metrics", "fid", "--reference", images, "--fid_extractor", "random-tiny", "--num_samples", 8,
                                           "--metric_workers", 0, "--output_dir", tmp_path / "eval"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["fid"] >= 0


@pytest.mark.parametrize("discriminator, extra", [
    ("projected", []),
    ("projected", ["--d_norm", "mixed", "--gradient_accumulation_steps", 2]),  # the G phase normalises with real samples
    ("multiscale", ["--space", "pixel", "--d_channels", "8,16", "--r1_gamma", 1.0, "--r1_interval", 2, "--loss", "non_saturating",
                    "--mismatch_weight", 1.0]),
    ("unet", ["--teacher", "TEACHER", "--d_heads", "before,final", "--generator", "stylegan_t", "--gradient_accumulation_steps", 2]),
])
def test_other_discriminators_train_and_export(common, sd15_teacher, tmp_path, capsys, discriminator, extra):
    run = tmp_path / discriminator
    extra = [sd15_teacher if a == "TEACHER" else a for a in extra]  # noqa: F841
    code, err = run_script("train_gan.py", [*common, "--output_dir", run, "--max_train_steps", 3, "--checkpointing_steps", 3,
                                            "--validation_steps", 3, "--discriminator", discriminator, *extra], capsys)
    assert code == 0, err
    stats = _stats(run)
    assert len(stats) == 3 and all(r["d_real"] == r["d_real"] for r in stats)
    if discriminator == "multiscale":
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


def test_clip_guidance_term_and_its_absence(common, tmp_path, capsys, monkeypatch):
    run = tmp_path / "clip"
    code, err = run_script("train_gan.py", [*common, "--output_dir", run, "--max_train_steps", 1, "--checkpointing_steps", 1,
                                            "--validation_steps", 100, "--clip_guidance_weight", 0.2, "--clip_model", "random-tiny"], capsys)
    assert code == 0, err
    assert _stats(run)[0]["g_clip"] > 0
    def absent(model, pretrained, cache_dir):  # what resolve_clip_weights raises offline without the weights
        raise FileNotFoundError(f"CLIP score needs the open_clip weights {model} / {pretrained}, which are not available locally")

    monkeypatch.setattr("distill.metrics.clip_score.resolve_clip_weights", absent)
    code, err = run_script("train_gan.py", [*common, "--output_dir", tmp_path / "noclip", "--max_train_steps", 1, "--checkpointing_steps", 1,
                                            "--validation_steps", 100, "--clip_guidance_weight", 0.2], capsys)
    assert code == 0, err
    assert "warning: CLIP guidance is off" in err and "g_clip" not in _stats(tmp_path / "noclip")[0]


@pytest.mark.slow
def test_two_processes_keep_replicas_identical(common, tmp_path):
    run = tmp_path / "ddp"
    res = accelerate_launch("train_gan.py", [*common, "--output_dir", run, "--max_train_steps", 2, "--checkpointing_steps", 2,
                                             "--validation_steps", 100, "--batch_size", 4, "--mismatch_weight", 0.5], num_processes=2)
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["nimg"] for r in _stats(run)] == [8, 16]  # 2 processes x batch 4
    assert (run / "pipeline" / "model_index.json").is_file()


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.rstrip().splitlines()[-1]


def test_bad_input_is_one_line(common, images, tmp_path, capsys):
    cases = [
        (["--caption_column", "text"], "caption column 'text' is not in dataset"),
        (["--resolution", 18], "resolution 18 is not a multiple of 4 (VAE factor 2 x 2**1 for the 2 levels of gigagan tiny): use 16 or 20"),
        (["--generator", "unet"], "unknown generator 'unet'; choose one of gigagan, stylegan_t; the UNet student needs a teacher"),
        (["--discriminator", "unet"], "set `teacher`"),
        (["--d_feature_network", "torchvision:resnet18"], "needs its weights"),
    ]
    for args, message in cases:
        code, err = run_script("train_gan.py", [*common, "--output_dir", tmp_path / "x", *args], capsys)
        assert code == 2 and message in _last_line(err), (args, err[-2000:])
        assert not (tmp_path / "x").exists()
    broken = tmp_path / "broken"
    make_imagefolder(broken, n=8, size=(16, 16))
    (broken / "005.png").write_bytes(b"\x89PNG truncated")
    code, err = run_script("train_gan.py", [*common, "--dataset", broken, "--caption_column", "text", "--output_dir", tmp_path / "y",
                                            "--max_train_steps", 2], capsys)
    assert code == 2 and "005.png) cannot be read" in _last_line(err) and "replace or remove it" in _last_line(err)


@pytest.mark.parametrize("name", ["digits_gigagan", "digits_stylegan_t", "sd15_gigagan"])
def test_shipped_configs_pass_the_checks(name):
    from conftest import ROOT
    from distill.config import parse_config
    from distill.train_gan import GANConfig, check

    cfg = parse_config(GANConfig, ["--config", str(ROOT / "configs" / "scratch" / f"{name}.yaml")])
    check(cfg)
    assert cfg.generator == name.split("_", 1)[1]
