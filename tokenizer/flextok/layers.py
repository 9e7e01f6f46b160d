"""FlexTok building blocks (official parameter names): patch embedding, positional embeddings,
QK-norm attention, SwiGLU, adaLN transformer blocks, registers, null condition, timestep
embedder and heads."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .config import TransformerConfig


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Non-affine LayerNorm over the last dim, computed in float32 (eps 1e-5)."""
    return F.layer_norm(x.float(), x.shape[-1:]).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale) + shift


def sincos_posemb_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo-v3 style table [1,dim,h,w] in the official layout: channels [sin a, cos a, sin b, cos b]
    where, for a square grid, ``a`` is the row and ``b`` the column index."""
    if dim % 4:
        raise CheckpointError(f"sincos posemb width {dim} is not divisible by 4")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    a = torch.arange(w, dtype=torch.float32).repeat_interleave(h)[:, None] * omega
    b = torch.arange(h, dtype=torch.float32).repeat(w)[:, None] * omega
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return table.reshape(h, w, dim).permute(2, 0, 1).unsqueeze(0)


class PatchEmbedder(nn.Module):
    """Latent [B,C,H,W] -> patch tokens [B,H/p0,W/p1,D]; patch vectors ordered (p0,p1,c)."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.patch_proj = nn.Linear(in_chans * patch_size[0] * patch_size[1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p0, p1 = self.patch_size
        x = x.reshape(b, c, h // p0, p0, w // p1, p1).permute(0, 2, 4, 3, 5, 1)
        return self.patch_proj(x.reshape(b, h // p0, w // p1, p0 * p1 * c))


class SinCosPosEmb(nn.Module):
    """Adds a frozen sincos table [1,D,Hmax,Wmax], cropped to the token grid."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.posembs = nn.Parameter(sincos_posemb_2d(*grid, dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h > self.posembs.shape[2] or w > self.posembs.shape[3]:
            raise ValueError(f"token grid {h}x{w} exceeds the posemb grid {tuple(self.posembs.shape[2:])}")
        return x + self.posembs[:, :, :h, :w].permute(0, 2, 3, 1)


class LearnedPosEmb1D(nn.Module):
    """Adds a learned table stored as [1,1,D,N] (official ``learnable_sum`` layout)."""

    def __init__(self, dim: int, length: int):
        super().__init__()
        self.posembs = nn.Parameter(torch.empty(1, 1, dim, length))
        nn.init.trunc_normal_(self.posembs, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.posembs[0, :, :, : x.shape[1]].transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with LayerNorm QK-norm and the muP scale 8/head_dim."""

    def __init__(self, dim: int, head_dim: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = dim // head_dim
        self.qk_norm = qk_norm
        self.scale = 8.0 / head_dim
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (w(x).reshape(b, n, self.num_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if self.qk_norm:
            q, k = layer_norm(q), layer_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class GatedMlp(nn.Module):
    """SwiGLU: fc2(silu(fc1 x) * fc3 x), hidden width int(2*hidden/3)."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.fc3 = nn.Linear(dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """Pre-norm transformer block; with ``adaln_groups`` > 0 an adaLN modulation produces
    (gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp) per token group."""

    def __init__(self, cfg: TransformerConfig, adaln_groups: int = 0):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.head_dim, cfg.qkv_bias, cfg.proj_bias, cfg.qk_norm)
        self.mlp = GatedMlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.mlp_bias)
        if adaln_groups:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, adaln_groups * 6 * cfg.dim))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None, group_sizes: tuple[int, ...] = (),
    ) -> torch.Tensor:
        if cond is None:
            x = x + self.attn(layer_norm(x), mask)
            return x + self.mlp(layer_norm(x))
        mod = self.adaLN_modulation(cond).unflatten(1, (len(group_sizes), -1))  # [B,groups,6D]
        if len(group_sizes) > 1:
            mod = torch.cat([m.expand(-1, n, -1) for m, n in zip(mod.split(1, dim=1), group_sizes)], dim=1)
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa), mask)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class Transformer(nn.Module):
    """Stack of blocks; no final norm (the heads normalise)."""

    def __init__(self, cfg: TransformerConfig, adaln_groups: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, adaln_groups) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, group_sizes: tuple[int, ...] = ()) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, cond, group_sizes)
        return x


class Registers(nn.Module):
    """Learned register tokens; the first k are used (nested ordering)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.registers = nn.Parameter(torch.empty(num, dim))
        nn.init.trunc_normal_(self.registers, std=0.02)

    def forward(self, batch: int, k: int) -> torch.Tensor:
        return self.registers[:k].expand(batch, -1, -1)


class LinearHead(nn.Module):
    """Non-affine LayerNorm -> Linear."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(layer_norm(x))


class Projection(nn.Module):
    """A plain projection under the official ``.proj`` name."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MaskToken(nn.Module):
    """Nested dropout at inference: register tokens from index ``keep_k`` on become the mask token."""

    def __init__(self, dim: int):
        super().__init__()
        self.dropout_mask_token = nn.Parameter(torch.empty(dim))
        nn.init.trunc_normal_(self.dropout_mask_token, std=0.02)

    def forward(self, x: torch.Tensor, keep_k: int) -> torch.Tensor:
        keep = torch.arange(x.shape[1], device=x.device) < keep_k
        return torch.where(keep[:, None], x, self.dropout_mask_token.to(x.dtype))


class NullCond(nn.Module):
    """The classifier-free-guidance null condition: every register becomes a learned vector
    (``LearnedNullCond``) or zero (``ZeroNullCond``)."""

    def __init__(self, dim: int, learned: bool):
        super().__init__()
        if learned:
            self.nullcond = nn.Parameter(torch.empty(dim))
            nn.init.trunc_normal_(self.nullcond, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        null = getattr(self, "nullcond", None)
        return torch.zeros_like(x) if null is None else null.to(x.dtype).expand_as(x)


class TimestepEmbedder(nn.Module):
    """t -> [cos, sin] features (max period 256, frequencies scaled by 1000/max_timestep) -> MLP."""

    def __init__(self, dim: int, freq_dim: int, max_timestep: float):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_timestep = max_timestep
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        exponent = -math.log(256) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = (1000.0 / self.max_timestep) * torch.exp(exponent)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t))


class ToPatchesHead(nn.Module):
    """LayerNorm (+ adaLN shift/scale from the timestep embedding) -> Linear to patch vectors."""

    def __init__(self, dim: int, out_chans: int, patch_size: tuple[int, int], adaln: bool):
        super().__init__()
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, out_chans * patch_size[0] * patch_size[1])

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = layer_norm(x)
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(temb)[:, None].chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.proj(x)


def unpatchify(x: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """[B,h,w,(p0 p1 c)] -> [B,c,h*p0,w*p1]."""
    b, h, w, _ = x.shape
    p0, p1 = patch_size
    x = x.reshape(b, h, w, p0, p1, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, -1, h * p0, w * p1)
