"""MaskGIT-VQGAN pixel decoder: the second stage of the two-stage TiTok models.

Convolutional decoder of the MaskGIT VQGAN (no attention layers). Two quirks of the released
weights are kept on purpose: GroupNorm has 32 groups and eps 1e-6, and when a residual block
changes width its 1x1 shortcut is applied to the block's *output* (out -> out channels), not to
its input. All 3x3 convolutions use TF "same" padding, which for stride 1 is padding=1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Official values are the defaults (MaskGIT-VQGAN f16, 256 px)."""

    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_resolutions: int = 5
    num_res_blocks: int = 2
    z_channels: int = 256
    num_channels: int = 3
    resolution: int = 256
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "PixelDecoderConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "channel_mult" in known:
            known["channel_mult"] = tuple(known["channel_mult"])
        cfg = cls(**known)
        if len(cfg.channel_mult) != cfg.num_resolutions:
            raise ValueError(f"channel_mult {cfg.channel_mult} must have num_resolutions={cfg.num_resolutions} entries")
        return cfg


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (
            nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class UpBlock(nn.Module):
    """Residual blocks at one resolution, then (except at level 0) nearest 2x upsample + conv."""

    def __init__(self, cfg: PixelDecoderConfig, level: int):
        super().__init__()
        top = cfg.num_resolutions - 1
        block_in = cfg.hidden_channels * cfg.channel_mult[min(level + 1, top)]
        block_out = cfg.hidden_channels * cfg.channel_mult[level]
        self.block = nn.ModuleList(
            [ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(cfg.num_res_blocks)]
        )
        self.upsample_conv = nn.Conv2d(block_out, block_out, 3, padding=1) if level > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class PixelDecoder(nn.Module):
    """z [B,z_channels,g,g] -> image [B,3,g*2^(L-1),...]; ``up[i]`` is level i, run from the top."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        block_in = cfg.hidden_channels * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in) for _ in range(cfg.num_res_blocks)])
        self.up = nn.ModuleList([UpBlock(cfg, level) for level in range(cfg.num_resolutions)])
        block_out = cfg.hidden_channels * cfg.channel_mult[0]
        self.norm_out = _norm(block_out)
        self.conv_out = nn.Conv2d(block_out, cfg.num_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for blk in self.mid:
            x = blk(x)
        for up in reversed(self.up):
            x = up(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class PixelQuantizer(nn.Module):
    """Holds the VQGAN codebook; TiTok mixes it with the softmax of its 1024-way logits."""

    def __init__(self, num_embeddings: int = 1024, embedding_dim: int = 256):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B,K,h,w] -> softmax over K contracted with the codebook -> [B,D,h,w]."""
        return torch.einsum("bkhw,kd->bdhw", logits.softmax(dim=1), self.embedding.weight)
