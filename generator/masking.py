"""MaskGIT training inputs and loss: arccos masking schedule and class drops per global batch, smoothed token loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def arccos_mask_ratio(t: torch.Tensor | float) -> torch.Tensor:
    """Fraction of tokens masked at time ``t`` in [0,1]: 1 at t=0, 0 at t=1 (mean 2/pi)."""
    return torch.arccos(torch.as_tensor(t)) / (math.pi / 2)


def global_batch_noise(
    seed: int, total: int, num_tokens: int, rows: slice, class_dropout: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mask bool [R,N], class drop bool [R], masked positions in the whole batch) for ``rows`` of a
    global batch of ``total`` rows, drawn on the CPU from ``seed`` for the whole batch: a row's noise
    depends on its place in the global batch only, not on which rank holds it."""
    g = torch.Generator().manual_seed(seed)
    t, scores, drop = torch.rand(total, generator=g), torch.rand(total, num_tokens, generator=g), \
        torch.rand(total, generator=g)
    num_masked = (num_tokens * arccos_mask_ratio(t).clamp(1e-6, 1.0)).round().clamp(min=1)
    mask = scores[rows].argsort(dim=1) < num_masked[rows, None]
    return mask, drop[rows] < class_dropout, int(num_masked.sum())


def token_loss_sums(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted cross-entropy sum, correct masked predictions) of a batch. Cross entropy is
    label-smoothed over all positions, masked ones weight 1, the others ``unmasked_weight`` (official
    TiTok generator: 0.1); the loss is the sum over the global batch divided by its weight sum and
    the accuracy the correct count divided by the masked count, both summed
    over ranks and micro-batches first."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, label_smoothing=label_smoothing, reduction="none")
    weighted = (ce * torch.where(mask, 1.0, unmasked_weight).to(ce.dtype)).sum()
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) & mask).sum()
    return weighted, correct
