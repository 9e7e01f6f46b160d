"""MaskGIT training inputs and loss: arccos masking schedule, class dropout, smoothed token loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def arccos_mask_ratio(t: torch.Tensor | float) -> torch.Tensor:
    """Fraction of tokens masked at time ``t`` in [0,1]: 1 at t=0, 0 at t=1 (mean 2/pi)."""
    return torch.arccos(torch.as_tensor(t)) / (math.pi / 2)


def random_masking(tokens: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``round(N * arccos_ratio(t))`` (at least 1) random positions per row, t ~ U(0,1).

    Uses the global RNG of ``tokens.device``. Returns (masked ids, bool mask [B,N], true = masked).
    """
    b, n = tokens.shape
    t = torch.rand(b, device=tokens.device)
    num_masked = (n * arccos_mask_ratio(t).clamp(1e-6, 1.0)).round().clamp(min=1)
    ranks = torch.rand(b, n, device=tokens.device).argsort(dim=1)
    mask = ranks < num_masked[:, None]
    return torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask


def drop_classes(labels: torch.Tensor, prob: float) -> torch.Tensor:
    """Bool [B]: which samples get the class-drop token (classifier-free guidance training)."""
    return torch.rand(labels.shape, device=labels.device) < prob


def masked_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross entropy over all positions, masked ones weight 1, the others
    ``unmasked_weight`` (official TiTok generator: 0.1), normalised by the weight sum.

    Returns (loss, accuracy on masked positions).
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, label_smoothing=label_smoothing, reduction="none")
    weights = torch.where(mask, 1.0, unmasked_weight).to(ce.dtype)
    loss = (ce * weights).sum() / weights.sum()
    with torch.no_grad():
        accuracy = ((logits.argmax(-1) == targets) & mask).sum() / mask.sum().clamp(min=1)
    return loss, accuracy
