"""FlexTok ("Resampling Images into 1D Token Sequences of Flexible Length", arXiv 2502.13967),
state-dict compatible with the official ``flextok.flextok_wrapper.FlexTok`` (apple/ml-flextok).

Pipeline: image in [0,1] -> (x-0.5)/0.5 -> VAE posterior mode * scaling factor -> 2x2 patches +
sincos posemb, followed by the learned registers -> transformer whose mask is full over the
patches and causal over the registers ("causal_last", so every register prefix is a valid
coarser code) -> LayerNorm + Linear -> FSQ ids. Decoding is a rectified flow: a transformer
over [noised latent patches, register tokens] with per-subsequence adaLN timestep modulation
predicts the velocity, Euler steps go from t=1 (noise) to t=0, optionally with classifier-free
guidance (plain or APG) against null-token registers, and the VAE decodes the final latent.

Configs are the official hydra dicts (``_target_`` paths, ``encoder.module_dict.enc_*``,
``decoder.module_dict.dec_*``); nothing is instantiated from ``_target_``, the fields are read and
checked, and unsupported variants are refused. pretok extension keys:

* ``vae_config``: the diffusers ``AutoencoderKL`` config.json of the VAE (the official wrapper
  downloads it from ``vae.hf_hub_path``). Without it the ``_reference_harness.vae_base_cfg_override``
  block of the reference fixtures is used (with ``vae.latent_channels``, as the official wrapper
  does for its built-in base config); a config with neither is refused.
* ``image_size`` (optional): the resolution ``decode_tokens`` renders; else
  ``_reference_harness.image_size``; else the largest size the patch posemb grid covers.

The VAE always encodes to the posterior mode (deterministic tokens), whatever
``vae.sample_posterior`` says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageTokenizer
from .checkpoint import CheckpointError
from .flextok_vae import AutoencoderKL, VAEConfig

_DTYPES = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TransformerConfig:
    dim: int
    depth: int
    head_dim: int
    mlp_ratio: float
    qkv_bias: bool
    proj_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_dict(cls, cfg: dict, where: str) -> "TransformerConfig":
        if not cfg.get("gated_mlp", True):
            raise CheckpointError(f"{where}: gated_mlp=false is not supported (FlexTok uses SwiGLU)")
        return cls(
            dim=int(cfg.get("dim", 768)),
            depth=int(cfg.get("depth", 12)),
            head_dim=int(cfg.get("head_dim", 64)),
            mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
            qkv_bias=bool(cfg.get("qkv_bias", False)),
            proj_bias=bool(cfg.get("proj_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=bool(cfg.get("qk_norm", True)),
        )


# Parameterised / order-relevant modules of the official module dicts, with accepted classes.
# Parameter-free helpers (channel permutes, the sequence unpackers) are not checked.
_ENCODER_MODULES = {
    "enc_patch_emb": ("PatchEmbedder",),
    "enc_posemb_module": ("PositionalEmbeddingAdder",),
    "enc_register_module": ("Registers1D",),
    "enc_seq_packer": ("BlockWiseSequencePacker",),
    "enc_transformer": ("FlexTransformer",),
    "enc_to_latents": ("LinearHead",),
}
_DECODER_MODULES = {
    "dec_from_latents": ("LinearLayer",),
    "dec_registers_posemb_module": ("PositionalEmbeddingAdder",),
    "dec_nested_dropout": ("MaskedNestedDropout",),
    "dec_latent_dropout": ("LearnedNullCond", "ZeroNullCond"),
    "dec_noise_patch_emb": ("PatchEmbedder",),
    "dec_patches_posemb_module": ("PositionalEmbeddingAdder",),
    "dec_seq_packer": ("BlockWiseSequencePacker",),
    "dec_time_embedder": ("TimestepEmbedder",),
    "dec_transformer": ("FlexTransformer",),
    "dec_to_patches": ("ToPatchesLinearHead",),
}


def _class(node: dict) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _module_dict(config: dict, section: str, expected: dict[str, tuple[str, ...]]) -> dict:
    try:
        modules = config[section]["module_dict"]
    except (KeyError, TypeError):
        raise CheckpointError(f"FlexTok config lacks {section}.module_dict") from None
    present = [name for name in modules if name in expected]
    if present != list(expected):
        raise CheckpointError(
            f"FlexTok {section}.module_dict must contain {list(expected)} in this order; found {list(modules)}"
        )
    for name, classes in expected.items():
        if _class(modules[name]) not in classes:
            got = modules[name].get("_target_")
            raise CheckpointError(f"{section}.{name}: expected one of {classes}, got {got!r}")
    return modules


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckpointError(f"unsupported FlexTok config: {message}")


@dataclass(frozen=True)
class FlexTokConfig:
    vae: VAEConfig
    vae_scaling_factor: float
    vae_dtype: torch.dtype
    patch_size: tuple[int, int]
    num_registers: int
    fsq_levels: tuple[int, ...]
    encoder: TransformerConfig
    enc_posemb_grid: tuple[int, int]
    decoder: TransformerConfig
    dec_posemb_grid: tuple[int, int]
    adaln_expansion: int          # 2: separate modulation for patch and register tokens
    learned_nullcond: bool        # LearnedNullCond (key .nullcond) vs ZeroNullCond
    head_adaln: bool              # dec_to_patches with adaLN modulation
    time_freq_dim: int
    max_timestep: float
    image_size: int

    @classmethod
    def from_dict(cls, config: dict) -> "FlexTokConfig":
        """Read and check an official FlexTok hydra config (plus pretok's extensions)."""
        try:
            return cls._parse(config)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"FlexTok config lacks a required field: {e}") from e

    @classmethod
    def _parse(cls, config: dict) -> "FlexTokConfig":
        harness = config.get("_reference_harness") or {}
        vae_node = config.get("vae") or {}
        _require(_class(vae_node) == "StableDiffusionVAE", f"vae._target_={vae_node.get('_target_')!r}")
        vae = VAEConfig.from_dict(_vae_config(config, vae_node, harness))
        scaling = vae_node.get("scaling_factor") or vae.scaling_factor
        _require(scaling is not None, "no VAE scaling factor (vae.scaling_factor or vae_config.scaling_factor)")
        dtype = vae_node.get("dtype_override", "fp32")
        _require(dtype in _DTYPES, f"vae.dtype_override={dtype!r}")

        reg = config.get("regularizer") or {}
        _require(_class(reg) == "FSQ", f"regularizer._target_={reg.get('_target_')!r}")
        levels = tuple(int(v) for v in reg["levels"])
        pipe = config.get("pipeline") or {}
        _require(_class(pipe) == "MinRFPipeline", f"pipeline._target_={pipe.get('_target_')!r}")

        enc = _module_dict(config, "encoder", _ENCODER_MODULES)
        dec = _module_dict(config, "decoder", _DECODER_MODULES)
        patch = tuple(int(p) for p in enc["enc_patch_emb"]["patch_sizes"])
        for name in ("enc_patch_emb", "dec_noise_patch_emb"):
            node = enc.get(name) or dec[name]
            channels = node["channels_in"]
            _require(len(patch) == 2 and tuple(node["patch_sizes"]) == patch, f"{name}.patch_sizes")
            _require(channels == vae.latent_channels,
                     f"{name}.channels_in={channels} but the VAE has {vae.latent_channels} latent channels")
        _require(dec["dec_to_patches"]["channels_out"] == vae.latent_channels, "dec_to_patches.channels_out")
        _require(tuple(dec["dec_to_patches"]["patch_sizes"]) == patch, "dec_to_patches.patch_sizes")
        _require(int(pipe.get("out_channels", vae.latent_channels)) == vae.latent_channels, "pipeline.out_channels")

        registers = enc["enc_register_module"]
        n_reg = int(registers["n_max"])
        _require(registers.get("ordering_mode", "nested") == "nested", "enc_register_module.ordering_mode")
        _require(enc["enc_seq_packer"].get("mask_mode") == "causal_last",
                 "enc_seq_packer.mask_mode (need causal_last)")
        _require(dec["dec_seq_packer"].get("mask_mode") == "full", "dec_seq_packer.mask_mode (need full)")
        _require(list(enc["enc_seq_packer"]["input_list_read_keys"]) ==
                 [enc["enc_patch_emb"]["patches_list_write_key"], registers["registers_write_key"]],
                 "enc_seq_packer must pack [patches, registers]")
        _require(list(dec["dec_seq_packer"]["input_list_read_keys"]) ==
                 [dec["dec_noise_patch_emb"]["patches_list_write_key"], dec["dec_nested_dropout"]["read_write_key"]],
                 "dec_seq_packer must pack [patches, registers]")
        for name in ("enc_posemb_module", "dec_patches_posemb_module"):
            node = enc.get(name) or dec.get(name)
            sincos = node.get("posemb_type", "sincos") == "sincos"
            _require(sincos and node.get("posemb_scaling", "absolute") == "absolute",
                     f"{name} must be an absolute sincos posemb")
        reg_pe = dec["dec_registers_posemb_module"]
        _require(reg_pe.get("posemb_type") == "learnable_sum" and list(reg_pe["max_sizes"]) == [n_reg]
                 and reg_pe.get("posemb_scaling", "absolute") == "absolute",
                 "dec_registers_posemb_module must be a learnable_sum 1D posemb over all registers")
        _require(not dec["dec_latent_dropout"].get("replace_with_single_token", False),
                 "dec_latent_dropout.replace_with_single_token")
        _require(dec["dec_from_latents"]["dim_in"] == len(levels) == enc["enc_to_latents"]["dim_out"],
                 "enc_to_latents.dim_out / dec_from_latents.dim_in must equal the number of FSQ levels")
        for name, node in (("enc_to_latents", enc["enc_to_latents"]), ("dec_to_patches", dec["dec_to_patches"])):
            _require(not node.get("use_mup_readout", False), f"{name}.use_mup_readout")
            _require(node.get("proj_bias", True), f"{name}.proj_bias=false")

        enc_t = TransformerConfig.from_dict(enc["enc_transformer"], "enc_transformer")
        dec_t = TransformerConfig.from_dict(dec["dec_transformer"], "dec_transformer")
        _require(dec["dec_transformer"].get("adaLN_emb_read_key") is not None, "dec_transformer without adaLN")
        expansion = int(dec["dec_transformer"].get("adaLN_expansion", 1))
        per_subseq = bool(dec["dec_seq_packer"].get("per_subseq_embs", False))
        _require(expansion == (2 if per_subseq else 1),
                 f"adaLN_expansion={expansion} with per_subseq_embs={per_subseq}")
        for modules, width in ((enc, enc_t.dim), (dec, dec_t.dim)):
            for name, node in modules.items():
                _require(int(node.get("dim", width)) == width,
                         f"{name}.dim={node.get('dim')} but the transformer width is {width}")
        temb = dec["dec_time_embedder"]
        freq = int(temb.get("frequency_embedding_size", 256))
        _require(freq % 2 == 0, "odd dec_time_embedder.frequency_embedding_size")

        enc_grid = tuple(int(s) for s in enc["enc_posemb_module"]["max_sizes"])
        dec_grid = tuple(int(s) for s in dec["dec_patches_posemb_module"]["max_sizes"])
        factor = vae.downsample_factor * patch[0]
        image_size = config.get("image_size") or harness.get("image_size") or min(dec_grid) * factor
        return cls(
            vae=vae,
            vae_scaling_factor=float(scaling),
            vae_dtype=_DTYPES[vae_node.get("dtype_override", "fp32")],
            patch_size=patch,
            num_registers=n_reg,
            fsq_levels=levels,
            encoder=enc_t,
            enc_posemb_grid=enc_grid,
            decoder=dec_t,
            dec_posemb_grid=dec_grid,
            adaln_expansion=expansion,
            learned_nullcond=_class(dec["dec_latent_dropout"]) == "LearnedNullCond",
            head_adaln=dec["dec_to_patches"].get("adaLN_emb_read_key") is not None,
            time_freq_dim=freq,
            max_timestep=float(temb.get("max_timestep", 1000.0)),
            image_size=int(image_size),
        )


def _vae_config(config: dict, vae_node: dict, harness: dict) -> dict:
    if "vae_config" in config:
        return config["vae_config"]
    if "vae_base_cfg_override" in harness:
        return {**harness["vae_base_cfg_override"], "latent_channels": vae_node.get("latent_channels", 16)}
    raise CheckpointError(
        "FlexTok config has no VAE architecture: the official code fetches it from "
        f"vae.hf_hub_path={vae_node.get('hf_hub_path')!r}; add that VAE's diffusers AutoencoderKL "
        "config.json to the checkpoint config under the key 'vae_config'"
    )


# ----------------------------------------------------------------------------- layers


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


# ----------------------------------------------------------------------------- model parts


class FlexTokVAE(nn.Module):
    """The frozen VAE (official ``StableDiffusionVAE``): scaled posterior mode in, images out.
    Runs in ``dtype`` with any outer autocast switched off, as the official wrapper."""

    def __init__(self, cfg: FlexTokConfig, with_decoder: bool):
        super().__init__()
        self.vae = AutoencoderKL(cfg.vae, with_decoder=with_decoder)
        self.scaling_factor = cfg.vae_scaling_factor
        self.dtype = cfg.vae_dtype

    def _autocast(self, x: torch.Tensor):
        return torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1,1] -> posterior mode * scaling factor."""
        with self._autocast(x):
            return self.vae.encode(x.to(self.dtype)) * self.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image, nominally [-1,1]."""
        with self._autocast(latent):
            return self.vae.decode(latent.to(self.dtype) / self.scaling_factor)


class FlexTokEncoder(nn.Module):
    """VAE latent -> (patch tokens in, patch outputs, register outputs, pre-quantisation latents)."""

    def __init__(self, cfg: FlexTokConfig):
        super().__init__()
        t = cfg.encoder
        self.module_dict = nn.ModuleDict({
            "enc_patch_emb": PatchEmbedder(cfg.patch_size, cfg.vae.latent_channels, t.dim),
            "enc_posemb_module": SinCosPosEmb(t.dim, cfg.enc_posemb_grid),
            "enc_register_module": Registers(cfg.num_registers, t.dim),
            "enc_transformer": Transformer(t),
            "enc_to_latents": LinearHead(t.dim, len(cfg.fsq_levels)),
        })

    def forward(self, latent: torch.Tensor, num_registers: int) -> tuple[torch.Tensor, ...]:
        m = self.module_dict
        patches = m["enc_posemb_module"](m["enc_patch_emb"](latent))
        b, h, w, _ = patches.shape
        n_patches = h * w
        seq = torch.cat([patches.flatten(1, 2), m["enc_register_module"](b, num_registers)], dim=1)
        pos = torch.arange(seq.shape[1], device=seq.device)
        mask = (pos[None, :] < n_patches) | (pos[None, :] <= pos[:, None])  # causal_last
        seq = m["enc_transformer"](seq, mask=mask)
        patch_out, registers_out = seq[:, :n_patches].unflatten(1, (h, w)), seq[:, n_patches:]
        return patches, patch_out, registers_out, m["enc_to_latents"](registers_out)


class FlexTokDecoder(nn.Module):
    """Rectified-flow velocity model: (x_t, t, register tokens) -> velocity."""

    def __init__(self, cfg: FlexTokConfig):
        super().__init__()
        t = cfg.decoder
        self.patch_size = cfg.patch_size
        self.adaln_expansion = cfg.adaln_expansion
        self.module_dict = nn.ModuleDict({
            "dec_from_latents": Projection(len(cfg.fsq_levels), t.dim),
            "dec_registers_posemb_module": LearnedPosEmb1D(t.dim, cfg.num_registers),
            "dec_nested_dropout": MaskToken(t.dim),
            "dec_latent_dropout": NullCond(t.dim, cfg.learned_nullcond),
            "dec_noise_patch_emb": PatchEmbedder(cfg.patch_size, cfg.vae.latent_channels, t.dim),
            "dec_patches_posemb_module": SinCosPosEmb(t.dim, cfg.dec_posemb_grid),
            "dec_time_embedder": TimestepEmbedder(t.dim, cfg.time_freq_dim, cfg.max_timestep),
            "dec_transformer": Transformer(t, adaln_groups=cfg.adaln_expansion),
            "dec_to_patches": ToPatchesHead(t.dim, cfg.vae.latent_channels, cfg.patch_size, cfg.head_adaln),
        })

    def embed_registers(self, quants: torch.Tensor, keep_k: int) -> torch.Tensor:
        """FSQ codes of all register slots [B,N,L] -> register tokens [B,N,D]; slots >= keep_k
        are masked (the register posemb is added before the masking)."""
        m = self.module_dict
        x = m["dec_registers_posemb_module"](m["dec_from_latents"](quants))
        return m["dec_nested_dropout"](x, keep_k)

    def null_registers(self, registers: torch.Tensor) -> torch.Tensor:
        """Register tokens of the unconditional (CFG) pass."""
        return self.module_dict["dec_latent_dropout"](registers)

    def embed_patches(self, x_t: torch.Tensor) -> torch.Tensor:
        """Noised latent [B,C,H,W] -> patch tokens [B,H/p0,W/p1,D]."""
        m = self.module_dict
        return m["dec_patches_posemb_module"](m["dec_noise_patch_emb"](x_t))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.module_dict["dec_time_embedder"](t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, registers: torch.Tensor) -> torch.Tensor:
        m = self.module_dict
        patches = self.embed_patches(x_t)
        temb = self.time_embedding(t)
        b, h, w, _ = patches.shape
        n_patches, n_registers = h * w, registers.shape[1]
        groups = (n_patches, n_registers) if self.adaln_expansion == 2 else (n_patches + n_registers,)
        seq = torch.cat([patches.flatten(1, 2), registers], dim=1)
        seq = m["dec_transformer"](seq, cond=temb, group_sizes=groups)
        out = m["dec_to_patches"](seq[:, :n_patches], temb)
        return unpatchify(out.unflatten(1, (h, w)), self.patch_size)


class FSQ(nn.Module):
    """Finite scalar quantisation (levels L_i): bound, round, ids in a mixed-radix basis.
    Always computed in float32, outside autocast."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        self.codebook_size = math.prod(levels)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.int32), persistent=False)

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        half_l = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [...,L] -> (codes in [-1,1], int64 ids)."""
        with torch.autocast(z.device.type, enabled=False):
            codes = self.bound(z.float()).round() / (self.levels // 2)
            return codes, self.ids_from_codes(codes)

    def ids_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        half_width = self.levels // 2
        return ((codes * half_width + half_width) * self.basis).sum(dim=-1).to(torch.int32).long()

    def codes_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        half_width = self.levels // 2
        return ((ids[..., None] // self.basis) % self.levels - half_width) / half_width


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class EncodeOutput:
    """Every intermediate of one encoding (tokens at [B,k,...] for k registers)."""

    vae_latent: torch.Tensor        # [B,C,h,w], posterior mode * scaling factor
    patch_tokens_in: torch.Tensor   # [B,h/p,w/p,D]
    patch_outputs: torch.Tensor     # [B,h/p,w/p,D]
    register_outputs: torch.Tensor  # [B,k,D]
    prequant: torch.Tensor          # [B,k,L]
    quants: torch.Tensor            # [B,k,L], FSQ codes
    token_ids: torch.Tensor         # [B,k] int64


@dataclass
class FlowTrace:
    """One rectified-flow decode: per Euler step (t = 1, (T-1)/T, ..., 1/T) the decoder input,
    the conditional / unconditional velocities and the velocity used; ``latent`` is x at t=0."""

    timesteps: torch.Tensor          # [T,B]
    x_t: torch.Tensor                # [T,B,C,h,w], x_t[0] = initial noise
    v_cond: torch.Tensor             # [T,B,C,h,w]
    v_uncond: torch.Tensor | None    # [T,B,C,h,w], guided runs only
    velocity: torch.Tensor           # [T,B,C,h,w], x_t[i+1] = x_t[i] - velocity[i] / T
    latent: torch.Tensor             # [B,C,h,w]


def adaptive_projected_guidance(
    v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, running: torch.Tensor | None,
    momentum: float = -0.5, norm_threshold: float = 2.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APG (arXiv 2410.02416) as in the official pipeline (eta 0): momentum on the guidance
    difference, norm clipping, keep only the part orthogonal to ``v_cond``. Per sample over
    (C,H,W). Returns (guided velocity, new running average)."""
    diff = v_cond - v_uncond
    running = diff if running is None else diff + momentum * running
    dims = (-1, -2, -3)
    norm = running.norm(p=2, dim=dims, keepdim=True)
    clipped = running * torch.minimum(torch.ones_like(running), norm_threshold / norm)
    unit = F.normalize(v_cond.double(), dim=dims)
    parallel = (clipped.double() * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = (clipped.double() - parallel).to(v_cond.dtype)
    return v_cond + (scale - 1) * orthogonal, running


class FlexTok(ImageTokenizer):
    family = "flextok"
    ordered = True
    decoder_prefixes = ("decoder.", "vae.vae.decoder.", "vae.vae.post_quant_conv.")

    def __init__(self, cfg: FlexTokConfig, parts: str = "all"):
        super().__init__()
        self.cfg = cfg
        self.has_decoder = parts == "all"
        self.vae = FlexTokVAE(cfg, with_decoder=self.has_decoder)
        self.encoder = FlexTokEncoder(cfg)
        if self.has_decoder:
            self.decoder = FlexTokDecoder(cfg)
        self.regularizer = FSQ(cfg.fsq_levels)
        self.num_tokens = cfg.num_registers
        self.codebook_size = self.regularizer.codebook_size
        self.image_size = cfg.image_size

    @classmethod
    def from_config(cls, config: dict, parts: str = "all") -> "FlexTok":
        return cls(FlexTokConfig.from_dict(config), parts=parts)

    @property
    def pixels_per_token_side(self) -> int:
        return self.cfg.vae.downsample_factor * self.cfg.patch_size[0]

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.num_tokens:
            raise ValueError(f"number of tokens must be in [1, {self.num_tokens}], got {k}")
        return k

    def encode_features(self, x: torch.Tensor, num_tokens: int | None = None) -> EncodeOutput:
        """Images in [-1,1] [B,3,H,W] -> every encoding intermediate, using the first
        ``num_tokens`` registers (default all)."""
        f = self.pixels_per_token_side
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"expected images [B,3,H,W] with H, W multiples of {f}, got {tuple(x.shape)}")
        k = self._check_k(self.num_tokens if num_tokens is None else num_tokens)
        latent = self.vae.encode(x)
        patches_in, patch_out, registers_out, prequant = self.encoder(latent, k)
        quants, ids = self.regularizer(prequant)
        return EncodeOutput(latent, patches_in, patch_out, registers_out, prequant, quants, ids)

    def encode(self, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """Images in [0,1] -> int64 ids [B,num_tokens]; a prefix encoding (``num_tokens`` < all)
        equals the prefix of the full encoding (causal registers)."""
        return self.encode_features((images - 0.5) / 0.5, num_tokens).token_ids

    @torch.no_grad()
    def sample(
        self, ids: torch.Tensor, timesteps: int = 20, guidance_scale: float = 7.5,
        perform_norm_guidance: bool = True, generator: torch.Generator | None = None,
        image_size: int | None = None,
    ) -> FlowTrace:
        """Token ids [B,k] (1 <= k <= num_tokens) -> rectified-flow trace with the final latent.

        Noise is ``torch.randn((1,C,h,w), generator=generator)`` per image in batch order, drawn
        on the generator's device (the model's device without one) and moved to the model.
        ``guidance_scale`` 1 runs no unconditional pass; otherwise CFG, or APG when
        ``perform_norm_guidance``.
        """
        if not self.has_decoder:
            raise RuntimeError("this tokenizer was loaded encoder-only (parts='encoder'); it cannot decode")
        if ids.ndim != 2:
            raise ValueError(f"expected ids [B,k], got {tuple(ids.shape)}")
        b, k = ids.shape
        self._check_k(k)
        size = self.image_size if image_size is None else image_size
        if size % self.pixels_per_token_side:
            raise ValueError(f"image size {size} is not a multiple of {self.pixels_per_token_side}")
        side = size // self.cfg.vae.downsample_factor
        device = self.device
        quants = self.regularizer.codes_from_ids(F.pad(ids.to(device).long(), (0, self.num_tokens - k)))
        registers = self.decoder.embed_registers(quants, keep_k=k)
        guided = guidance_scale != 1.0
        if guided:
            registers = torch.cat([registers, self.decoder.null_registers(registers)])
        noise_device = generator.device if generator is not None else device
        shape = (1, self.cfg.vae.latent_channels, side, side)
        x = torch.cat([torch.randn(shape, generator=generator, device=noise_device) for _ in range(b)]).to(device)

        dt = 1.0 / timesteps
        running = None
        trace: dict[str, list[torch.Tensor]] = {n: [] for n in ("t", "x", "cond", "uncond", "v")}
        for i in range(timesteps, 0, -1):
            t = torch.full((b,), i / timesteps, device=device)
            if guided:
                v_cond, v_uncond = self.decoder(x.repeat(2, 1, 1, 1), t.repeat(2), registers).float().chunk(2)
                if perform_norm_guidance:
                    v, running = adaptive_projected_guidance(v_cond, v_uncond, guidance_scale, running)
                else:
                    v = v_uncond + guidance_scale * (v_cond - v_uncond)
                trace["uncond"].append(v_uncond)
            else:
                v = v_cond = self.decoder(x, t, registers).float()
            for name, value in (("t", t), ("x", x), ("cond", v_cond), ("v", v)):
                trace[name].append(value)
            x = x - dt * v
        stack = {n: torch.stack(vals) if vals else None for n, vals in trace.items()}
        return FlowTrace(stack["t"], stack["x"], stack["cond"], stack["uncond"], stack["v"], x)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Final flow latent -> VAE image, nominally [-1,1] (the official ``detokenize`` output)."""
        if not self.has_decoder:
            raise RuntimeError("this tokenizer was loaded encoder-only (parts='encoder'); it cannot decode")
        return self.vae.decode(latent)

    def decode_tokens(
        self, ids: torch.Tensor, timesteps: int = 20, guidance_scale: float = 7.5,
        perform_norm_guidance: bool = True, generator: torch.Generator | None = None,
        image_size: int | None = None,
    ) -> torch.Tensor:
        """Ids [B,k], any 1 <= k <= num_tokens -> images [B,3,S,S] on a [0,1] scale, unclamped.
        Defaults follow the official README (20 steps, guidance 7.5, APG)."""
        trace = self.sample(ids, timesteps, guidance_scale, perform_norm_guidance, generator, image_size)
        with torch.no_grad():
            return self.decode_latent(trace.latent) * 0.5 + 0.5
