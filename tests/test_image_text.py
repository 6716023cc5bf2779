"""Image–caption data for from-scratch GAN training: sources, preprocessing, latent cache, sharding and resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_script
from data_gen.image_text import StreamCursor, image_transform, open_image_text, read_rows
from distill.training.scratch_data import RealData


def make_imagefolder(path, n=12, *, size=(24, 20), captions="list"):
    """``n`` distinct images (colour i) with captions naming their index: a list of two, or one string."""
    from PIL import Image

    path.mkdir(parents=True)
    with open(path / "metadata.jsonl", "w") as fh:
        for i in range(n):
            Image.new("RGB", size, (10 * i, 255 - 10 * i, 0)).save(path / f"{i:03d}.png")
            text = [f"image {i}", f"picture {i}"] if captions == "list" else f"image {i}"
            fh.write(json.dumps({"file_name": f"{i:03d}.png", "text": text}) + "\n")
    return path


def _index(caption: str) -> int:
    return int(caption.split()[-1])


def _data(source, *, rank=0, world=1, batch_size=3, streaming=False, resolution=8, num_workers=0, **kwargs):
    return RealData(dataset=str(source), split="train", image_column="image", caption_column="text", streaming=streaming,
                    config_name=None, resolution=resolution, batch_size=batch_size, seed=0, rank=rank, world=world, num_workers=num_workers,
                    latent_sampling="mode", encode=lambda captions: None, to_samples=lambda x, **k: x, device="cpu",
                    gather=lambda objs: objs, **kwargs)


def test_imagefolder_rows_are_centre_cropped_and_captioned(tmp_path):
    folder = make_imagefolder(tmp_path / "data")
    ds = open_image_text(str(folder), caption_column="text")
    images, captions = read_rows(ds, [0, 5], image_column="image", caption_column="text", transform=image_transform(8),
                                 generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images[1, 0], torch.full((8, 8), 50 / 127.5 - 1), atol=0.02, rtol=0)  # red = 10 * 5
    assert [_index(c) for c in captions] == [0, 5] and captions[0] in ("image 0", "picture 0")
    many = [read_rows(ds, [3], image_column="image", caption_column="text", transform=image_transform(8),
                      generator=torch.Generator().manual_seed(s))[1][0] for s in range(8)]
    assert set(many) == {"image 3", "picture 3"}  # a list cell: one of its captions per use


def test_map_style_data_resumes_mid_epoch_and_shards_disjointly(tmp_path):
    folder = make_imagefolder(tmp_path / "data", n=12)
    # One process, 4 micro-batches of 3 = one epoch: every row once.
    straight = [[_index(c) for c in _data(folder).batch(m).captions] for m in range(8)]
    assert sorted(sum(straight[:4], [])) == list(range(12)) and sorted(sum(straight[4:], [])) == list(range(12))
    # Resumed at micro-batch 2 (a new process, mid-epoch): the same rows as the uninterrupted run, none repeated.
    resumed = _data(folder)
    resumed.start(2)
    assert [[_index(c) for c in resumed.batch(m).captions] for m in range(2, 8)] == straight[2:]
    # Two processes: disjoint rows, together one epoch every 2 micro-batches.
    ranks = [[_index(c) for m in range(2) for c in _data(folder, rank=r, world=2).batch(m).captions] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(12))
    # DataLoader workers prefetch the same batches.
    workers = _data(folder, num_workers=2)
    workers.start(1)
    assert [[_index(c) for c in workers.batch(m).captions] for m in range(1, 4)] == straight[1:4]


def test_streaming_cursor_resumes_without_repeats_and_splits_by_rank(tmp_path):
    import datasets

    rows = {"image": [None] * 10, "text": [f"image {i}" for i in range(10)]}
    stream = datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=2)
    cursor = StreamCursor(stream, rank=0, world=1)
    first = [_index(r["text"]) for r in cursor.take(4)]
    state = json.loads(json.dumps(cursor.state_dict()))  # survives a checkpoint round trip
    rest = [_index(r["text"]) for r in cursor.take(8)]
    again = StreamCursor(datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=2), rank=0, world=1)
    again.load_state_dict(state)
    assert [_index(r["text"]) for r in again.take(8)] == rest
    assert sorted(first + rest[:6]) == list(range(10)) and cursor.epoch == 1  # one full pass, then the next one
    split = [[_index(r["text"]) for r in StreamCursor(stream, rank=r, world=2).take(5)] for r in range(2)]
    assert sorted(split[0] + split[1]) == list(range(10))


def test_latent_cache_round_trip(tmp_path, sd15_teacher, capsys):
    folder = make_imagefolder(tmp_path / "data", n=5, size=(32, 32), captions="string")
    cache = tmp_path / "cache"
    args = ["--dataset", folder, "--vae", sd15_teacher, "--resolution", 16, "--shard_size", 2, "--output_dir", cache]
    code, err = run_script("cache_latents.py", args, capsys)
    assert code == 0, err
    manifest = json.loads((cache / "latent_cache.json").read_text())
    assert manifest["num_shards"] == 3 and manifest["latent_shape"] == [4, 8, 8] and manifest["resolution"] == 16
    ds = open_image_text(str(cache))
    assert ds.column_names == ["index", "latents", "caption"] and ds["index"] == list(range(5))
    from diffusers import AutoencoderKL

    from distill.training.scratch_setup import ScratchParts

    vae = AutoencoderKL.from_pretrained(sd15_teacher, subfolder="vae")
    parts = ScratchParts(text={}, vae=vae, generator=None, discriminator=None, clip_guidance=None, resolution=16)
    images, _ = read_rows(open_image_text(str(folder)), [3], image_column="image", caption_column="text",
                          transform=image_transform(16), generator=None)
    expected = parts.to_samples(images, sampling="mode", generator=None)
    batch = _data(cache, batch_size=5, resolution=16, vae_config=vae.config).batch(0)
    row = [_index(c) for c in batch.captions].index(3)
    torch.testing.assert_close(batch.samples[row], expected[0], atol=2e-3, rtol=1e-2)  # stored as float16
    # Re-running is a no-op; other settings into the same folder are refused; a cache at another resolution too.
    assert run_script("cache_latents.py", args, capsys)[0] == 0
    code, err = run_script("cache_latents.py", [*args[:-4], "--resolution", 32, *args[-4:]], capsys)
    assert code == 2 and "other settings" in err.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="made at resolution 16"):
        RealData(dataset=str(cache), split="train", image_column="image", caption_column="text", streaming=False, config_name=None,
                 resolution=32, batch_size=1, seed=0, rank=0, world=1, num_workers=0, latent_sampling="mode", encode=None,
                 to_samples=None, device="cpu", gather=None, vae_config=vae.config)


def test_bad_sources_are_one_line(tmp_path):
    folder = make_imagefolder(tmp_path / "data", n=4)
    with pytest.raises(ValueError, match=r"caption column 'caption' is not in dataset .* \(columns: image, text\)"):
        open_image_text(str(folder), caption_column="caption")
    (folder / "002.png").write_bytes(b"not a png")
    ds = open_image_text(str(folder))
    with pytest.raises(ValueError, match=r"image of row 2 \(.*002.png\) cannot be read .*: replace or remove it"):
        read_rows(ds, [1, 2], image_column="image", caption_column="text", transform=image_transform(8), generator=None)
    with pytest.raises(ValueError, match="cannot open dataset"):
        open_image_text(str(tmp_path / "missing"))
