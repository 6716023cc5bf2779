"""E-LatentLPIPS (Diffusion2GAN Sec. 3.2): metric properties, shared augmentation, determinism, weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from distill.losses import (
    PUBLISHED,
    ELatentLPIPS,
    LatentLPIPSNet,
    PixelLPIPS,
    SharedAugment,
    fetch_published,
    load_latent_lpips,
    load_reference_checkpoint,
    parse_policy,
)
from distill.losses import elatentlpips as elp_mod

TINY = dict(stage_channels=(8, 16, 16, 32, 32))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: threading only adds overhead, and the CI box is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return net


def tiny_net(channels: int = 4, seed: int = 0) -> LatentLPIPSNet:
    torch.manual_seed(seed)
    net = _randomize_bn(LatentLPIPSNet(latent_channels=channels, **TINY), seed)
    with torch.no_grad():  # calibrated-looking heads: non-negative, unequal
        for h in net.heads:
            h.weight.uniform_(0.0, 1.0)
    return net.eval()


def latents(n=3, c=4, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, hw, hw, generator=g)


@pytest.fixture(params=[None, "bgco"], ids=["no-aug", "aug-bgco"])
def loss(request):
    return ELatentLPIPS(tiny_net(), augment=request.param, l1_weight=1.0)


# ------------------------------------------------------------------------------------ metric properties


def test_identity_is_zero(loss):
    x = latents()
    d = loss(x, x.clone(), generator=torch.Generator().manual_seed(0))
    assert d.shape == (3,)
    assert torch.all(d.abs() < 1e-6), d


def test_positive_for_different_inputs(loss):
    d = loss(latents(seed=0), latents(seed=1), generator=torch.Generator().manual_seed(0))
    assert torch.all(d > 1e-3), d
    # A small perturbation is closer than an unrelated latent.
    x = latents(seed=0)
    near = loss(x, x + 0.05 * latents(seed=2), generator=torch.Generator().manual_seed(0))
    assert torch.all(near < d)


def test_symmetric(loss):
    a, b = latents(seed=0), latents(seed=1)
    dab = loss(a, b, generator=torch.Generator().manual_seed(3))
    dba = loss(b, a, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(dab, dba, rtol=1e-5, atol=1e-6)


def test_l1_term_is_added_on_unaugmented_latents():
    a, b = latents(seed=0), latents(seed=1)
    net = tiny_net()
    without = ELatentLPIPS(net, augment=None, l1_weight=0.0)(a, b)
    with_l1 = ELatentLPIPS(net, augment=None, l1_weight=2.0)(a, b)
    torch.testing.assert_close(with_l1 - without, 2.0 * (a - b).abs().mean(dim=(1, 2, 3)))


def test_gradient_flows_to_prediction_only(loss):
    pred = latents(seed=0).requires_grad_(True)
    target = latents(seed=1)
    loss(pred, target, generator=torch.Generator().manual_seed(0)).mean().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.net.parameters())  # the metric is frozen


def test_optimising_prediction_reduces_distance():
    target = latents(hw=8, seed=1)
    pred = latents(hw=8, seed=0).requires_grad_(True)
    loss = ELatentLPIPS(tiny_net(), augment="bg", l1_weight=1.0)
    opt = torch.optim.Adam([pred], lr=0.05)
    eval_g = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    start = loss(pred, target, generator=eval_g()).mean().item()
    for _ in range(20):
        opt.zero_grad()
        loss(pred, target).mean().backward()
        opt.step()
    assert loss(pred, target, generator=eval_g()).mean().item() < 0.7 * start


def test_network_stays_in_eval_mode_and_bn_frozen():
    loss = ELatentLPIPS(tiny_net(), augment=None)
    stats = loss.net.stages[0][1].running_mean.clone()
    parent = nn.ModuleDict({"loss": loss}).train()
    assert parent.training and not loss.net.training
    loss(latents(seed=0), latents(seed=1))
    torch.testing.assert_close(loss.net.stages[0][1].running_mean, stats)


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected \[N, 4, H, W\]"):
        ELatentLPIPS(tiny_net(), augment=None)(latents(c=16), latents(c=16))


def test_raw_latent_scaling_happens_in_prepare_latents():
    net = tiny_net(channels=16)
    net.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    raw_a, raw_b = latents(c=16, seed=0), latents(c=16, seed=1)
    d_raw = ELatentLPIPS(net, augment=None, raw_latents=True)(raw_a, raw_b)
    scaled = lambda z: (z - 0.0609) * 1.5305  # noqa: E731 - diffusers' SD3 convention
    d_scaled = ELatentLPIPS(net, augment=None)(scaled(raw_a), scaled(raw_b))
    torch.testing.assert_close(d_raw, d_scaled)


# ------------------------------------------------------------------------------------ augmentation


def test_policy_parsing():
    assert parse_policy("bg") == parse_policy("blit,geo") == ("blit", "geo")
    assert parse_policy("geo,cutout") == ("geo", "cutout")
    assert parse_policy("bgco") == ("blit", "geo", "color", "cutout")
    assert parse_policy("cutout,b") == ("blit", "cutout")
    assert parse_policy(None) == parse_policy("none") == ()
    with pytest.raises(ValueError, match="unknown augmentation policy token"):
        parse_policy("geox")


@pytest.mark.parametrize("policy", ["b", "g", "c", "o", "bgco"])
def test_augmentation_identical_on_both_inputs(policy):
    aug = SharedAugment(policy)
    a, b = latents(seed=0), latents(seed=1)
    a1, b1 = aug(a, b, generator=torch.Generator().manual_seed(7))
    b2, a2 = aug(b, a, generator=torch.Generator().manual_seed(7))
    # Same draw -> each input gets the same transform regardless of which argument it is.
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(b1, b2)
    x1, x2 = aug(a, a.clone())
    torch.testing.assert_close(x1, x2)
    assert not torch.allclose(a1, a)  # it did transform something


def test_geometric_transform_is_the_same_map_for_both_inputs():
    # Blit and geometric warps are linear maps that keep constants (reflection padding), so
    # T(a + c) = T(a) + c exactly when the same T is applied to both inputs; different draws break it.
    aug = SharedAugment("bg")
    a = latents(seed=0)
    ta, tb = aug(a, a + 3.0)
    torch.testing.assert_close(tb - ta, torch.full_like(ta, 3.0), atol=1e-4, rtol=0)


def test_blit_rotations_are_exact():
    aug = SharedAugment("b")
    a = latents(n=4, seed=0)
    params = aug.sample(a.shape)
    params[0]["batch_prob"] = torch.zeros(4)  # no flip
    params[1]["times"] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    params[2]["translate_x"] = torch.zeros(4)
    params[2]["translate_y"] = torch.zeros(4)
    out = aug.apply(a, params)
    for k in range(4):
        assert any(torch.equal(out[k], torch.rot90(a[k], r, dims=(1, 2))) for r in range(4))
        assert not torch.equal(out[k], a[k]) or k == 0


def test_augmentation_is_differentiable_for_every_family():
    a = latents(seed=0).requires_grad_(True)
    x, _ = SharedAugment("bgco")(a, latents(seed=1))
    x.square().sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ determinism


def test_deterministic_with_generator_and_global_rng_untouched():
    loss = ELatentLPIPS(tiny_net(), augment="bgco")
    a, b = latents(seed=0), latents(seed=1)
    state = torch.get_rng_state()
    d1 = loss(a, b, generator=torch.Generator().manual_seed(42))
    d2 = loss(a, b, generator=torch.Generator().manual_seed(42))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(d1, d2)
    d3 = loss(a, b, generator=torch.Generator().manual_seed(43))
    assert not torch.equal(d1, d3)  # the ensemble really draws a new augmentation per seed


def test_deterministic_without_augmentation():
    loss = ELatentLPIPS(tiny_net(), augment=None)
    a, b = latents(seed=0), latents(seed=1)
    assert torch.equal(loss(a, b), loss(a, b))


def test_random_without_generator():
    loss = ELatentLPIPS(tiny_net(), augment="bg")
    a, b = latents(seed=0), latents(seed=1)
    values = {tuple(loss(a, b).tolist()) for _ in range(3)}
    assert len(values) > 1


# ------------------------------------------------------------------------------------ weights


def test_save_pretrained_round_trip(tmp_path):
    net = tiny_net(channels=16)
    net.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_latent_lpips(tmp_path / "m")
    assert loaded.config.latent_channels == 16 and tuple(loaded.config.stage_channels) == TINY["stage_channels"]
    a, b = latents(c=16, seed=0), latents(c=16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), net(a, b), rtol=0, atol=0)
    assert not loaded.training


def _reference_layout(channels: int, seed: int = 0):
    """A fake published checkpoint: torchvision VGG16-BN with a latent first conv and the first three
    pools removed, cut into five slices at features[0:7, 7:14, 14:24, 24:34, 34:44], heads lin{k}."""
    torch.manual_seed(seed)
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)  # vgg16_bn.features
    feats[0] = nn.Conv2d(channels, 64, 3, padding=1)
    for i in [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)][:3]:
        feats[i] = nn.Identity()
    _randomize_bn(feats, seed)
    cuts = [(0, 7), (7, 14), (14, 24), (24, 34), (34, 44)]
    slices = [nn.Sequential(*[feats[i] for i in range(s, e)]) for s, e in cuts]
    heads = [torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    state = {}
    for k, (s, e) in enumerate(cuts):
        for name, t in slices[k].state_dict().items():
            idx, rest = name.split(".", 1)
            state[f"net.slice{k + 1}.{s + int(idx)}.{rest}"] = t.clone()
    for k, w in enumerate(heads):
        state[f"lin{k}.model.1.weight"] = w
        state[f"lins.{k}.model.1.weight"] = w
    return state, slices, heads


def _reference_distance(x, y, slices, heads, l1=True):
    # The LPIPS formula as the published package computes it (separate trunk passes, eps in sqrt).
    def norm(f):
        return f / torch.sqrt((f * f).sum(dim=1, keepdim=True) + 1e-8)

    d = 0
    hx, hy = x, y
    for sl, w in zip(slices, heads):
        hx, hy = sl.eval()(hx), sl.eval()(hy)
        d = d + nn.functional.conv2d((norm(hx) - norm(hy)) ** 2, w).mean(dim=(1, 2, 3))
    if l1:
        d = d + (x - y).abs().mean(dim=(1, 2, 3))
    return d


@pytest.mark.parametrize("name,channels", [("sd15", 4), ("flux", 16)])
def test_load_fake_reference_checkpoint_from_local_path(tmp_path, name, channels):
    state, slices, heads = _reference_layout(channels)
    path = tmp_path / f"{name}_latest_vgg16_tuned.pth"
    torch.save(state, path)
    loss = ELatentLPIPS.from_pretrained(path, augment=None, l1_weight=1.0)
    assert loss.net.config.latent_channels == channels
    assert loss.net.config.scaling_factor == PUBLISHED[name][1]
    x, y = latents(n=2, c=channels, hw=16, seed=0), latents(n=2, c=channels, hw=16, seed=1)
    with torch.no_grad():
        ours = loss(x, y)
        ref = _reference_distance(x, y, slices, heads)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # ... and it survives our own safetensors format.
    loss.net.save_pretrained(tmp_path / "converted")
    again = ELatentLPIPS.from_pretrained(tmp_path / "converted", augment=None)
    with torch.no_grad():
        torch.testing.assert_close(again(x, y), ours)


def test_load_trunk_only_classifier_checkpoint(tmp_path):
    state, slices, _ = _reference_layout(4)
    trunk = {}
    for k, v in state.items():
        if k.startswith("net.slice"):
            idx_rest = k.split(".", 2)[2]
            trunk[f"module.model.features.{idx_rest}"] = v
    trunk["module.model.classifier.0.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": trunk, "best_acc1": 68.3, "epoch": 90}, tmp_path / "sd15_latent_vgg16.pth.tar")
    net = load_reference_checkpoint(tmp_path / "sd15_latent_vgg16.pth.tar")
    x = latents(n=2, seed=0)
    feats = net.features(x)
    h = x
    for sl, f in zip(slices, feats):
        h = sl.eval()(h)
        torch.testing.assert_close(f, h)
    assert all(torch.equal(hd.weight, torch.ones_like(hd.weight)) for hd in net.heads)  # uncalibrated


def test_bad_checkpoint_keys_are_rejected(tmp_path):
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="unexpected key"):
        load_reference_checkpoint(tmp_path / "x.pth")


def test_published_name_not_cached_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="download=True"):
        fetch_published("sd15", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="published"):
        fetch_published("sd99", cache_dir=tmp_path)


@pytest.mark.parametrize("main", [True, False])
def test_only_main_process_downloads(tmp_path, monkeypatch, main):
    import huggingface_hub

    calls = []
    order = []

    def fake_download(repo_id, filename, cache_dir=None, local_files_only=False):
        calls.append(local_files_only)
        order.append("download" if not local_files_only else "read")
        assert repo_id == elp_mod.PUBLISHED_REPO and filename == "elatentlpips_ckpt/sd3_latest_vgg16_tuned.pth"
        return str(tmp_path / "cache" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = fetch_published(
        "sd3", download=True, cache_dir=tmp_path, is_main_process=lambda: main, barrier=lambda: order.append("barrier")
    )
    assert path.name == "sd3_latest_vgg16_tuned.pth"
    assert order == (["download", "barrier"] if main else ["barrier", "read"])


# ------------------------------------------------------------------------------------ pixel path


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.18215,
    )


def test_pixel_lpips_path():
    import lpips

    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    loss = PixelLPIPS(tiny_vae(), lpips_net=net)
    x = latents(n=2, hw=16, seed=0).requires_grad_(True)
    y = latents(n=2, hw=16, seed=1)
    d = loss(x, y)
    assert d.shape == (2,) and torch.all(d > 0)
    assert torch.all(loss(x, x.detach()).abs() < 1e-6)
    d.sum().backward()
    assert x.grad.abs().sum() > 0


def test_published_name_loads_through_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    state, slices, heads = _reference_layout(4)
    cached = tmp_path / "hub" / "sdxl_latest_vgg16_tuned.pth"
    cached.parent.mkdir()
    torch.save(state, cached)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(cached))
    loss = ELatentLPIPS.from_pretrained("sdxl", augment=None, l1_weight=0.0, cache_dir=tmp_path / "hub")
    assert loss.net.config.scaling_factor == PUBLISHED["sdxl"][1]
    x, y = latents(n=2, seed=0), latents(n=2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loss(x, y), _reference_distance(x, y, slices, heads, l1=False), rtol=1e-5, atol=1e-6)


def test_pixel_lpips_without_pretrained_trunk_offline_is_a_clear_error(monkeypatch):
    from urllib.error import URLError

    import torch.hub
    import torchvision.models._api as tv_api

    from distill.losses import build_pixel_lpips

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(OSError, match="pretrained_trunk=False"):
        build_pixel_lpips(net="alex", pretrained_trunk=True)


def test_ensemble_metric_is_reproducible_and_less_noisy():
    loss = ELatentLPIPS(tiny_net(), augment="bg", l1_weight=0.0)
    a, b = latents(n=2, hw=8, seed=0), latents(n=2, hw=8, seed=1)
    with torch.no_grad():
        assert torch.equal(loss.ensemble(a, b, draws=4, seed=5), loss.ensemble(a, b, draws=4, seed=5))
        single = torch.stack([loss(a, b, generator=torch.Generator().manual_seed(s)) for s in range(8)])
        averaged = torch.stack([loss.ensemble(a, b, draws=8, seed=s) for s in range(8)])
    assert (averaged.std(dim=0) < single.std(dim=0)).all()
