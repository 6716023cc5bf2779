"""The Diffusion2GAN discriminator: the teacher's UNet re-used as a conditional multi-scale D (§3.3).

- conditioning: text through the UNet's own cross-attention (and SDXL's added embeddings); the
  pair's noise ``z`` through a zero-initialised conv added after ``conv_in`` ("z-conditioning");
- multi-scale input: the latent resized to every down block's resolution, added through
  zero-initialised convs, so at initialisation the backbone computes exactly the teacher's features;
- multi-scale output: small real/fake heads at every decoder scale, on the features before the
  up block, on its skip connection, and after it, plus one on the UNet's final output.

The UNet's sub-modules are called directly; ``UNet2DConditionModel.forward`` is neither copied nor
patched. The backbone is a deep copy: the teacher itself stays frozen. Layers that no head reads (the
output convs without ``final``, the last up block without ``after``, ...) are dropped from the copy:
DDP without ``find_unused_parameters`` fails on parameters that get no gradient, and they cost memory.
Or the backbone is a shared frozen base (``students/lora.py``: the LoRA student's, or the teacher's UNet held once for
a GAN student's D): D then trains its ``disc`` LoRA adapter on it, with its heads and zero convs, and holds none of
the base's weights as its own.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from students.lora import DISC_ADAPTER, DISC_LORA_TARGETS, AdapterTensors, SharedBase


def _zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _Head(nn.Module):
    """Patch real/fake logits from one feature map: conv3x3 -> SiLU -> conv1x1 -> [N,1,h,w]."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        hidden = max(channels // 2, 8)
        self.net = nn.Sequential(
            nn.GroupNorm(min(groups, channels) if channels % min(groups, channels) == 0 else 1, channels),
            nn.SiLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _enabled_sdpa_backends() -> list[SDPBackend]:
    flags = torch.backends.cuda
    return [
        b
        for b, on in (
            (SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
            (SDPBackend.CUDNN_ATTENTION, flags.cudnn_sdp_enabled()),
            (SDPBackend.MATH, flags.math_sdp_enabled()),
        )
        if on
    ]


class _SdpaKernels:
    """``sdpa_kernel(backends)`` that can be entered again (checkpoint reuses its recompute context: R1 recomputes
    twice)."""

    def __init__(self, backends: list[SDPBackend]):
        self.backends, self.open = backends, []

    def __enter__(self):
        self.open.append(sdpa_kernel(self.backends))
        return self.open[-1].__enter__()

    def __exit__(self, *exc):
        return self.open.pop().__exit__(*exc)


def _checkpoint_keeping_sdpa(module, *args):
    """diffusers' checkpointing (non-reentrant), but the recompute runs under the attention kernels the forward had:
    R1's forward picks the math kernel (the fused ones have no double backward) and the recompute, in the outer
    backward, would otherwise use another kernel, whose saved tensors differ (torch raises CheckpointError)."""
    backends = _enabled_sdpa_backends()
    return torch.utils.checkpoint.checkpoint(
        module.__call__,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _SdpaKernels(backends)),
    )


class UNetDiscriminator(nn.Module):
    """``forward(latents, noise, prompt_embeds, added_cond_kwargs=None) -> list of [N,1,h,w] logits``.

    unet: the teacher UNet (copied). timestep: the fixed timestep embedding given to the backbone.
    heads: which decoder features get a head: any of ``before``, ``skip``, ``after`` (+ ``final``).
    copy_backbone: False uses ``unet`` itself as the backbone; the layers no head reads are then frozen
    (``requires_grad`` False) and skipped instead of dropped.
    noise_condition: False for training without pairs (from scratch): no z-conditioning conv; pass ``noise=None``.
    shared_base: a :class:`students.lora.SharedBase` whose frozen UNet is the backbone (``unet`` is ignored), trained
    through a LoRA adapter of ``lora_rank`` (named ``disc``) on its attention projections: the module's parameters
    are that adapter (the layers some head reads) and its own heads and convs, never the base's weights. Its forward
    activates the adapter (and, with the base held in bf16, runs under bf16 autocast).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *,
        timestep: int = 0,
        heads: tuple[str, ...] = ("before", "skip", "after", "final"),
        copy_backbone: bool = True,
        noise_condition: bool = True,
        shared_base: SharedBase | None = None,
        lora_rank: int = 0,
    ):
        super().__init__()
        unknown = set(heads) - {"before", "skip", "after", "final"}
        if unknown:
            raise ValueError(f"unknown discriminator heads {sorted(unknown)}; choose from before, skip, after, final")
        if not heads:
            raise ValueError("no discriminator heads given; choose some of before, skip, after, final")
        self._shared = shared_base  # a plain attribute: the base is no submodule (its weights are not D's parameters)
        if shared_base is None:
            self.unet = copy.deepcopy(unet) if copy_backbone else unet
            self.unet.requires_grad_(True)
        elif lora_rank <= 0:
            raise ValueError(
                "a discriminator on a shared frozen base trains through LoRA: lora_rank must be positive, got "
                f"{lora_rank}"
            )
        self.timestep = int(timestep)
        self.head_kinds = tuple(heads)
        cfg = self.unet.config
        c_lat = cfg.in_channels
        chans = list(cfg.block_out_channels)
        groups = cfg.norm_num_groups or 32
        self.noise_conv = _zero_conv(c_lat, chans[0]) if noise_condition else None
        # Block 0 sees the latent through conv_in already; block i >= 1 gets the latent resized to its
        # input, whose channels are block i-1's output channels. input_convs[i - 1] serves block i.
        self.input_convs = nn.ModuleList(_zero_conv(c_lat, chans[i - 1]) for i in range(1, len(chans)))
        self.heads = nn.ModuleDict()
        rev = list(reversed(chans))
        for i, up in enumerate(self.unet.up_blocks):
            c_in = rev[max(i - 1, 0)] if i > 0 else chans[-1]
            if "before" in heads:
                self.heads[f"up{i}_before"] = _Head(c_in, groups)
            if "skip" in heads:
                self.heads[f"up{i}_skip"] = _Head(self._skip_channels(i), groups)
            if "after" in heads:
                self.heads[f"up{i}_after"] = _Head(rev[i], groups)
        if "final" in heads:
            self.heads["final"] = _Head(cfg.out_channels, 1)
        unused = self._prune(set(heads), drop=copy_backbone and shared_base is None, freeze=shared_base is None)
        self.adapter = None
        if shared_base is not None:
            params = shared_base.add_adapter(DISC_ADAPTER, rank=lora_rank, targets=DISC_LORA_TARGETS)
            # The adapter's tensors in layers no head reads get no gradient: kept out of D (and out of DDP), frozen.
            idle = {id(p) for module in unused for p in module.parameters()}
            for p in params.values():
                if id(p) in idle:
                    p.requires_grad_(False)
            self.adapter = AdapterTensors(
                shared_base, DISC_ADAPTER, {n: p for n, p in params.items() if id(p) not in idle}
            )

    def __getattr__(self, name: str):
        if name == "unet" and self.__dict__.get("_shared") is not None:
            return self.__dict__["_shared"].unet  # the shared base, not registered as a submodule
        return super().__getattr__(name)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's blocks in the backward (they check their own flag, so D's direct calls reach it). On
        a shared base only D's forwards are checkpointed, each block recomputed under D's adapter and attention
        kernels."""
        if self._shared is not None:
            self._shared.checkpoint_role(DISC_ADAPTER, recompute_context=lambda: _SdpaKernels(_enabled_sdpa_backends()))
            return
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_keeping_sdpa)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return (
            self._shared.is_checkpointed(DISC_ADAPTER)
            if self._shared is not None
            else self.unet.is_gradient_checkpointing
        )

    def _prune(self, kinds: set[str], *, drop: bool, freeze: bool = True) -> list[nn.Module]:
        """Decide how far the decoder runs for these heads; drop (or freeze) the layers beyond that; returns them
        (empty when dropped). ``freeze`` False leaves them as they are (a shared base: frozen already, and other roles
        run them).

        ``before`` of up block i reads its input (blocks < i run), ``after`` its output (blocks <= i),
        ``skip`` only the encoder's skips (no decoder block needed), ``final`` the UNet's output.
        """
        unet = self.unet
        n_up = len(unet.up_blocks)
        self._up_resnets = [len(block.resnets) for block in unet.up_blocks]  # skips each up block consumes
        self._run_out = "final" in kinds
        self._n_up = n_up if kinds & {"after", "final"} else (n_up - 1 if "before" in kinds else 0)
        self._run_mid = bool(kinds & {"before", "after", "final"})
        unused = [unet.up_blocks[i] for i in range(self._n_up, n_up)]
        if not self._run_mid and unet.mid_block is not None:
            unused.append(unet.mid_block)
        if not self._run_out:
            unused += [m for m in (unet.conv_norm_out, unet.conv_out) if m is not None]
        if not drop:
            for module in unused if freeze else ():
                module.requires_grad_(False)
            return unused
        del unet.up_blocks[self._n_up :]
        if not self._run_mid:
            unet.mid_block = None
        if not self._run_out:
            unet.conv_norm_out = unet.conv_act = unet.conv_out = None
        return []

    def _skip_channels(self, up_index: int) -> int:
        # The first skip an up block consumes (popped from the end) is the deepest of its level.
        chans = list(self.unet.config.block_out_channels)
        n_down = len(chans)
        level = n_down - 1 - up_index
        return chans[level]

    def _embeddings(self, latents: torch.Tensor, prompt_embeds, added_cond_kwargs):
        unet = self.unet
        t = torch.full((latents.shape[0],), self.timestep, device=latents.device, dtype=torch.long)
        emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=t))
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs or {}
        )
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb

    def forward(
        self,
        latents: torch.Tensor,  # [N,C,H,W] real (teacher target) or fake (student output)
        noise: torch.Tensor | None,  # [N,C,H,W] the pair's noise (the condition); None without noise_condition
        prompt_embeds: torch.Tensor,  # [N,L,D]
        added_cond_kwargs: dict | None = None,
        return_features: bool = False,
    ):
        shared = self._shared
        if shared is None:
            return self._forward(latents, noise, prompt_embeds, added_cond_kwargs, return_features)
        shared.activate(DISC_ADAPTER)
        # A base held in bf16 runs under autocast (R1 turns autocast off for an fp32 D: bf16 weights cannot run in
        # fp32).
        low = shared.dtype != torch.float32 and not torch.is_autocast_enabled(latents.device.type)
        with torch.autocast(latents.device.type, dtype=shared.dtype) if low else contextlib.nullcontext():
            return self._forward(latents, noise, prompt_embeds, added_cond_kwargs, return_features)

    def _forward(self, latents, noise, prompt_embeds, added_cond_kwargs, return_features):
        unet = self.unet
        emb = self._embeddings(latents, prompt_embeds, added_cond_kwargs)
        ctx = prompt_embeds
        h = unet.conv_in(latents)
        if self.noise_conv is not None:
            h = h + self.noise_conv(noise)
        skips = [h]
        for i, block in enumerate(unet.down_blocks):
            if i > 0:  # resized copy of the latent into every down block
                h = h + self.input_convs[i - 1](
                    F.interpolate(latents, size=h.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
                )
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=ctx)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        if self._run_mid and unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
            else:
                h = unet.mid_block(h, emb)
        logits = []
        for i, n_res in enumerate(self._up_resnets):
            res = tuple(skips[-n_res:])
            skips = skips[:-n_res]
            if f"up{i}_before" in self.heads:
                logits.append(self.heads[f"up{i}_before"](h))
            if f"up{i}_skip" in self.heads:
                logits.append(self.heads[f"up{i}_skip"](res[-1]))
            if i >= self._n_up:
                continue  # only skip heads remain: they read the encoder's skips
            block = unet.up_blocks[i]
            upsample_size = skips[-1].shape[2:] if skips else None
            if getattr(block, "has_cross_attention", False):
                h = block(
                    hidden_states=h,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=ctx,
                    upsample_size=upsample_size,
                )
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
            if f"up{i}_after" in self.heads:
                logits.append(self.heads[f"up{i}_after"](h))
        if not self._run_out:
            if return_features:
                raise ValueError("return_features needs the UNet's output layers: add the 'final' head")
            return logits
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        out = unet.conv_out(h)
        logits.append(self.heads["final"](out))
        return (logits, out) if return_features else logits
