"""The interface every image tokenizer in pretok implements."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class ImageTokenizer(nn.Module):
    """A 1D image tokenizer: images in [0,1] -> integer ids [B,N], ids -> images.

    Subclasses set the attributes below in ``__init__`` and implement ``encode`` /
    ``decode_tokens``. ``fingerprint`` is filled in by :func:`tokenizer.load_tokenizer`.
    """

    family: ClassVar[str] = ""            # "titok" | "flextok"
    ordered: ClassVar[bool] = False       # True when every id prefix is a valid coarser code
    # State-dict key prefixes only the decoder needs; an encoder-only load skips them.
    decoder_prefixes: ClassVar[tuple[str, ...]] = ()

    num_tokens: int
    codebook_size: int
    image_size: int
    fingerprint: str = ""
    has_decoder: bool = True

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] -> int64 [B,N]."""
        raise NotImplementedError

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [B,N] -> float [B,3,H,W] (roughly [0,1], not clamped)."""
        raise NotImplementedError

    @property
    def decode_unavailable(self) -> str | None:
        """Why ``decode_tokens`` cannot run on this instance; None when it can."""
        return None if self.has_decoder else "this tokenizer was loaded encoder-only (parts='encoder'); it cannot decode"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_uint8(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Pipeline fast path: uint8 [B,3,H,W] (any device) -> uint16 [B,N] on the CPU.

        The uint8 batch is moved to the model's device before the /255, so host->device
        traffic is 4x smaller than float input. ``precision="bf16"`` runs the network under
        bf16 autocast; the nearest-code search stays in float32.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
        if self.codebook_size > 2**16:
            raise OverflowError(f"a codebook of {self.codebook_size} ids does not fit uint16")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
        device = self.device
        x = images.to(device, non_blocking=True).float().div_(255.0)
        with torch.inference_mode(), torch.autocast(
            device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
        ):
            ids = self.encode(x)
        return ids.to(torch.int32).cpu().to(torch.uint16)
