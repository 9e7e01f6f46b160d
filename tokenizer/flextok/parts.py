"""The three top-level FlexTok submodules (``vae``, ``encoder``, ``decoder``) with the official
``module_dict`` names, built from a ``FlexTokConfig``."""
from __future__ import annotations

import torch
from torch import nn

from .config import FlexTokConfig
from .layers import (
    LearnedPosEmb1D, LinearHead, MaskToken, NullCond, PatchEmbedder, Projection, Registers, SinCosPosEmb,
    TimestepEmbedder, ToPatchesHead, Transformer, unpatchify,
)
from .vae import AutoencoderKL


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
