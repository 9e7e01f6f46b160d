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
    mask = torch.rand(b, n, device=tokens.device).argsort(dim=1) < num_masked[:, None]
    return torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask


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


def loss_weights(mask: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    return torch.where(mask, 1.0, unmasked_weight)


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
    weighted, correct = token_loss_sums(logits, targets, mask, label_smoothing, unmasked_weight)
    return weighted / loss_weights(mask, unmasked_weight).sum(), correct / mask.sum().clamp(min=1)


def token_loss_sums(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted cross-entropy sum, correct masked predictions) of a batch: the numerators of
    ``masked_token_loss``, to be summed over ranks and micro-batches before dividing."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, label_smoothing=label_smoothing, reduction="none")
    weighted = (ce * loss_weights(mask, unmasked_weight).to(ce.dtype)).sum()
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) & mask).sum()
    return weighted, correct
