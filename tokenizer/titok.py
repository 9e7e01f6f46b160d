"""TiTok ("An Image is Worth 32 Tokens", arXiv 2406.07550), state-dict compatible with the
released checkpoints.

Configs load as published: missing ``finetune_decoder`` / ``is_legacy`` / ``quantize_mode`` take
the official defaults (true, true, "vq") and ``${a.b}`` interpolations are dotted lookups
(``tokenizer.interpolation``). Decoder flavours:
- two-stage (``is_legacy`` and ``finetune_decoder`` true, the official defaults): the ViT decoder
  predicts 1024-way logits over MaskGIT-VQGAN codes, their softmax mixes the VQGAN codebook and the
  MaskGIT-VQGAN pixel decoder renders pixels (titok_s128 / b64 / l32);
- single-stage (both false): the ViT decoder predicts pixel patches directly
  (titok_bl64/bl128/sl256_vq8k);
- stage 1 of two-stage training (``is_legacy`` true, ``finetune_decoder`` false): the same encoder and
  quantizer, so encoding is supported; its decoder only predicts the proxy-code logits, which need
  the separate MaskGIT-VQGAN to become pixels, so ``decode_tokens`` refuses clearly.
``is_legacy`` false with ``finetune_decoder`` true cannot run in the official code (the pixel
decoder mixes 1024 logits the pixel head does not produce) and is refused.
The legacy encoder also reshapes its latent rows [B,N,W] straight to [B,W,N,1] (a reshape, not a
transpose); that quirk decides the token ids and is reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageTokenizer
from .errors import CheckpointError
from .interpolation import resolve_interpolations
from .maskgit_vqgan import PixelDecoder, PixelDecoderConfig, PixelQuantizer
from .vit import ResidualAttentionBlock


@dataclass(frozen=True)
class ViTSize:
    width: int
    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_SIZES = {
    "small": ViTSize(512, 8, 8),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
}


@dataclass(frozen=True)
class TiTokConfig:
    image_size: int
    enc_patch_size: int
    dec_patch_size: int
    num_latent_tokens: int
    token_size: int
    codebook_size: int
    use_l2_norm: bool
    is_legacy: bool
    encoder: ViTSize
    decoder: ViTSize
    pixel_decoder: PixelDecoderConfig | None   # two-stage only
    pixel_codebook: tuple[int, int] | None     # (num_embeddings, embedding_dim), two-stage only

    @property
    def decodes_pixels(self) -> bool:
        """False for a stage-1 model, whose decoder output is proxy-code logits."""
        return not self.is_legacy or self.pixel_decoder is not None

    @classmethod
    def from_dict(cls, config: dict) -> "TiTokConfig":
        """Parse an official TiTok config.json as published (plus pretok's optional size extensions)."""
        config = resolve_interpolations(config)
        try:
            vq = config["model"]["vq_model"]
            image_size = int(config["dataset"]["preprocessing"]["crop_size"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"TiTok config lacks {e}: need model.vq_model and dataset.preprocessing.crop_size")
        mode = vq.get("quantize_mode", "vq")
        if mode != "vq":
            raise CheckpointError(
                f"TiTok quantize_mode={mode!r} (continuous VAE tokens, e.g. titok_*_vae_c16) is not supported: "
                "pretok stores discrete token ids; use a VQ checkpoint"
            )
        sizes = {**VIT_SIZES, **{k: ViTSize(**v) for k, v in vq.get("model_sizes", {}).items()}}

        def size(field: str) -> ViTSize:
            name = vq.get(field)
            if name not in sizes:
                raise CheckpointError(f"unknown {field} {name!r}: known sizes {sorted(sizes)} (add model_sizes)")
            return sizes[name]

        is_legacy = bool(vq.get("is_legacy", True))
        two_stage = bool(vq.get("finetune_decoder", True))
        if two_stage and not is_legacy:
            raise CheckpointError(
                "unsupported TiTok variant: finetune_decoder=true needs is_legacy=true (the pixel decoder mixes "
                "the legacy decoder's 1024 code logits; the official code cannot run this combination either)"
            )
        pixel_decoder = pixel_codebook = None
        if two_stage:
            pixel_decoder = PixelDecoderConfig.from_dict(vq.get("pixel_decoder", {}))
            pc = vq.get("pixel_codebook", {})
            pixel_codebook = (int(pc.get("num_embeddings", 1024)), int(pc.get("embedding_dim", 256)))
        return cls(
            image_size=image_size,
            enc_patch_size=int(vq["vit_enc_patch_size"]),
            dec_patch_size=int(vq["vit_dec_patch_size"]),
            num_latent_tokens=int(vq["num_latent_tokens"]),
            token_size=int(vq["token_size"]),
            codebook_size=int(vq["codebook_size"]),
            use_l2_norm=bool(vq.get("use_l2_norm", False)),
            is_legacy=is_legacy,
            encoder=size("vit_enc_model_size"),
            decoder=size("vit_dec_model_size"),
            pixel_decoder=pixel_decoder,
            pixel_codebook=pixel_codebook,
        )


def _param(*shape: int, scale: float) -> nn.Parameter:
    return nn.Parameter(scale * torch.randn(*shape))


class TiTokEncoder(nn.Module):
    """[cls, patches, latent tokens] through a ViT; the latent rows become [B,token_size,1,N]."""

    def __init__(self, cfg: TiTokConfig):
        super().__init__()
        w, self.is_legacy = cfg.encoder.width, cfg.is_legacy
        self.grid = cfg.image_size // cfg.enc_patch_size
        self.num_latent_tokens, self.token_size = cfg.num_latent_tokens, cfg.token_size
        scale = w**-0.5
        self.patch_embed = nn.Conv2d(3, w, cfg.enc_patch_size, stride=cfg.enc_patch_size)
        self.class_embedding = _param(1, w, scale=scale)
        self.positional_embedding = _param(self.grid**2 + 1, w, scale=scale)
        self.latent_token_positional_embedding = _param(cfg.num_latent_tokens, w, scale=scale)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(
            ResidualAttentionBlock(w, cfg.encoder.num_heads, cfg.encoder.mlp_ratio) for _ in range(cfg.encoder.num_layers)
        )
        self.ln_post = nn.LayerNorm(w)
        self.conv_out = nn.Conv2d(w, cfg.token_size, 1)

    def latent_rows(self, pixels: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """ln_post output at the latent-token positions, [B,N,W]."""
        b = pixels.shape[0]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(b, -1, -1), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        lat = (latent_tokens + self.latent_token_positional_embedding).to(x.dtype).expand(b, -1, -1)
        x = self.ln_pre(torch.cat([x, lat], dim=1))
        for blk in self.transformer:
            x = blk(x)
        return self.ln_post(x[:, 1 + self.grid**2 :])

    def forward(self, pixels: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        rows = self.latent_rows(pixels, latent_tokens)
        b, n, w = rows.shape
        if self.is_legacy:
            grid = rows.reshape(b, w, n, 1)  # the released models' reshape (not a transpose)
        else:
            grid = rows.transpose(1, 2).unsqueeze(-1)
        return self.conv_out(grid).reshape(b, self.token_size, 1, n)


class TiTokDecoder(nn.Module):
    """Latent tokens + g*g mask tokens through a ViT; mask rows become logits or pixels."""

    def __init__(self, cfg: TiTokConfig):
        super().__init__()
        w = cfg.decoder.width
        self.width, self.is_legacy, self.patch = w, cfg.is_legacy, cfg.dec_patch_size
        self.grid = cfg.image_size // cfg.dec_patch_size
        scale = w**-0.5
        self.decoder_embed = nn.Linear(cfg.token_size, w)
        self.class_embedding = _param(1, w, scale=scale)
        self.positional_embedding = _param(self.grid**2 + 1, w, scale=scale)
        self.mask_token = _param(1, 1, w, scale=scale)
        self.latent_token_positional_embedding = _param(cfg.num_latent_tokens, w, scale=scale)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(
            ResidualAttentionBlock(w, cfg.decoder.num_heads, cfg.decoder.mlp_ratio) for _ in range(cfg.decoder.num_layers)
        )
        self.ln_post = nn.LayerNorm(w)
        if cfg.is_legacy:
            self.ffn = nn.Sequential(nn.Conv2d(w, 2 * w, 1), nn.Tanh(), nn.Conv2d(2 * w, 1024, 1))
            self.conv_out = nn.Identity()
        else:
            self.ffn = nn.Sequential(nn.Conv2d(w, self.patch * self.patch * 3, 1))
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def patch_rows(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,1,N] -> ln_post output at the g*g mask-token positions, [B,g*g,W]."""
        x = self.decoder_embed(z.flatten(1, 2).transpose(1, 2))
        b, n, _ = x.shape
        masks = self.mask_token.to(x.dtype).expand(b, self.grid**2, -1)
        masks = torch.cat([self.class_embedding.to(x.dtype).expand(b, -1, -1), masks], dim=1)
        masks = masks + self.positional_embedding.to(x.dtype)
        x = x + self.latent_token_positional_embedding[:n].to(x.dtype)
        x = self.ln_pre(torch.cat([masks, x], dim=1))
        for blk in self.transformer:
            x = blk(x)
        return self.ln_post(x[:, 1 : 1 + self.grid**2])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rows = self.patch_rows(z)
        b, g, p = rows.shape[0], self.grid, self.patch
        x = self.ffn(rows.transpose(1, 2).reshape(b, self.width, g, g))
        if not self.is_legacy:  # channels ordered (p1, p2, c) -> image
            x = x.reshape(b, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(b, 3, g * p, g * p)
        return self.conv_out(x)


class VectorQuantizer(nn.Module):
    """Nearest-code lookup (optionally on l2-normalised vectors), always in float32."""

    def __init__(self, codebook_size: int, token_size: int, use_l2_norm: bool):
        super().__init__()
        self.use_l2_norm = use_l2_norm
        self.embedding = nn.Embedding(codebook_size, token_size)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.use_l2_norm else w

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,1,N] -> ids [B,N] (the official squared-distance expansion, argmin)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            b = z.shape[0]
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            if self.use_l2_norm:
                flat = F.normalize(flat, dim=-1)
            e = self.codebook()
            d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
            return d.argmin(dim=1).view(b, -1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B,N] -> codebook vectors as the decoder input [B,C,1,N]."""
        return F.embedding(ids, self.codebook()).permute(0, 2, 1).unsqueeze(2)


class TiTok(ImageTokenizer):
    family = "titok"
    ordered = False
    decoder_prefixes = ("decoder.", "pixel_quantize.", "pixel_decoder.")

    def __init__(self, cfg: TiTokConfig, parts: str = "all"):
        super().__init__()
        self.cfg = cfg
        self.num_tokens, self.codebook_size, self.image_size = cfg.num_latent_tokens, cfg.codebook_size, cfg.image_size
        self.latent_tokens = _param(cfg.num_latent_tokens, cfg.encoder.width, scale=cfg.encoder.width**-0.5)
        self.encoder = TiTokEncoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.token_size, cfg.use_l2_norm)
        self.has_decoder = parts == "all"
        if self.has_decoder:
            self.decoder = TiTokDecoder(cfg)
            if cfg.pixel_decoder is not None:
                self.pixel_quantize = PixelQuantizer(*cfg.pixel_codebook)
                self.pixel_decoder = PixelDecoder(cfg.pixel_decoder)

    @classmethod
    def from_config(cls, config: dict, parts: str = "all") -> "TiTok":
        return cls(TiTokConfig.from_dict(config), parts=parts)

    def _check_images(self, images: torch.Tensor) -> None:
        r = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, r, r):
            raise ValueError(f"expected images [B,3,{r},{r}], got {tuple(images.shape)}")

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,R,R] in [0,1] -> pre-quantisation latent [B,C,1,N]."""
        self._check_images(images)
        return self.encoder(images, self.latent_tokens)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encode_latent(images))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder input [B,C,1,N] -> pixels [B,3,R,R] (unclamped)."""
        if (why := self.decode_unavailable) is not None:
            raise RuntimeError(why)
        x = self.decoder(z)
        if self.cfg.pixel_decoder is not None:
            x = self.pixel_decoder(self.pixel_quantize.mix(x))
        return x

    @property
    def decode_unavailable(self) -> str | None:
        if self.has_decoder and not self.cfg.decodes_pixels:
            return ("this is a stage-1 TiTok (is_legacy=true, finetune_decoder=false): its decoder predicts logits over "
                    "MaskGIT-VQGAN proxy codes, not pixels, and decoding them needs the separate MaskGIT-VQGAN; "
                    "its token ids (encode) are exact, use the released two-stage checkpoint to decode")
        return super().decode_unavailable

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(ids.shape[0], -1).long()
        if ids.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} ids per image, got {ids.shape[1]}")
        return self.decode_latent(self.quantize.lookup(ids))
