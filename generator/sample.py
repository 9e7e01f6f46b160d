"""MaskGIT sampling as in the official TiTok generator: arccos unmasking schedule, classifier-free
guidance with a schedule, Gumbel-randomised choice and confidence with an annealed temperature."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import MaskGITTransformer

SCHEDULES = ("constant", "linear", "power-cosine")


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 8
    guidance_scale: float = 3.0
    guidance_schedule: str = "constant"   # one of SCHEDULES
    guidance_power: float = 3.0           # exponent of the power-cosine schedule
    temperature: float = 4.5              # Gumbel noise scale at step 0, annealed linearly to 0
    softmax_annealing: bool = False       # divide logits by 0.5 + 0.8 (1 - progress)

    def __post_init__(self) -> None:
        if self.guidance_schedule not in SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {SCHEDULES}, not {self.guidance_schedule!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, not {self.num_steps}")

    @classmethod
    def from_official(cls, generator: dict) -> "SamplerConfig":
        """Defaults from an official ``model.generator`` config block (interpolations resolved), as the
        official ``sample_imagenet_titok.py`` uses them: it always anneals the softmax temperature."""
        return cls(
            num_steps=generator.get("num_steps", cls.num_steps),
            guidance_scale=generator.get("guidance_scale", cls.guidance_scale),
            guidance_schedule=generator.get("guidance_decay", cls.guidance_schedule),
            guidance_power=generator.get("guidance_scale_pow", cls.guidance_power),
            temperature=generator.get("randomize_temperature", cls.temperature),
            softmax_annealing=generator.get("softmax_temperature_annealing", True),
        )


def guidance_weight(step: int, cfg: SamplerConfig) -> float:
    """w in ``logits = cond + w (cond - uncond)`` at ``step`` (0-based), as the official code:

    * constant: w = s
    * linear: w = s * step / T (0 at the first step)
    * power-cosine (MDT): the official mixes ``uncond + g (cond - uncond)`` with
      ``g = 1 + (s - 1)(1 - cos(pi (step/T)^p)) / 2``, i.e. w = g - 1.
    """
    s, t = cfg.guidance_scale, cfg.num_steps
    if cfg.guidance_schedule == "constant":
        return s
    if cfg.guidance_schedule == "linear":
        return s * step / t
    return (s - 1.0) * (1.0 - math.cos(math.pi * (step / t) ** cfg.guidance_power)) / 2.0


def _gumbel(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    neg_log_u = -torch.log(torch.rand(shape, device=device, generator=generator).clamp(min=1e-20))
    return -torch.log(neg_log_u.clamp(min=1e-20))


@torch.no_grad()
def generate(
    model: MaskGITTransformer,
    labels: torch.Tensor,
    cfg: SamplerConfig = SamplerConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class indices [B] -> token ids int64 [B,N] in [0, C), no mask id left.

    Step k of T (progress r = (k+1)/T): predict all positions, sample ids for the masked ones
    with Gumbel noise of scale ``temperature (1 - r)``, then re-mask the
    ``floor(N arccos(r) / (pi/2))`` least confident of them (at least 1, at most all but one);
    the last step keeps everything. Runs in eval mode (restored afterwards); RNG from
    ``generator`` (on the model's device) or the global one.
    """
    mc = model.config
    device = labels.device
    ids = torch.full((labels.shape[0], mc.num_tokens), mc.mask_id, dtype=torch.long, device=device)
    all_dropped = torch.ones_like(labels, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        for step in range(cfg.num_steps):
            progress = (step + 1) / cfg.num_steps
            temp = cfg.temperature * (1.0 - progress)
            is_mask = ids == mc.mask_id
            w = guidance_weight(step, cfg)
            if w != 0:  # conditional and unconditional predictions in one batch
                drop = torch.cat([torch.zeros_like(labels, dtype=torch.bool), all_dropped])
                cond, uncond = model(ids.repeat(2, 1), labels.repeat(2), drop).float().chunk(2)
                logits = cond + w * (cond - uncond)
            else:
                logits = model(ids, labels).float()
            if cfg.softmax_annealing:
                logits = logits / (0.5 + 0.8 * (1.0 - progress))
            sampled = (logits + temp * _gumbel(logits.shape, device, generator)).argmax(-1)
            sampled_logits = logits.gather(-1, sampled[..., None])[..., 0]
            sampled = torch.where(is_mask, sampled, ids)
            if step == cfg.num_steps - 1:
                ids = sampled
                break
            confidence = torch.where(is_mask, sampled_logits, torch.inf)
            confidence = confidence + temp * _gumbel(confidence.shape, device, generator)
            target = math.floor(mc.num_tokens * math.acos(progress) / (math.pi / 2))
            num_masked = (is_mask.sum(-1, keepdim=True) - 1).clamp(max=target).clamp(min=1)
            cutoff = confidence.sort(dim=-1).values.gather(-1, num_masked - 1)
            ids = torch.where(confidence <= cutoff, mc.mask_id, sampled)
    finally:
        model.train(was_training)
    return ids
