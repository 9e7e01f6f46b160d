"""FlexTok ("Resampling Images into 1D Token Sequences of Flexible Length", arXiv 2502.13967),
state-dict compatible with the official ``flextok.flextok_wrapper.FlexTok`` (apple/ml-flextok).

Pipeline: image in [0,1] -> (x-0.5)/0.5 -> VAE posterior mode * scaling factor -> 2x2 patches +
sincos posemb, followed by the learned registers -> transformer whose mask is full over the
patches and causal over the registers ("causal_last", so every register prefix is a valid
coarser code) -> LayerNorm + Linear -> FSQ ids. Decoding is a rectified flow: a transformer
over [noised latent patches, register tokens] with per-subsequence adaLN timestep modulation
predicts the velocity, Euler steps go from t=1 (noise) to t=0, optionally with classifier-free
guidance (plain or APG) against null-token registers, and the VAE decodes the final latent.

This module holds the tokenizer, FSQ and the flow sampling; config parsing is in
``config``, the building blocks in ``layers``, the VAE / encoder / decoder
submodules in ``parts`` and the KL autoencoder in ``vae``.

The VAE always encodes to the posterior mode (deterministic tokens), whatever
``vae.sample_posterior`` says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ImageTokenizer
from .config import FlexTokConfig
from .parts import FlexTokDecoder, FlexTokEncoder, FlexTokVAE

__all__ = ["FSQ", "EncodeOutput", "FlexTok", "FlexTokConfig", "FlowTrace", "adaptive_projected_guidance"]


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
        image_size: int | None = None, noise: torch.Tensor | None = None,
    ) -> FlowTrace:
        """Token ids [B,k] (1 <= k <= num_tokens) -> rectified-flow trace with the final latent.

        Noise (x at t=1) is ``noise`` [B,C,h,w] when given, else ``torch.randn((1,C,h,w),
        generator=generator)`` per image in batch order, drawn on the generator's device (the
        model's device without one); either is moved to the model. ``guidance_scale`` 1 runs no
        unconditional pass; otherwise CFG, or APG when ``perform_norm_guidance``.
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
        shape = (1, self.cfg.vae.latent_channels, side, side)
        if noise is None:
            noise_device = generator.device if generator is not None else device
            noise = torch.cat([torch.randn(shape, generator=generator, device=noise_device) for _ in range(b)])
        elif tuple(noise.shape) != (b, *shape[1:]):
            raise ValueError(f"noise must be {(b, *shape[1:])}, got {tuple(noise.shape)}")
        x = noise.to(device)

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
        image_size: int | None = None, noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Ids [B,k], any 1 <= k <= num_tokens -> images [B,3,S,S] on a [0,1] scale, unclamped.
        Defaults follow the official README (20 steps, guidance 7.5, APG); ``noise`` as in ``sample``."""
        trace = self.sample(ids, timesteps, guidance_scale, perform_norm_guidance, generator, image_size, noise)
        with torch.no_grad():
            return self.decode_latent(trace.latent) * 0.5 + 0.5
