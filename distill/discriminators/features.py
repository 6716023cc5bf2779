"""Frozen pretrained feature networks for the projected discriminator (StyleGAN-T §3.2; Projected GANs,
Sauer et al. 2021): images in [-1, 1] -> token sequences [N, C, L] read at several depths by forward hooks.

``spec`` names the network:

    torchvision:NAME            torchvision.models.get_model(NAME) with its DEFAULT weights (torch hub cache)
    timm:NAME                   timm.create_model(NAME, pretrained=True), e.g. timm:vit_small_patch16_224.dino (the
    paper's DINO ViT-S/16) open_clip:MODEL/TAG         an open_clip model's image tower, e.g.
    open_clip:ViT-B-32/laion2b_s34b_b79k PATH                        a classifier folder saved with save_pretrained
    (config.json naming the class),
                                e.g. teachers/assets/digits-classifier

Nothing is downloaded: weights that are not available locally are a one-line error naming the file and
where to put it (or pass ``weights``, a local file). ``weights="random"`` builds the architecture with
random weights: for tests only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Classifier folders this toolkit can read as feature networks: config ``_class_name`` -> (module, class).
CLASSIFIERS = {"DigitClassifier": ("teachers.digits_classifier", "DigitClassifier")}
# Hooked layers when the caller names none: early to late, as StyleGAN-T spreads its heads over the ViT.
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _vit_layers(blocks: str, depth: int) -> tuple[str, ...]:
    # StyleGAN-T: heads spaced equally between the transformer layers (ViT-S/16: after blocks 2, 5, 8, 11).
    return tuple(f"{blocks}.{i}" for i in range(depth // 4 - 1, depth, depth // 4))


class FeatureNetwork(nn.Module):
    """``forward(images [N,3,H,W] in [-1, 1]) -> [tokens [N,C_i,L_i] per hooked layer]``. Frozen: no parameter
    trains and the network stays in eval mode whatever ``train()`` is called with (its BatchNorm statistics
    must not move). Images are resized to ``resolution`` and normalised with ``mean`` / ``std`` (None: the
    network reads [-1, 1] itself)."""

    def __init__(
        self, net: nn.Module, *, layers: tuple[str, ...], resolution: int, mean=None, std=None, name: str = ""
    ):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name, self.layers, self.resolution = name, tuple(layers), int(resolution)
        modules = dict(net.named_modules())
        missing = [layer for layer in self.layers if layer not in modules]
        if missing:
            raise ValueError(
                f"feature network {name} has no layer(s) {', '.join(missing)}; set d_feature_layers to module "
                f"names such as {', '.join(list(n for n in modules if n)[:8])}, ..."
            )
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            modules[layer].register_forward_hook(self._hook(layer))

    def _hook(self, layer: str):
        def hook(_module, _inputs, output):
            self._out[layer] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(
                x,
                size=(self.resolution, self.resolution),
                mode="bilinear",
                align_corners=False,
                antialias=x.shape[-1] > self.resolution,
            )
        if self.mean is not None:
            x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        self._out = {}
        self.net(x)
        n = images.shape[0]
        return [_tokens(self._out[layer], n) for layer in self.layers]

    @torch.no_grad()
    def shapes(self) -> list[tuple[int, int]]:
        """(channels, tokens) of every hooked layer, probed with one blank image."""
        probe = torch.zeros(1, 3, self.resolution, self.resolution, device=next(self.net.parameters()).device)
        return [(t.shape[1], t.shape[2]) for t in self(probe)]


def _tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """A hooked output -> [N, C, L]: conv maps flattened in raster order, transformer tokens transposed."""
    if x.ndim == 4:  # [N,C,H,W]
        return x.flatten(2)
    if x.ndim == 3:  # [N,L,C] (batch-first transformers)
        return x.transpose(1, 2)
    if x.ndim == 2:  # [N,C] (a pooled / fully connected layer): one token
        return x[:, :, None]
    raise ValueError(f"cannot read a feature tensor of shape {tuple(x.shape)} (batch {n}) as tokens")


def build_feature_network(
    spec: str, *, layers: tuple[str, ...] = (), weights: str = "", resolution: int = 0
) -> FeatureNetwork:
    """The frozen feature network ``spec`` (see the module docstring); ``layers`` overrides the hooked layers,
    ``resolution`` the input side (0: the network's own)."""
    if not spec:
        raise ValueError(
            "no feature network given: set d_feature_network (e.g. timm:vit_small_patch16_224.dino, or a classifier "
            "folder)"
        )
    kind, _, name = (
        spec.partition(":") if spec.split(":", 1)[0] in ("torchvision", "timm", "open_clip") else ("folder", "", spec)
    )
    build = {"torchvision": _torchvision, "timm": _timm, "open_clip": _open_clip, "folder": _classifier_folder}[kind]
    net, default_layers, default_res, mean, std = build(name, weights)
    return FeatureNetwork(
        net, layers=tuple(layers) or default_layers, resolution=resolution or default_res, mean=mean, std=std, name=spec
    )


def _missing(spec: str, file: Path | str, how: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"feature network {spec} needs its weights {file}, which are not available locally: {how} "
        "(or set d_feature_weights to a local weights file)"
    )


def _torchvision(name: str, weights: str):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()") from None
    net = torchvision.models.get_model(name, weights=None)
    if weights != "random":
        file = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        if not file.is_file():
            raise _missing(f"torchvision:{name}", file, f"download {enum.url} to {file}")
        net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    if name.startswith("resnet") or name.startswith("resnext") or name.startswith("wide_resnet"):
        layers = RESNET_LAYERS
    elif name.startswith("vit_"):
        layers = _vit_layers("encoder.layers", len(net.encoder.layers))
        layers = tuple(f"encoder.layers.encoder_layer_{layer.rsplit('.', 1)[1]}" for layer in layers)
    else:
        raise ValueError(f"no default feature layers for torchvision:{name}: set d_feature_layers (module names)")
    resolution = int(getattr(net, "image_size", 0) or 224)
    return net, layers, resolution, IMAGENET_MEAN, IMAGENET_STD


def _timm(name: str, weights: str):
    import timm

    overlay = {}
    if weights and weights != "random":
        if not Path(weights).is_file():
            raise FileNotFoundError(f"d_feature_weights {weights} does not exist: pass a local weights file")
        overlay = {"file": str(weights)}
    elif weights != "random":
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if repo is None:
            raise ValueError(
                f"timm has no pretrained weights named {name!r} on the Hugging Face Hub: pass d_feature_weights"
            )
        found = [try_to_load_from_cache(repo, f) for f in ("model.safetensors", "pytorch_model.bin")]
        file = next((f for f in found if isinstance(f, str)), None)
        if file is None:
            raise _missing(
                f"timm:{name}", f"{repo}/model.safetensors", f"`hf download {repo}` (into the Hugging Face cache)"
            )
        overlay = {"file": file}
    net = timm.create_model(name, pretrained=weights != "random", pretrained_cfg_overlay=overlay or None)
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise ValueError(f"no default feature layers for timm:{name}: set d_feature_layers (module names)")
    cfg = net.pretrained_cfg
    resolution = int(cfg.get("input_size", (3, 224, 224))[-1])
    return (
        net,
        _vit_layers("blocks", len(blocks)),
        resolution,
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
    )


def _open_clip(name: str, weights: str):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from distill.core.pretrained import load_open_clip

    model_name, _, tag = name.partition("/")
    model = load_open_clip(model_name, None if weights == "random" else weights or tag)
    visual = model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(f"no default feature layers for open_clip:{name}: set d_feature_layers (module names)")
    size = visual.image_size
    return (
        visual,
        _vit_layers("transformer.resblocks", len(blocks)),
        int(size[0] if isinstance(size, (tuple, list)) else size),
        OPENAI_DATASET_MEAN,
        OPENAI_DATASET_STD,
    )


def _classifier_folder(path: str, weights: str):
    import importlib

    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"feature network {path!r} is neither torchvision:/timm:/open_clip: nor a classifier folder "
            "with config.json"
        )
    cls_name = json.loads(config.read_text()).get("_class_name")
    if cls_name not in CLASSIFIERS:
        raise ValueError(
            f"{path} holds a {cls_name}, not a classifier this toolkit reads as features ({', '.join(CLASSIFIERS)})"
        )
    module, attr = CLASSIFIERS[cls_name]
    cls = getattr(importlib.import_module(module), attr)
    net = cls.from_config(cls.load_config(path)) if weights == "random" else cls.from_pretrained(path)
    # Every conv stage's activation (DigitClassifier: conv, ReLU, max-pool per stage) and the feature layer.
    relus = [name for name, m in net.convs.named_children() if isinstance(m, nn.ReLU)]
    return (
        net,
        (*(f"convs.{r}" for r in relus), "fc"),
        int(net.config.image_size),
        None,
        None,
    )  # it reads [-1, 1] itself
