"""The Diffusion2GAN discriminator transposed to a diffusion transformer (SD3's MMDiT), §3.3.

The UNet discriminator (``unet.py``) re-uses the teacher's UNet with z-conditioning and multi-scale
heads; a DiT has one token grid instead of scales, so here:

- conditioning: text through the transformer's own joint attention (its context tokens) and its pooled
  embedding through the AdaLN modulation, as in the teacher; the pair's noise ``z`` through a
  zero-initialised patch embedding whose tokens are added to the latent's ("z-conditioning"), so at
  initialisation the backbone computes exactly the teacher's features;
- multi-depth output: real/fake heads on the image tokens after blocks at several depths (``early``,
  ``middle``, ``late``, or block indices), each reshaping the tokens back to the patch grid, plus
  optionally ``final`` on the transformer's own output.

The transformer's sub-modules are called directly; ``SD3Transformer2DModel.forward`` is neither copied
nor patched. The backbone is a deep copy (the teacher stays frozen); blocks after the deepest head are
dropped, and the parts of the last kept block that only feed the next block's text tokens (the joint
attention's text output and text feed-forward) are frozen: DDP without ``find_unused_parameters``
fails on parameters that get no gradient.
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from .unet import _Head

NAMED_DEPTHS = ("early", "middle", "late")
# LoRA targets: the joint attention's image (to_*) and text (add_*) projections.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def head_depths(heads: tuple[str, ...], num_layers: int) -> dict[str, int]:
    """``{head name: index of the block whose output it reads}``; ``final`` (the transformer's output) is -1.

    early / middle / late: after block ceil(L/4), ceil(L/2), L (1-based) of L blocks; digits name a block (0-based).
    """
    named = {"early": math.ceil(num_layers / 4) - 1, "middle": math.ceil(num_layers / 2) - 1, "late": num_layers - 1}
    out = {}
    for head in heads:
        if head == "final":
            out[head] = -1
        elif head in named:
            out[head] = named[head]
        elif head.isdigit() and int(head) < num_layers:
            out[f"block{int(head)}"] = int(head)
        else:
            raise ValueError(
                f"unknown transformer discriminator head {head!r}; choose from early, middle, late, final "
                f"or a block index 0..{num_layers - 1}"
            )
    if not out:
        raise ValueError("no discriminator heads given; choose some of early, middle, late, final (or block indices)")
    return out


class TransformerDiscriminator(nn.Module):
    """``forward(latents, noise, prompt_embeds, added_cond_kwargs={"text_embeds": pooled}) -> list of [N,1,h,w]``
    logits (h, w: the patch grid; ``final``: the latent grid).

    transformer: the teacher's ``SD3Transformer2DModel`` (copied). timestep: the fixed timestep given to
    the backbone (0: clean latents, sigma = 0). heads: see :func:`head_depths`. copy_backbone: False uses
    ``transformer`` itself; the layers no head reads are then frozen instead of dropped.
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        *,
        timestep: float = 0.0,
        heads: tuple[str, ...] = NAMED_DEPTHS,
        copy_backbone: bool = True,
    ):
        super().__init__()
        self.transformer = copy.deepcopy(transformer) if copy_backbone else transformer
        self.transformer.requires_grad_(True)
        self.timestep = float(timestep)
        cfg = self.transformer.config
        self.depths = head_depths(tuple(heads), cfg.num_layers)
        dim, patch = self.transformer.inner_dim, cfg.patch_size
        self.noise_embed = nn.Conv2d(cfg.in_channels, dim, patch, stride=patch)  # a second PatchEmbed projection
        nn.init.zeros_(self.noise_embed.weight)
        nn.init.zeros_(self.noise_embed.bias)
        self.heads = nn.ModuleDict(
            {
                name: _Head(cfg.out_channels if depth < 0 else dim, 1 if depth < 0 else 32)
                for name, depth in self.depths.items()
            }
        )
        self._prune(drop=copy_backbone)

    def _prune(self, *, drop: bool) -> None:
        """Keep the blocks up to the deepest head (all of them with ``final``); drop (or freeze) the rest."""
        tr = self.transformer
        self._run_out = -1 in self.depths.values()
        self._n_blocks = len(tr.transformer_blocks) if self._run_out else max(self.depths.values()) + 1
        unused = list(tr.transformer_blocks[self._n_blocks :])
        if not self._run_out:
            unused += [tr.norm_out, tr.proj_out]
        if drop:
            del tr.transformer_blocks[self._n_blocks :]
            if not self._run_out:
                tr.norm_out = tr.proj_out = None
        else:
            for module in unused:
                module.requires_grad_(False)
        self._freeze_text_outputs()

    def _text_output_modules(self) -> list[nn.Module]:
        """The last kept block's modules that only make text tokens for a next block that no longer runs."""
        last = self.transformer.transformer_blocks[self._n_blocks - 1]
        if last.context_pre_only:
            return []  # the transformer's own last block makes no text output
        return [m for m in (last.attn.to_add_out, last.ff_context, last.norm2_context) if m is not None]

    def _freeze_text_outputs(self) -> None:
        for module in self._text_output_modules():
            module.requires_grad_(False)

    def add_lora(self, rank: int) -> None:
        """Train the backbone through LoRA of ``rank`` on its attention projections (the rest frozen; the
        noise embedding and heads stay fully trainable)."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        self._freeze_text_outputs()

    def forward(
        self,
        latents: torch.Tensor,  # [N,C,H,W] real (teacher target) or fake (student output)
        noise: torch.Tensor,  # [N,C,H,W] the pair's noise (the condition)
        prompt_embeds: torch.Tensor,  # [N,L,D]
        added_cond_kwargs: dict | None = None,  # {"text_embeds": [N,P]}
        return_features: bool = False,
    ):
        """Logits of every head; with ``return_features`` also ``{block index: image tokens [N,h*w,D]}`` of the
        head depths (and -1: the transformer's output [N,C,H,W] when ``final`` is among the heads)."""
        tr = self.transformer
        pooled = (added_cond_kwargs or {}).get("text_embeds")
        if pooled is None:
            raise ValueError(
                "the transformer discriminator needs the pooled prompt embedding: added_cond_kwargs={'text_embeds': "
                "[N,P]}"
            )
        n, _, height, width = latents.shape
        patch = tr.config.patch_size
        grid = (height // patch, width // patch)
        x = tr.pos_embed(latents) + self.noise_embed(noise).flatten(2).transpose(1, 2)
        temb = tr.time_text_embed(torch.full((n,), self.timestep, device=latents.device, dtype=torch.float32), pooled)
        ctx = tr.context_embedder(prompt_embeds)
        wanted = {}
        for name, depth in self.depths.items():
            wanted.setdefault(depth, []).append(name)
        logits, features = [], {}
        for i in range(self._n_blocks):
            ctx, x = tr.transformer_blocks[i](hidden_states=x, encoder_hidden_states=ctx, temb=temb)
            if i in wanted:
                features[i] = x
                tokens = x.transpose(1, 2).reshape(n, x.shape[-1], *grid)  # [N,D,h,w]: tokens back on the patch grid
                logits += [self.heads[name](tokens) for name in wanted[i]]
        if self._run_out:
            out = tr.proj_out(tr.norm_out(x, temb))  # [N,h*w,p*p*C], unpatchified as the transformer does
            out = out.reshape(n, *grid, patch, patch, -1).permute(0, 5, 1, 3, 2, 4).reshape(n, -1, height, width)
            features[-1] = out
            logits += [self.heads[name](out) for name in wanted[-1]]
        return (logits, features) if return_features else logits
