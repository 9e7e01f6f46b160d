"""The KL autoencoder FlexTok runs on, in plain PyTorch.

Parameter names are those of diffusers' ``AutoencoderKL`` (``encoder.down_blocks.i.resnets.j``,
``mid_block.attentions.0.to_q`` / ``to_out.0``, ``quant_conv``, ...), so a diffusers state dict
loads unchanged. Only the configuration FlexTok uses is implemented: ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` blocks, SiLU, GroupNorm (eps 1e-6), one single-head attention in each mid
block, quant convs, and the posterior mode (mean) as the encoding. ``with_decoder=False`` builds
the encoding half only (no ``decoder.*`` / ``post_quant_conv.*``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError


@dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json that shape the network."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    scaling_factor: float | None

    @classmethod
    def from_dict(cls, cfg: dict) -> "VAEConfig":
        """Parse a diffusers config (missing fields take diffusers' defaults); refuse variants
        this implementation does not cover."""
        blocks = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
        down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
        up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
        unsupported = {
            "down_block_types": down != ["DownEncoderBlock2D"] * len(blocks),
            "up_block_types": up != ["UpDecoderBlock2D"] * len(blocks),
            "act_fn": cfg.get("act_fn", "silu") != "silu",
            "use_quant_conv": not cfg.get("use_quant_conv", True),
            "use_post_quant_conv": not cfg.get("use_post_quant_conv", True),
            "mid_block_add_attention": not cfg.get("mid_block_add_attention", True),
        }
        bad = [f"{k}={cfg.get(k)!r}" for k, v in unsupported.items() if v]
        if bad:
            raise CheckpointError(f"unsupported AutoencoderKL config: {', '.join(bad)}")
        scaling = cfg.get("scaling_factor", 0.18215)
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            block_out_channels=blocks,
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            scaling_factor=None if scaling is None else float(scaling),
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        t = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        t = self.to_out[0](t)
        return t.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)
        )
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in getattr(self, "downsamplers", ()):
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)
        )
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in getattr(self, "upsamplers", ()):
            x = up(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """Image [B,3,H,W] -> posterior moments before ``quant_conv`` [B,2*latent,H/f,W/f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlock2D(ch[-1], g)
        self.conv_norm_out = _group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent [B,latent,h,w] (after ``post_quant_conv``) -> image [B,3,h*f,w*f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlock2D(ch[0], g)
        self.conv_norm_out = _group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """diffusers-compatible KL autoencoder; ``encode`` returns the posterior mode."""

    def __init__(self, cfg: VAEConfig, with_decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg)
        if with_decoder:
            self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        if with_decoder:
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1,1] -> posterior mean [B,latent,H/f,W/f] (unscaled)."""
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.cfg.latent_channels]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image, nominally [-1,1]."""
        return self.decoder(self.post_quant_conv(z))
