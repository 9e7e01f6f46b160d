"""Bidirectional masked token transformer (MaskGIT), class-conditional with a class-drop token.

Token layout of the official TiTok generator (``ImageBert``), vocabulary ``C + K + 2``:
``0..C-1`` image codes, ``C`` mask, ``C+1..C+K`` classes ``0..K-1``, ``C+K+1`` dropped class
(unconditional, for classifier-free guidance). The class token is prepended at position 0; the head
predicts C code logits for the N image positions.

Module and parameter names follow ``transformers.BertModel`` (post-LayerNorm blocks, eps 1e-12,
exact GELU, learned absolute positions, token-type row 0 added everywhere) with the head at
``model.lm_head``, so state dicts of the official ``generator_titok_{l32,b64}`` load as they are.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.interpolation import resolve_interpolations

LAYER_NORM_EPS = 1e-12
INIT_STD = 0.02


@dataclass(frozen=True)
class GeneratorConfig:
    codebook_size: int                 # C
    num_tokens: int                    # N image tokens per sample
    num_classes: int                   # K
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_dim: int | None = None         # default 4 x width
    dropout: float = 0.1               # hidden dropout
    attn_dropout: float = 0.1
    class_dropout: float = 0.1         # training-time probability of the drop token

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        for name in ("codebook_size", "num_tokens", "num_classes", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def drop_id(self) -> int:
        return self.codebook_size + self.num_classes + 1

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 2

    @property
    def intermediate(self) -> int:
        return self.mlp_dim or 4 * self.width

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_official(cls, config: dict) -> "GeneratorConfig":
        """From an official TiTok generator config (``model.vq_model`` + ``model.generator``) as
        published: ``${...}`` interpolations (``image_seq_len``) are resolved as dotted lookups."""
        config = resolve_interpolations(config)
        try:
            gen, vq = config["model"]["generator"], config["model"]["vq_model"]
            if gen.get("model_type", "ViT") != "ViT":
                raise ValueError(f"generator model_type {gen['model_type']!r} (UViTBert) is not supported; only ViT")
            return cls(
                codebook_size=vq["codebook_size"],
                num_tokens=gen["image_seq_len"],
                num_classes=gen["condition_num_classes"],
                width=gen["hidden_size"],
                depth=gen["num_hidden_layers"],
                heads=gen["num_attention_heads"],
                mlp_dim=gen["intermediate_size"],
                dropout=gen["dropout"],
                attn_dropout=gen["attn_drop"],
                class_dropout=gen["class_label_dropout"],
            )
        except KeyError as e:
            raise ValueError(f"official generator config lacks {e} (model.generator / model.vq_model)") from None


def _layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=LAYER_NORM_EPS)


class _Embeddings(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.num_tokens + 1, cfg.width)
        self.token_type_embeddings = nn.Embedding(2, cfg.width)  # only row 0 is used, as in BertModel
        self.LayerNorm = _layer_norm(cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.LayerNorm(x + self.token_type_embeddings.weight[0]))


class _SelfAttention(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.heads, self.p = cfg.heads, cfg.attn_dropout
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        self.value = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, w)


class _Residual(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): BERT's SelfOutput / Output."""

    def __init__(self, d_in: int, cfg: GeneratorConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.width)
        self.LayerNorm = _layer_norm(cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _Residual(cfg.width, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _Residual(cfg.intermediate, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class _Bert(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.lm_head = nn.Linear(cfg.width, cfg.codebook_size)


class MaskGITTransformer(nn.Module):
    """``forward(ids [B,N], labels [B], drop [B] bool | None) -> logits float [B,N,C]``.

    ``ids`` hold codes or the mask id; ``labels`` are class indices 0..K-1; where ``drop`` is
    true the class token is replaced by the drop token (unconditional).
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.config = cfg
        self.model = _Bert(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=INIT_STD)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def condition_tokens(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        cond = labels + cfg.codebook_size + 1
        if drop is not None:
            cond = torch.where(drop, torch.full_like(cond, cfg.drop_id), cond)
        return cond

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([self.condition_tokens(labels, drop)[:, None], ids], dim=1)
        h = self.model.encoder(self.model.embeddings(x))
        return self.model.lm_head(h[:, 1:])
