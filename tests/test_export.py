"""Exported students load with plain diffusers, without this project: the fully-custom pipeline folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from students import GigaGANGenerator, OneStepGANPipeline, StyleGANTGenerator, UNetStudent
from students.export import PIPELINE_MODULE, flatten_module, save_standalone

PROMPTS = ["a red apple", "a photo of a cat"]

# Run in a fresh interpreter: drop every way this project could be imported (the repo root on sys.path,
# the editable install's finder), prove it is gone, then load the folders with diffusers alone.
STANDALONE = r"""
import importlib.util, json, sys
from pathlib import Path
OURS = ("students", "distill", "teachers", "data_gen")
ours = lambda p: any((Path(p) / n / "__init__.py").exists() for n in OURS)
sys.path[:] = [p for p in sys.path if p and not ours(p) and "__editable__" not in p]
sys.path_importer_cache.clear()
finds_ours = lambda f: hasattr(f, "find_spec") and f.find_spec("students", None) is not None
sys.meta_path[:] = [f for f in sys.meta_path if not finds_ours(f)]
assert all(importlib.util.find_spec(n) is None for n in OURS), "this project is still importable"
import numpy as np, torch
from diffusers import DiffusionPipeline
jobs = json.loads(sys.argv[1])
for folder, out in jobs:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    noise = torch.from_numpy(np.load(Path(folder).parent / "noise.npy"))
    latents = pipe(PROMPTS, latents=noise, output_type="latent").images
    images = pipe(PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=0.0, output_type="np").images
    modules = dict(pipeline=type(pipe).__module__, student=type(pipe.student).__module__)
    np.savez(out, latents=latents.numpy(), images=images, **modules)
assert not any(n.split(".")[0] in OURS for n in sys.modules), sorted(n for n in sys.modules if n.split(".")[0] in OURS)
print("loaded", len(jobs))
""".replace("PROMPTS", repr(PROMPTS))


def _student(kind: str, teacher):
    torch.manual_seed(0)
    if kind == "unet":
        return UNetStudent.from_teacher(teacher.unet, teacher.scheduler)
    cls = {"gigagan": GigaGANGenerator, "stylegan_t": StyleGANTGenerator}[kind]
    text_2 = getattr(teacher, "text_encoder_2", None)
    return cls.for_latents(
        latent_channels=4,
        sample_size=16,
        cross_attention_dim=teacher.unet.config.cross_attention_dim,
        pooled_dim=text_2.config.projection_dim if text_2 is not None else 0,
        size="tiny",
    ).eval()


def _pipeline(kind: str, teacher) -> OneStepGANPipeline:
    return OneStepGANPipeline(
        student=_student(kind, teacher),
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        text_encoder_2=getattr(teacher, "text_encoder_2", None),
        tokenizer_2=getattr(teacher, "tokenizer_2", None),
    )


CASES = [("unet", "sd15"), ("gigagan", "sd15"), ("stylegan_t", "sdxl"), ("unet", "sdxl")]


@pytest.fixture(scope="module")
def exported(tiny_teacher_factory, tmp_path_factory):
    from diffusers import DiffusionPipeline

    out = {}
    for kind, family in CASES:
        teacher = DiffusionPipeline.from_pretrained(tiny_teacher_factory(family))
        root = tmp_path_factory.mktemp(f"{kind}-{family}")
        np.save(root / "noise.npy", torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)).numpy())
        out[(kind, family)] = save_standalone(_pipeline(kind, teacher), root / "pipeline")
    return out


def test_standalone_folder_loads_and_samples_without_this_project(exported, tmp_path):
    jobs = [(str(folder), str(tmp_path / f"{kind}-{family}.npz")) for (kind, family), folder in exported.items()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", STANDALONE, json.dumps(jobs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "might require the following packages" not in run.stderr  # diffusers' check_imports found everything
    for (kind, family), folder in exported.items():
        got = np.load(tmp_path / f"{kind}-{family}.npz")
        assert str(got["pipeline"]).startswith("diffusers_modules.") and str(got["student"]).startswith(
            "diffusers_modules."
        )
        ours = OneStepGANPipeline.from_pretrained(folder)
        assert type(ours) is OneStepGANPipeline and type(ours.student).__module__.startswith("students.")
        noise = torch.from_numpy(np.load(folder.parent / "noise.npy"))
        latents = ours(PROMPTS, latents=noise, output_type="latent").images
        images = ours(PROMPTS, latents=noise, output_type="np").images
        # the child runs with another thread count, so float sums reorder: ~1e-5 on latents of size ~30
        np.testing.assert_allclose(got["latents"], latents.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{kind}-{family}")
        np.testing.assert_allclose(got["images"], images, rtol=1e-4, atol=1e-4, err_msg=f"{kind}-{family}")


def test_exported_folder_layout(exported):
    from diffusers.utils.dynamic_modules_utils import check_imports

    for (kind, family), folder in exported.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == [PIPELINE_MODULE, "OneStepGANPipeline"]
        module, cls = index["student"]
        assert cls == {"unet": "UNetStudent", "gigagan": "GigaGANGenerator", "stylegan_t": "StyleGANTGenerator"}[kind]
        assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"][0] == "transformers"
        assert (index["text_encoder_2"][0] == "transformers") == (family == "sdxl")
        for code in (folder / f"{PIPELINE_MODULE}.py", folder / "student" / f"{module}.py"):
            assert check_imports(str(code)) == []  # no relative imports: the file is copied alone
            assert not re.search(r"^\s*(from|import)\s+(students|distill|teachers|data_gen)\b", code.read_text(), re.M)
            compile(code.read_text(), str(code), "exec")


def test_flatten_rejects_a_name_defined_twice(tmp_path, monkeypatch):
    pkg = tmp_path / "twice"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("X = 1\n")
    (pkg / "b.py").write_text('"""B."""\nfrom __future__ import annotations\nfrom .a import X as Y\nX = 2\n')
    (pkg / "c.py").write_text("from .a import X as Y\nZ = Y + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="'X' is defined in both twice.a and twice.b"):
        flatten_module("twice.b")
    namespace: dict = {}
    exec(compile(flatten_module("twice.c"), "c.py", "exec"), namespace)
    assert namespace["Z"] == 2 and namespace["Y"] == 1


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_unet_student_runs_in_the_stock_pipeline(tiny_teacher_factory, tmp_path, capsys, family):
    """distill/export_stock.py: stock StableDiffusion(XL)Pipeline / AutoPipelineForText2Image, one trailing DDIM
    step at guidance 0, gives OneStepGANPipeline's latents (epsilon, v-prediction and SDXL teachers)."""
    from conftest import run_script
    from diffusers import (
        AutoPipelineForText2Image,
        DiffusionPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    teacher_dir = tiny_teacher_factory(family)
    ours = _pipeline("unet", DiffusionPipeline.from_pretrained(teacher_dir))
    ours.save_pretrained(tmp_path / "pipeline")
    code, err = run_script(
        "export_stock.py",
        ["--pipeline", tmp_path / "pipeline", "--output_dir", tmp_path / "stock", "--teacher", teacher_dir],
        capsys,
    )
    assert code == 0, err
    stock = AutoPipelineForText2Image.from_pretrained(tmp_path / "stock")
    assert type(stock) is (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = ours(PROMPTS, latents=noise, output_type="latent").images
    got = stock(PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=0.0, output_type="latent").images
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # Without --teacher the schedule comes from the pairs the student trained on; a GAN student is refused.
    (tmp_path / "pipeline" / "pairs_split.json").write_text(json.dumps({"pairs": str(tmp_path / "pairs")}))
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "manifest.json").write_text(json.dumps({"scheduler_config": dict(stock.scheduler.config)}))
    assert (
        run_script(
            "export_stock.py", ["--pipeline", tmp_path / "pipeline", "--output_dir", tmp_path / "stock2"], capsys
        )[0]
        == 0
    )
    if family == "sd15":  # a GAN student is refused as such, before a teacher is asked for
        _pipeline("gigagan", DiffusionPipeline.from_pretrained(teacher_dir)).save_pretrained(tmp_path / "gan")
        code, err = run_script(
            "export_stock.py", ["--pipeline", tmp_path / "gan", "--output_dir", tmp_path / "x"], capsys
        )
        line = err.strip().splitlines()[-1]
        assert code == 2 and "holds a GigaGANGenerator student: only UNet students export to a stock" in line, err[
            -2000:
        ]
        assert not (tmp_path / "x").exists()


def test_export_stock_writes_the_folder_whole_or_not_at_all(tiny_teacher_factory, tmp_path, capsys, monkeypatch):
    """A failed or killed re-export leaves the earlier folder as it was (no mix of old and new files), a full disk is
    one line, and a killed writer's temporary folder is cleared by the next export."""
    import errno

    from conftest import run_script
    from diffusers import DiffusionPipeline

    import students.stock

    teacher_dir = tiny_teacher_factory("sd15")
    _pipeline("unet", DiffusionPipeline.from_pretrained(teacher_dir)).save_pretrained(tmp_path / "pipeline")
    args = ["--pipeline", tmp_path / "pipeline", "--output_dir", tmp_path / "stock", "--teacher", teacher_dir]
    killed = tmp_path / ".stock.tmp-999999"  # left by a writer killed with -9 (no such process now)
    killed.mkdir()
    (killed / "model_index.json").write_text("{}")
    assert run_script("export_stock.py", args, capsys)[0] == 0
    assert not killed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "stock"]
    before = {p: p.read_bytes() for p in (tmp_path / "stock").rglob("*") if p.is_file()}
    real = students.stock.save_stock_pipeline

    def fills_the_disk(pipe, save_directory, **kwargs):
        real(pipe, save_directory, **kwargs)
        (Path(save_directory) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(students.stock, "save_stock_pipeline", fills_the_disk)
    code, err = run_script("export_stock.py", args, capsys)
    line = err.strip().splitlines()[-1]
    assert (
        code == 2
        and line.startswith(f"error: no space left in {tmp_path}, need ≈ ")
        and "(the earlier one is kept)" in line
    ), err
    assert {p: p.read_bytes() for p in (tmp_path / "stock").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "stock"]
    code, err = run_script("export_stock.py", [*args[:-4], "--output_dir", tmp_path / "new", *args[-2:]], capsys)
    assert code == 2 and not (tmp_path / "new").exists()
