"""Stage one through its CLI: parity, process-count independence, resume, refusal, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import ROOT, accelerate_launch, ctrl_c_able, run_script
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from data_gen.noise import noise_for_seed
from data_gen.pairs import load_pairs

COMMON = ["--resolution", "32", "--num_inference_steps", "3", "--guidance_scale", "4.0"]


def _one_error_line(err: str) -> str:
    """The error is one line at the end of stderr, with no traceback (progress bars may precede it)."""
    assert "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("error: "), err
    return last


def _rows(path) -> dict[int, dict]:
    ds = datasets.load_dataset(str(path), split="train").with_format("numpy")
    return {int(r["index"]): r for r in ds}


@pytest.mark.parametrize("family, pipe_cls", [("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)])
def test_pairs_match_the_diffusers_pipeline(tiny_teacher_factory, prompt_file, tmp_path, capsys, family, pipe_cls):
    teacher = tiny_teacher_factory(family)
    out = tmp_path / "pairs"
    code, err = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            teacher,
            "--prompts",
            prompt_file,
            "--num_pairs",
            6,
            "--batch_size",
            4,
            "--shard_size",
            4,
            "--output_dir",
            out,
            *COMMON,
        ],
        capsys,
    )
    assert code == 0, err
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 6 and set(ds.column_names) == {"index", "seed", "prompt", "noise", "target"}
    assert ds.features["noise"].dtype == "float16" and ds.features["target"].shape == (4, 16, 16)
    rows = _rows(out)
    assert sorted(rows) == list(range(6))
    prompts = ["a red apple on a table", "a photo of a cat", "a blue car in the rain", "a bowl of soup"]
    pipe = pipe_cls.from_pretrained(teacher)
    for i in (0, 5):
        row = rows[i]
        assert row["prompt"] == prompts[i % 4]  # blank lines skipped, prompts cycled
        # The stored noise is what the per-row generator draws, rounded to the storage dtype.
        noise = noise_for_seed(int(row["seed"]), (4, 16, 16), torch.float16)
        np.testing.assert_array_equal(row["noise"], noise.numpy())
        ref = pipe(
            prompt=row["prompt"],
            latents=noise.float()[None],
            num_inference_steps=3,
            guidance_scale=4.0,
            output_type="latent",
        ).images[0]
        np.testing.assert_allclose(row["target"].astype(np.float32), ref.half().float().numpy(), atol=2e-3, rtol=2e-3)


def test_two_processes_write_the_same_rows(sd15_teacher, prompt_file, tmp_path):
    args = [
        "--teacher",
        sd15_teacher,
        "--prompts",
        prompt_file,
        "--num_pairs",
        10,
        "--batch_size",
        2,
        "--shard_size",
        2,
        *COMMON,
    ]
    one = accelerate_launch("generate_pairs.py", [*args, "--output_dir", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch("generate_pairs.py", [*args, "--output_dir", tmp_path / "two"], num_processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(10))
    for i in a:
        assert a[i]["prompt"] == b[i]["prompt"] and a[i]["seed"] == b[i]["seed"]
        np.testing.assert_array_equal(a[i]["noise"], b[i]["noise"])
        np.testing.assert_array_equal(a[i]["target"], b[i]["target"])
    assert "pairs/s" in one.stdout + one.stderr and str((tmp_path / "one").resolve()) in one.stdout


def test_kill_and_resume_finishes_exactly_the_missing_rows(sd15_teacher, prompt_file, tmp_path):
    out = tmp_path / "pairs"
    args = [
        sys.executable,
        str(ROOT / "distill" / "generate_pairs.py"),
        "--teacher",
        str(sd15_teacher),
        "--prompts",
        str(prompt_file),
        "--num_pairs",
        "12",
        "--batch_size",
        "1",
        "--shard_size",
        "2",
        "--resolution",
        "32",
        "--num_inference_steps",
        "2",
        "--output_dir",
        str(out),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "data").glob("train-*.parquet")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in (out / "data").glob("train-*.parquet"))
    assert 1 <= len(written) < 6, "the kill must land mid-run for this test to mean anything"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("train-*.parquet")}
    with pytest.raises(ValueError, match="incomplete"):
        load_pairs(out)
    # kill -9 leaves the run's lock: the same command takes it over (its holder is dead) and resumes, no hand step.
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the lock of {out} from a run that is no longer alive (pid {proc.pid}" in rerun.stderr
    assert "resuming with" in rerun.stdout
    # Shards written before the kill are kept as they were, not rewritten.
    assert {p: (out / "data" / p).stat().st_mtime_ns for p in before} == before
    ds = load_pairs(out)
    assert sorted(ds["index"]) == list(range(12))
    # The Arrow copy datasets reads from lives beside the shards, made once and reused by the next load.
    arrow = [Path(f["filename"]) for f in ds.cache_files]
    assert arrow and all((out / ".arrow-cache") in f.parents for f in arrow)
    files = sorted((out / ".arrow-cache").rglob("*.arrow"))
    assert [Path(f["filename"]) for f in load_pairs(out).cache_files] == arrow and sorted(
        (out / ".arrow-cache").rglob("*.arrow")
    ) == files


def test_other_config_in_same_dir_is_refused(sd15_teacher, prompt_file, tmp_path, capsys):
    out = tmp_path / "pairs"
    base = ["--teacher", sd15_teacher, "--prompts", prompt_file, "--num_pairs", 2, "--output_dir", out, *COMMON]
    assert run_script("generate_pairs.py", base, capsys)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = run_script("generate_pairs.py", [*base, "--guidance_scale", "2.0"], capsys)
    assert code == 2
    assert _one_error_line(err).count("different config") == 1 and "guidance_scale" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Batch size does not change any row, so it may differ on a rerun.
    assert run_script("generate_pairs.py", [*base, "--batch_size", "1"], capsys)[0] == 0
    # Storing the prompt embeddings changes the columns: shards with and without cannot mix (either way round).
    code, err = run_script("generate_pairs.py", [*base, "--store_prompt_embeds"], capsys)
    assert code == 2 and "store_prompt_embeds: None -> True" in _one_error_line(err)
    embeds = tmp_path / "embeds"
    with_embeds = [*base[: -len(COMMON) - 2], "--output_dir", embeds, *COMMON, "--store_prompt_embeds"]
    assert run_script("generate_pairs.py", with_embeds, capsys)[0] == 0
    code, err = run_script("generate_pairs.py", with_embeds[:-1], capsys)
    assert code == 2 and "store_prompt_embeds: True -> None" in _one_error_line(err)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"--teacher": "/no/such/teacher"}, "not found"),
        ({"--resolution": "33"}, "not divisible by the VAE factor 2"),
        ({"--scheduler": "heun"}, "unknown scheduler 'heun'; choose one of ddim, dpmpp, euler"),
        ({"--prompts": "EMPTY"}, "contains no prompts"),
        ({"--prompts": "/no/such/prompts.txt"}, "prompt file /no/such/prompts.txt not found"),
        ({"--output_dir": "FILE/sub"}, "is not writable"),
        ({"--guidance": "3"}, "unrecognized arguments: --guidance"),
        ({"--num_pairs": "many"}, "num_pairs"),
    ],
)
def test_bad_input_is_one_clear_line(sd15_teacher, prompt_file, tmp_path, capsys, override, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = {
        "--teacher": str(sd15_teacher),
        "--prompts": str(prompt_file),
        "--num_pairs": "2",
        "--output_dir": str(tmp_path / "out"),
        "--resolution": "32",
        "--num_inference_steps": "2",
    }
    args.update({k: v.replace("EMPTY", str(empty)).replace("FILE", str(a_file)) for k, v in override.items()})
    code, err = run_script("generate_pairs.py", [x for kv in args.items() for x in kv], capsys)
    assert code == 2
    assert message in _one_error_line(err)


def test_unknown_key_in_yaml_config(sd15_teacher, tmp_path, capsys):
    cfg = tmp_path / "pairs.yaml"
    cfg.write_text(f"teacher: {sd15_teacher}\nnum_steps: 10\n")
    code, err = run_script("generate_pairs.py", ["--config", cfg], capsys)
    assert code == 2 and "unknown config key(s) 'num_steps'" in _one_error_line(err)


# ------------------------------------------------------------------------------------------------
# Data that must not mix silently: one writer per folder, teacher by content, shard checksums.


def _gen(teacher, prompt_file, out, *extra):
    return [
        "--teacher",
        teacher,
        "--prompts",
        prompt_file,
        "--num_pairs",
        4,
        "--shard_size",
        2,
        "--output_dir",
        out,
        "--resolution",
        "32",
        "--num_inference_steps",
        "2",
        *extra,
    ]


def _files(out):
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_second_run_into_a_locked_folder_is_refused(sd15_teacher, prompt_file, tmp_path, capsys):
    out = tmp_path / "pairs"
    args = [
        sys.executable,
        str(ROOT / "distill" / "generate_pairs.py"),
        *map(str, _gen(sd15_teacher, prompt_file, out)),
        "--num_pairs",
        "4000",
        "--batch_size",
        "1",
    ]  # still running when Ctrl-C comes (400 took 12 s on idle cores)
    first = subprocess.Popen(
        args,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_able,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "manifest.json").exists():
            time.sleep(0.05)
        assert (out / ".lock").is_file(), "the first run holds the folder's lock while it runs"
        code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out, "--seed", 1), capsys)
        assert code == 2
        line = _one_error_line(err)
        assert "is in use by another run" in line and f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: one line, exit 130, finished shards kept, lock released
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 130, first_err[-2000:]
    assert "Traceback" not in first_err and first_err.rstrip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    assert not (out / ".lock").exists()
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 0  # the refused run changed nothing


def test_a_lock_left_by_a_killed_run_on_this_host_is_taken_over(sd15_teacher, prompt_file, tmp_path, capsys):
    """A preempted job resumes by itself: the dead holder's lock (pid and start time checked) is taken over, in a
    line."""
    import socket

    out = tmp_path / "pairs"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the run that held the lock was killed
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "yesterday"}))
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)
    assert code == 0, err[-2000:]
    assert (
        f"took over the lock of {out} from a run that is no longer alive (pid {dead.pid} on {socket.gethostname()}"
        in err
    )
    assert not (out / ".lock").exists() and sorted(load_pairs(out)["index"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("minutes_since_beat", [11, 1])
def test_a_lock_of_another_host_is_taken_over_once_its_heartbeat_stops(
    sd15_teacher, prompt_file, tmp_path, capsys, minutes_since_beat
):
    """A job requeued on another node: the lock of the node it ran on, not renewed for 10 min, is taken over; one
    renewed a minute ago belongs to a run that may still write there."""
    out = tmp_path / "pairs"
    out.mkdir()
    lock = out / ".lock"
    lock.write_text(json.dumps({"host": "preempted-node", "pid": 4242, "since": "earlier", "heartbeat": 60.0}))
    beat = time.time() - 60 * minutes_since_beat
    os.utime(lock, (beat, beat))
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)
    if minutes_since_beat > 10:
        assert (
            code == 0 and "from a run whose lock has not been renewed for 11 min (pid 4242 on preempted-node" in err
        ), err[-2000:]
    else:
        line = _one_error_line(err)
        assert (
            code == 2 and "is in use by another run (pid 4242 on preempted-node" in line and "renewed 60 s ago" in line
        ), line
        assert lock.exists() and not (out / "manifest.json").exists()


def test_a_held_lock_is_renewed_by_its_heartbeat(tmp_path, monkeypatch):
    import distill.core.lock as lock_module

    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    with lock_module.locked(tmp_path / "run", purpose="test", is_main_process=True):
        lock = tmp_path / "run" / ".lock"
        old = time.time() - 3600
        os.utime(lock, (old, old))
        deadline = time.time() + 10
        while time.time() < deadline and lock.stat().st_mtime == old:
            time.sleep(0.05)
        assert time.time() - lock.stat().st_mtime < 10 and json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_resume_compares_the_teacher_by_content_not_by_path(sd15_teacher, prompt_file, tmp_path, capsys):
    import shutil

    from diffusers import UNet2DConditionModel

    teacher = tmp_path / "teacher"
    shutil.copytree(sd15_teacher, teacher)
    out = tmp_path / "pairs"
    assert run_script("generate_pairs.py", _gen(teacher, prompt_file, out), capsys)[0] == 0
    (out / "data" / "train-00001-of-00002.parquet").unlink()  # as if killed before the last shard
    # The same teacher spelled another way (and the prompts too) resumes.
    code, err = run_script(
        "generate_pairs.py", _gen(tmp_path / "." / "teacher" / ".." / "teacher", prompt_file, out), capsys
    )
    assert code == 0, err
    # The same path with other weights is refused, naming the changed file; nothing in the folder changes.
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.5)
    unet.save_pretrained(teacher / "unet")
    (out / "data" / "train-00001-of-00002.parquet").unlink()
    before = _files(out)
    code, err = run_script("generate_pairs.py", _gen(teacher, prompt_file, out), capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "another teacher" in line and "unet/diffusion_pytorch_model.safetensors" in line
    assert _files(out) == before


def test_shards_without_a_manifest_are_refused(sd15_teacher, prompt_file, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)[0] == 0
    (out / "manifest.json").unlink()
    before = _files(out)
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)
    assert code == 2 and "but no manifest.json" in _one_error_line(err)
    assert _files(out) == before


def test_a_corrupt_shard_is_named_on_resume_and_on_load(sd15_teacher, prompt_file, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)[0] == 0
    shard = out / "data" / "train-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)  # zeroed bytes inside a page: still a valid Parquet file
    shard.write_bytes(bytes(data))
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"shard {shard} is corrupt" in line and f"rm {shard}" in line
    with pytest.raises(ValueError, match="train-00001-of-00002.parquet is corrupt"):
        load_pairs(out)
    code, err = run_script(
        "train_student.py",
        [
            "--pairs",
            out,
            "--output_dir",
            tmp_path / "run",
            "--batch_size",
            1,
            "--holdout",
            1,
            "--lpips_network",
            "random",
            "--report_to",
            "none",
        ],
        capsys,
    )
    assert code == 2 and f"shard {shard} is corrupt" in _one_error_line(err)
    shard.unlink()  # the fix the message names
    assert run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)[0] == 0
    assert sorted(load_pairs(out)["index"]) == [0, 1, 2, 3]


def test_stale_temporaries_are_removed_and_failed_runs_leave_no_folder(sd15_teacher, prompt_file, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)[0] == 0
    stale = out / "data" / ".tmp-99999-train-00001-of-00002.parquet"
    stale.write_bytes(b"half a shard")
    assert run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)[0] == 0
    assert not stale.exists()
    missing = tmp_path / "new" / "pairs"
    code, _ = run_script("generate_pairs.py", _gen("/no/such/teacher", prompt_file, missing), capsys)
    assert code == 2 and not (tmp_path / "new").exists()


def test_user_mistakes_in_files_are_one_line(sd15_teacher, prompt_file, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("teacher: x\nnum_pairs: [1, 2\n")
    code, err = run_script("generate_pairs.py", ["--config", bad_yaml], capsys)
    assert code == 2 and f"config file {bad_yaml} is not valid YAML at line" in _one_error_line(err)
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("a caf\xe9 table\n".encode("latin-1"))
    out = tmp_path / "out"
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, latin1, out), capsys)
    assert code == 2 and f"prompt file {latin1} is not UTF-8 text (byte 0xe9 at offset 5)" in _one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("family, pipe_cls", [("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)])
def test_stored_prompt_embeds_are_the_pipelines(tiny_teacher_factory, prompt_file, tmp_path, capsys, family, pipe_cls):
    """--store_prompt_embeds: each row also holds the teacher's encode_prompt output (SDXL: + pooled), in float16."""
    from data_gen.pairs import read_manifest

    teacher = tiny_teacher_factory(family)
    out = tmp_path / "pairs"
    code, err = run_script(
        "generate_pairs.py",
        [
            "--teacher",
            teacher,
            "--prompts",
            prompt_file,
            "--num_pairs",
            5,
            "--batch_size",
            2,
            "--shard_size",
            3,
            "--output_dir",
            out,
            "--store_prompt_embeds",
            *COMMON,
        ],
        capsys,
    )
    assert code == 0, err
    manifest = read_manifest(out)
    ds = load_pairs(out).with_format("torch")
    rows = ds[:]
    pipe = pipe_cls.from_pretrained(teacher)
    embeds, *rest = pipe.encode_prompt(
        rows["prompt"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    expected = (
        {"prompt_embeds": embeds} if family == "sd15" else {"prompt_embeds": embeds, "pooled_prompt_embeds": rest[1]}
    )
    assert manifest["config"]["store_prompt_embeds"] is True and manifest["prompt_embeds"]["dtype"] == "float16"
    assert manifest["prompt_embeds"]["columns"] == {k: list(v.shape[1:]) for k, v in expected.items()}
    assert set(ds.column_names) == {"index", "seed", "prompt", "noise", "target", *expected}
    for key, value in expected.items():
        assert getattr(ds.features[key], "feature", ds.features[key]).dtype == "float16"  # as stored (read as float32)
        torch.testing.assert_close(rows[key], value.half().float())


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "guidance_scale must be a finite number, got nan"),
        ("inf", "guidance_scale must be a finite number, got inf"),
        ("-5", "guidance_scale must not be negative, got -5.0"),
    ],
)
def test_guidance_scale_must_be_finite_and_not_negative(sd15_teacher, prompt_file, tmp_path, capsys, value, message):
    """Refused before anything is written (diffusers takes NaN as CFG off): the corrected run then starts cleanly."""
    out = tmp_path / "pairs"
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out, "--guidance_scale", value), capsys)
    assert code == 2 and message in _one_error_line(err) and not out.exists()


def test_a_run_that_wrote_no_shard_does_not_block_the_next(sd15_teacher, prompt_file, tmp_path, capsys, monkeypatch):
    """A teacher that overflows in float32 is named as such (not 'try float32'); the manifest its run left binds
    nothing."""
    import teachers

    real = teachers.solve_ode
    monkeypatch.setattr(teachers, "solve_ode", lambda *a, **k: real(*a, **k) * float("inf"))
    out = tmp_path / "pairs"
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out, "--guidance_scale", "9"), capsys)
    line = _one_error_line(err)
    assert (
        code == 2
        and "although it runs in float32 (guidance_scale 9)" in line
        and "try teacher_dtype float32" not in line
    )
    assert (out / "manifest.json").is_file()
    monkeypatch.setattr(teachers, "solve_ode", real)
    assert (
        run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out, "--guidance_scale", "4"), capsys)[0] == 0
    )
    assert json.loads((out / "manifest.json").read_text())["config"]["guidance_scale"] == 4.0


def test_a_full_disk_is_one_line_and_the_config_record_is_rewritten(
    sd15_teacher, prompt_file, tmp_path, capsys, monkeypatch
):
    import errno

    from data_gen import pairs as pairs_io

    out = tmp_path / "pairs"
    real, written = pairs_io.write_shard, []

    def full_after_one(path, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real(path, **kwargs)

    monkeypatch.setattr(pairs_io, "write_shard", full_after_one)
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)
    line = _one_error_line(err)
    assert (
        code == 2
        and line.startswith(f"error: no space left in {out}, need ≈ ")
        and "for the 2 pairs still to write" in line
    )
    assert "the 1 finished shard(s) are kept and the same command resumes" in line
    (out / "generate_pairs.yaml").write_text("")  # as an older version left it when the disk filled during its write
    monkeypatch.setattr(pairs_io, "write_shard", real)
    code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)
    assert code == 0, err
    record = (out / "generate_pairs.yaml").read_text()
    assert "num_pairs: 4" in record and "shard_size: 2" in record
    assert sorted(load_pairs(out)["index"]) == [0, 1, 2, 3]
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # a rerun of finished pairs: no "0.00 pairs/s", no empty bar
        code, err = run_script("generate_pairs.py", _gen(sd15_teacher, prompt_file, out), capsys)
    assert code == 0 and "nothing left to solve" in stdout.getvalue() and "pairs/s" not in stdout.getvalue()
    assert "pairs (rank 0" not in err


def test_a_long_prompt_is_warned_about_once_and_the_stage_shows_one_bar(sd15_teacher, tmp_path):
    """CLIP's truncation warning quotes the cut-off text of every batch (130 KB of log for a 10,000-character prompt):
    said once, shortened; no library loading bars, the stage's own bar with its rate, its start and end on stdout."""
    prompts = tmp_path / "long.txt"
    prompts.write_text("a cat " + "and a very long description " * 360 + "\nshort\n")
    out = tmp_path / "pairs"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "distill" / "generate_pairs.py"),
            *map(str, _gen(sd15_teacher, prompts, out)),
            "--batch_size",
            "1",
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("was truncated") == 1 and "(said once" in run.stderr and len(run.stderr) < 6000, len(
        run.stderr
    )
    assert "Loading pipeline components" not in run.stderr and "pair/s" in run.stderr
    assert run.stdout.startswith("pairs: 4 to solve") and "pairs/s on rank 0" in run.stdout
