"""Metric modules with injected (tiny, offline) extractors and models."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.metrics import clip_score, fid, fidelity, latency


class PoolExtractor:
    """An injected extractor: 4x4 average-pooled colours (48-d), no weights at all."""

    input_size = 16
    extractor_id = "test/pool4"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [N,3,16,16] in [0,255]
        return F.adaptive_avg_pool2d(x / 255, 4).flatten(1)


def _images(n: int, seed: int, shift: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, 32, 32, 3))
    return [np.clip(im + shift, 0, 255).astype(np.uint8) for im in base]


@pytest.mark.parametrize("extractor", [PoolExtractor(), fid.RandomTinyExtractor()], ids=["pool", "random-tiny"])
def test_fid_is_zero_against_itself_and_positive_when_shifted(extractor):
    images = _images(96, seed=0)
    feats = fid.extract_features(images, extractor=extractor, batch_size=40)
    ref = fid.FIDStats.from_features(feats, extractor_id=extractor.extractor_id)
    same = fid.fid_from_images(images, ref, extractor=extractor, batch_size=17)  # batching must not matter
    shifted = fid.fid_from_images(_images(96, seed=0, shift=50), ref, extractor=extractor)
    other = fid.fid_from_images(_images(96, seed=1), ref, extractor=extractor)
    assert abs(same) < 1e-6
    assert shifted > 0.01 and shifted > 20 * abs(other)  # a distribution shift, not sampling noise


def test_reference_statistics_are_cached_by_content_and_extractor(tmp_path):
    ref_dir, cache = tmp_path / "ref", tmp_path / "cache"
    (ref_dir / "sub").mkdir(parents=True)
    for i, im in enumerate(_images(12, seed=3)):
        Image.fromarray(im).save(ref_dir / ("sub" if i % 2 else "") / f"{i:03d}.png")
    ext = PoolExtractor()
    a, info_a = fid.reference_statistics(ref_dir, extractor=ext, cache_dir=cache)
    b, info_b = fid.reference_statistics(ref_dir, extractor=ext, cache_dir=cache)
    assert (info_a["source"], info_b["source"], info_a["num_images"]) == ("computed", "cache", 12)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    # Another extractor or a changed image is a different cache entry, never stale numbers.
    _, info_c = fid.reference_statistics(ref_dir, extractor=fid.RandomTinyExtractor(), cache_dir=cache)
    assert info_c["source"] == "computed" and info_c["cache"] != info_a["cache"]
    Image.fromarray(_images(1, seed=9)[0]).save(ref_dir / "000.png")
    d, info_d = fid.reference_statistics(ref_dir, extractor=ext, cache_dir=cache)
    assert info_d["source"] == "computed" and info_d["cache"] != info_a["cache"]
    assert fid.frechet_distance(a, d) > 0
    # A statistics file is used as is; one from another extractor is refused.
    assert fid.reference_statistics(info_a["cache"], extractor=ext, cache_dir=cache)[0].count == 12
    with pytest.raises(ValueError, match="test/pool4"):
        fid.reference_statistics(info_a["cache"], extractor=fid.RandomTinyExtractor(), cache_dir=cache)


def test_file_features_match_in_memory_features_with_workers(tmp_path):
    images = _images(5, seed=4)
    files = []
    for i, im in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(files[-1])
    ext = fid.RandomTinyExtractor()
    a = fid.extract_features(images, extractor=ext, batch_size=2)
    b = fid.extract_features_from_files(files, extractor=ext, batch_size=2, num_workers=2)
    np.testing.assert_array_equal(a, b)


def test_missing_inception_weights_say_what_to_get_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        fid.load_fid_extractor(str(tmp_path))
    msg = str(exc.value)
    assert fid.INCEPTION_URL in msg and str(tmp_path / fid.INCEPTION_FILE) in msg


def test_inception_path_loads_clean_fid_torchscript_from_the_cache_dir(tmp_path, monkeypatch):
    """A stand-in TorchScript file with the real one's interface exercises the loading and resize path offline."""

    class Layers(torch.nn.Module):
        def forward(self, x):
            return F.adaptive_avg_pool2d(x, 8).flatten(1)[:, :2048].repeat(1, 11)[:, :2048]

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    torch.jit.script(Base()).save(str(tmp_path / fid.INCEPTION_FILE))
    monkeypatch.setenv("D2G_METRICS_HOME", str(tmp_path))
    ext = fid.load_fid_extractor("inception")
    assert ext.extractor_id.startswith("clean-fid-inception-v3/") and ext.input_size == 299
    feats = fid.extract_features(_images(3, seed=0), extractor=ext)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64


class ColourClip:
    """A CLIP stand-in that embeds images by mean colour and captions by their colour word."""

    WORDS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).mean(dim=(0, 1))  # [3]

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([next(v for w, v in self.WORDS.items() if w in t) for t in texts])  # [N,3]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def test_clip_score_ranks_matching_captions_above_shuffled():
    m = ColourClip()
    colours = list(m.WORDS.items()) * 2
    images = [np.full((24, 24, 3), np.array(rgb) * 230 + 10, dtype=np.uint8) for _, rgb in colours]
    captions = [f"a photo of a {w} square" for w, _ in colours]
    shuffled = captions[1:] + captions[:1]
    kw = dict(model=m, preprocess=m.preprocess, tokenizer=m.tokenizer, batch_size=3)
    match = clip_score.clip_scores(images, captions, **kw)
    mismatch = clip_score.clip_scores(images, shuffled, **kw)
    assert match.shape == (8,) and torch.all(match > mismatch)
    assert match.mean() > 0.99 > 0.8 > mismatch.mean()


def test_clip_score_runs_with_a_real_open_clip_architecture():
    tiny = clip_score.build_random_tiny_clip()
    images = _images(3, seed=0)
    s = clip_score.clip_scores(
        images, ["a", "b", "c"], model=tiny.model, preprocess=tiny.preprocess, tokenizer=tiny.tokenizer
    )
    again = clip_score.clip_scores(
        images,
        ["a", "b", "c"],
        model=clip_score.build_random_tiny_clip().model,
        preprocess=tiny.preprocess,
        tokenizer=tiny.tokenizer,
    )
    assert s.shape == (3,) and torch.all(s.abs() <= 1) and torch.equal(s, again)


def test_missing_clip_weights_say_what_to_get_and_where(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as exc:
        clip_score.load_clip("ViT-g-14", "laion2b_s34b_b88k", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "laion/CLIP-ViT-g-14-laion2B-s34B-b88K" in msg and "clip_pretrained=" in msg
    assert time.perf_counter() - start < 20  # fails before building the 1.4B-parameter model


def _decode(latents: torch.Tensor) -> torch.Tensor:  # [N,4,h,w] -> [N,3,2h,2w] in [-1,1]
    return torch.tanh(F.interpolate(latents[:, :3], scale_factor=2, mode="nearest"))


def test_fidelity_is_zero_for_identical_latents():
    from distill.losses import ELatentLPIPS, LatentLPIPSNet, build_pixel_lpips

    torch.manual_seed(0)
    latent_lpips = ELatentLPIPS(
        LatentLPIPSNet(latent_channels=4, stage_channels=(8, 8, 8, 8, 8)), augment=None, l1_weight=0.0
    )
    pixel_lpips = build_pixel_lpips(pretrained_trunk=False)
    target = torch.randn(3, 4, 16, 16)  # [N,C,h,w]
    kw = dict(decode=_decode, latent_lpips=latent_lpips, pixel_lpips=pixel_lpips)
    same = fidelity.fidelity_metrics(target.clone(), target, **kw)
    assert set(same) == {"e_latent_lpips", "lpips", "psnr"}
    assert torch.all(same["e_latent_lpips"] == 0) and torch.all(same["lpips"].abs() < 1e-6)
    assert torch.all(same["psnr"] == fidelity.PSNR_CAP_DB)
    diff = fidelity.fidelity_metrics(target + 0.5 * torch.randn_like(target), target, **kw)
    assert torch.all(diff["e_latent_lpips"] > 0) and torch.all(diff["lpips"] > 0)
    assert torch.all(diff["psnr"] < 40) and torch.all(diff["psnr"] > 0)


def test_psnr_matches_its_definition():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.2)  # 0.1 on the [0,1] scale -> MSE 0.01 -> 20 dB
    assert torch.allclose(fidelity.psnr(a, b), torch.tensor([20.0]), atol=1e-4)


def test_latency_excludes_warmup_and_reports_per_image():
    calls = []

    def generate():
        time.sleep(0.4 if not calls else 0.02)  # a slow first call (compilation, allocation)
        calls.append(1)

    r = latency.measure_latency(generate, batch_size=4, warmup=1, iterations=5)
    assert len(calls) == 6 and r.iterations == 5
    assert 0.015 < r.seconds_per_batch < 0.2
    assert r.seconds_per_image == pytest.approx(r.seconds_per_batch / 4)
    assert r.images_per_second == pytest.approx(4 / r.seconds_per_batch)
    assert r.peak_memory_mb > 0 and r.memory_kind == "cpu_max_rss"
    # A fast call is repeated until min_seconds of timing; the median ignores one call slowed by another process.
    calls.clear()

    def fast():
        time.sleep(0.5 if len(calls) == 3 else 0.01)
        calls.append(1)

    r = latency.measure_latency(fast, batch_size=1, warmup=0, iterations=2, min_seconds=0.8)
    assert r.iterations == len(calls) > 20 and r.seconds_per_batch < 0.05
