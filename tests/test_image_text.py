"""Image–caption data for from-scratch GAN training: sources, preprocessing, latent cache, sharding and resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script

from data_gen.image_text import StreamCursor, check_image_text, image_transform, load_image, open_image_text, read_rows
from distill.scratch.data import RealData


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


MIXED_MODES = ("RGB", "L", "RGBA", "LA", "P", "P+transparency", "I;16", "CMYK", "1", "L+tRNS", "RGB+tRNS", "RGBA")


def make_mixed_imagefolder(path, n=12):
    """A user's folder: ``n`` images of sizes 20x28 .. 40x40 in the modes of :data:`MIXED_MODES` (CMYK as a JPEG, the
    rest PNG; random RGB under the transparent pixels), captions "image I, MODE" in metadata.jsonl (``text``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [
        (20, 28),
        (28, 20),
        (40, 40),
        (24, 36),
        (36, 24),
        (32, 32),
        (20, 20),
        (40, 28),
        (28, 40),
        (33, 21),
        (21, 33),
        (30, 30),
    ]
    path.mkdir(parents=True)
    with open(path / "metadata.jsonl", "w") as fh:
        for i in range(n):
            mode, (w, h) = MIXED_MODES[i % len(MIXED_MODES)], sizes[i % len(sizes)]
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            alpha = np.where(rng.random((h, w)) < 0.3, 0, 255).astype(np.uint8)
            name, options = f"{i:03d}.png", {}
            if mode in ("RGBA", "LA"):
                image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
                image = image if mode == "RGBA" else Image.merge("LA", (image.convert("L"), image.getchannel("A")))
            elif mode == "P+transparency":
                image, options = (
                    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
                    {"transparency": 0},
                )
            elif mode in ("L+tRNS", "RGB+tRNS"):
                image = Image.fromarray(rgb).convert(mode[0] if mode[0] == "L" else "RGB")
                options = {"transparency": image.getpixel((0, 0))}  # that colour is transparent
            elif mode == "I;16":
                image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
            elif mode == "CMYK":
                image, name = Image.fromarray(rgb).convert("CMYK"), f"{i:03d}.jpg"
            else:
                image = Image.fromarray(rgb).convert(mode)
            image.save(path / name, **options)
            fh.write(json.dumps({"file_name": name, "text": f"image {i}, {mode}"}) + "\n")
    return path


def _index(caption: str) -> int:
    return int(caption.split()[-1])


def _data(source, *, rank=0, world=1, batch_size=3, streaming=False, resolution=8, num_workers=0, **kwargs):
    return RealData(
        dataset=str(source),
        split="train",
        image_column="image",
        caption_column="text",
        streaming=streaming,
        config_name=None,
        resolution=resolution,
        batch_size=batch_size,
        seed=0,
        rank=rank,
        world=world,
        num_workers=num_workers,
        latent_sampling="mode",
        encode=lambda captions: None,
        to_samples=lambda x, **k: x,
        device="cpu",
        gather=lambda objs: objs,
        **kwargs,
    )


def test_imagefolder_rows_are_centre_cropped_and_captioned(tmp_path):
    folder = make_imagefolder(tmp_path / "data")
    ds = open_image_text(str(folder), caption_column="text")
    images, captions = read_rows(
        ds,
        [0, 5],
        image_column="image",
        caption_column="text",
        transform=image_transform(8),
        generator=torch.Generator().manual_seed(0),
    )
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images[1, 0], torch.full((8, 8), 50 / 127.5 - 1), atol=0.02, rtol=0)  # red = 10 * 5
    assert [_index(c) for c in captions] == [0, 5] and captions[0] in ("image 0", "picture 0")
    many = [
        read_rows(
            ds,
            [3],
            image_column="image",
            caption_column="text",
            transform=image_transform(8),
            generator=torch.Generator().manual_seed(s),
        )[1][0]
        for s in range(8)
    ]
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

    from distill.scratch.setup import ScratchParts

    vae = AutoencoderKL.from_pretrained(sd15_teacher, subfolder="vae")
    parts = ScratchParts(text={}, vae=vae, generator=None, discriminator=None, clip_guidance=None, resolution=16)
    images, _ = read_rows(
        open_image_text(str(folder)),
        [3],
        image_column="image",
        caption_column="text",
        transform=image_transform(16),
        generator=None,
    )
    expected = parts.to_samples(images, sampling="mode", generator=None)
    batch = _data(cache, batch_size=5, resolution=16, vae_config=vae.config).batch(0)
    row = [_index(c) for c in batch.captions].index(3)
    torch.testing.assert_close(batch.samples[row], expected[0], atol=2e-3, rtol=1e-2)  # stored as float16
    # Re-running is a no-op; other settings into the same folder are refused; a cache at another resolution too.
    assert run_script("cache_latents.py", args, capsys)[0] == 0
    code, err = run_script("cache_latents.py", [*args[:-4], "--resolution", 32, *args[-4:]], capsys)
    assert code == 2 and "other settings" in err.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="made at resolution 16"):
        RealData(
            dataset=str(cache),
            split="train",
            image_column="image",
            caption_column="text",
            streaming=False,
            config_name=None,
            resolution=32,
            batch_size=1,
            seed=0,
            rank=0,
            world=1,
            num_workers=0,
            latent_sampling="mode",
            encode=None,
            to_samples=None,
            device="cpu",
            gather=None,
            vae_config=vae.config,
        )


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


def test_every_image_mode_is_read_as_displayed(tmp_path):
    """Transparent pixels are white (not the colour stored under alpha 0), a palette's transparent entry too,
    16-bit greys are scaled (not clipped to white), CMYK is inverted to RGB, the EXIF orientation applied."""
    import numpy as np
    from PIL import Image

    white, garbage = (255, 255, 255), (200, 0, 0)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[0, 0], rgba[0, 1] = garbage, (10, 20, 30, 255), (0, 0, 0, 128)
    palette = Image.new("P", (2, 1))
    palette.putpalette([*garbage, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown 90 degrees clockwise
    cases = {  # file: (image, save options, {(x, y): RGB as shown})
        "rgba.png": (Image.fromarray(rgba, "RGBA"), {}, {(0, 0): (10, 20, 30), (1, 1): white, (1, 0): (127, 127, 127)}),
        "la.png": (
            Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA"),
            {},
            {(0, 0): (50, 50, 50), (1, 0): white},
        ),
        "p-transparent.png": (palette, {"transparency": 0}, {(0, 0): white, (1, 0): (0, 255, 0)}),
        "p.png": (palette, {}, {(0, 0): garbage, (1, 0): (0, 255, 0)}),
        "l-trns.png": (
            Image.fromarray(np.array([[7, 100]], np.uint8)),
            {"transparency": 7},
            {(0, 0): white, (1, 0): (100, 100, 100)},
        ),
        "i16.png": (
            Image.fromarray(np.array([[0, 65535], [32768, 1000]], np.uint16)),
            {},
            {(0, 0): (0, 0, 0), (1, 0): white, (0, 1): (128, 128, 128), (1, 1): (4, 4, 4)},
        ),
        "cmyk.tif": (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), {}, {(0, 0): (255, 0, 0)}),
        "bilevel.png": (Image.new("1", (2, 2), 1), {}, {(0, 0): white}),
        "exif.png": (Image.new("RGB", (4, 2), garbage), {"exif": exif}, {}),
    }
    for name, (image, options, expected) in cases.items():
        image.save(tmp_path / name, **options)
        shown = load_image({"path": str(tmp_path / name), "bytes": None}, where="row 0")
        assert shown.mode == "RGB", name
        for xy, rgb in expected.items():
            assert np.abs(np.subtract(shown.getpixel(xy), rgb)).max() <= 1, (name, xy, shown.getpixel(xy), rgb)
    assert load_image(str(tmp_path / "exif.png"), where="row 0").size == (2, 4)
    assert Image.open(tmp_path / "i16.png").mode == "I;16"  # what PIL opens a 16-bit PNG as


def test_mixed_sizes_and_modes_make_one_batch(tmp_path):
    folder = make_mixed_imagefolder(tmp_path / "mixed")
    ds = open_image_text(str(folder))
    check_image_text(ds, source=str(folder), image_column="image", caption_column="text")
    images, captions = read_rows(
        ds, list(range(12)), image_column="image", caption_column="text", transform=image_transform(16), generator=None
    )
    assert images.shape == (12, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert captions == [f"image {i}, {MIXED_MODES[i]}" for i in range(12)]


def test_bad_rows_are_found_up_front_in_one_line(tmp_path):
    folder = make_imagefolder(tmp_path / "data", n=6, captions="string")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[2], lines[4] = (
        json.dumps({"file_name": "002.png", "text": "  "}),
        json.dumps({"file_name": "004.png"}),
    )  # blank, missing
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError,
        match=r"row 2 \(.*002.png\) has an empty caption in column 'text' \(1 more rows with an empty "
        r"caption\): fill it in or drop the row$",
    ):
        check_image_text(open_image_text(str(folder)), source=str(folder), image_column="image", caption_column="text")
    (folder / "003.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(
        ValueError, match=r"image of row 3 \(.*003.png\) cannot be read .*: replace or remove it$"
    ) as info:
        check_image_text(open_image_text(str(folder)), source=str(folder), image_column="image", caption_column="text")
    assert "\n" not in str(info.value)
    import datasets  # a list cell needs one caption that is not blank; a latent cache (no image column) is checked too

    lists = datasets.Dataset.from_dict({"caption": [["a cat", ""], ["", " "]]})
    with pytest.raises(ValueError, match=r"^dataset cache: row 1 has an empty caption in column 'caption'"):
        check_image_text(lists, source="cache", image_column=None, caption_column="caption")
    # Rows numbered in the whole set when a process checks its share.
    with pytest.raises(ValueError, match=r"row 3 \("):
        check_image_text(
            open_image_text(str(folder)).select(range(3, 6)),
            source=str(folder),
            image_column="image",
            caption_column="text",
            first_row=3,
        )


def test_a_folder_without_captions_says_so(tmp_path):
    folder = make_imagefolder(tmp_path / "data", n=3)
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(
        ValueError, match=r"has images but no captions \(columns: image\): put a metadata.jsonl next to the images"
    ):
        open_image_text(str(folder))


def test_an_image_damaged_past_its_header_is_one_line_from_a_worker(tmp_path):
    folder = make_imagefolder(tmp_path / "data", n=4, size=(16, 16))
    data = (folder / "001.png").read_bytes()
    (folder / "001.png").write_bytes(data[:45])  # the header reads, the pixels do not
    check_image_text(open_image_text(str(folder)), source=str(folder), image_column="image", caption_column="text")
    reader = _data(folder, batch_size=4, num_workers=1)
    reader.start(0)
    with pytest.raises(ValueError) as info:
        reader.batch(0)
    message = str(info.value)
    assert (
        "\n" not in message
        and "001.png) cannot be read" in message
        and "checkpoints written so far are kept" in message
    )
