"""Training loop: masked token modelling on pretokenized batches, step-based, resumable.

Every step draws its randomness (masking, class drop, dropout) from a seed derived from
``(seed, step)`` inside a forked RNG, and the data position (epoch, batches consumed) is part of the
checkpoint, so a resumed run repeats exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint
from .masking import drop_classes, masked_token_loss, random_masking
from .model import MaskGITTransformer


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 2e-4                  # peak, after linear warmup; cosine decay to end_lr
    end_lr: float = 1e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.03        # on matrices (not biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.96)
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.1
    unmasked_weight: float = 0.1      # loss weight of unmasked positions (masked: 1)
    seed: int = 0
    save_every: int = 1000
    num_workers: int = 0              # DataLoader worker processes

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@contextmanager
def _step_rng(seed: int, step: int, device: torch.device):
    """Global RNG seeded from (seed, step) for the block; the caller's RNG state is restored."""
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]))
        yield


def train_step(
    model: MaskGITTransformer,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    step: int,
    cfg: TrainConfig,
) -> dict[str, float]:
    """One optimizer step on a batch (tokens int64 [B,N], labels int64 [B]) on the model's device."""
    device = tokens.device
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with _step_rng(cfg.seed, step, device):
        inputs, mask = random_masking(tokens, model.config.mask_id)
        drop = drop_classes(labels, model.config.class_dropout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inputs, labels, drop)
        loss, accuracy = masked_token_loss(logits, tokens, mask, cfg.label_smoothing, cfg.unmasked_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    return {"loss": loss.item(), "accuracy": accuracy.item(), "lr": lr, "grad_norm": grad_norm.item()}


def epoch_batches(
    loader: IterableDataset, start: TrainState, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Endless ``(epoch, batches consumed in it, tokens, labels)`` from ``start``'s position.

    ``loader`` yields (tokens, labels) batches and has ``set_epoch`` (``pipeline.tokens.TokenLoader``).
    """
    epoch, skip = start.epoch, start.batch
    while True:
        loader.set_epoch(epoch)
        batches = DataLoader(loader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        seen = 0
        for i, (tokens, labels) in enumerate(batches):
            seen += 1
            if i >= skip:
                yield epoch, i + 1, tokens, labels
        if seen == 0:
            raise RuntimeError(f"the token loader yielded no batch in epoch {epoch} (fewer rows than a batch?)")
        epoch, skip = epoch + 1, 0


def fit(
    model: MaskGITTransformer,
    loader: IterableDataset,
    cfg: TrainConfig,
    ckpt_dir: str,
    *,
    resume: bool = False,
    metadata: dict | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train until ``cfg.steps`` optimizer steps; checkpoint every ``save_every`` and at the end.

    With ``resume`` and a checkpoint in ``ckpt_dir``, continue from it (weights, optimizer,
    step, data position); the continuation is exact when the loader (seed, batch size, shards)
    and ``num_workers`` are unchanged. ``metadata`` is stored in the checkpoint's config.json.
    """
    device = torch.device(device)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    state = load_checkpoint(ckpt_dir, model, optimizer) if resume and has_checkpoint(ckpt_dir) else TrainState()
    meta = {"train": cfg.to_dict(), **(metadata or {})}
    batches = epoch_batches(loader, state, cfg.num_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", disable=not progress)
    try:
        while state.step < cfg.steps:
            state.epoch, state.batch, tokens, labels = next(batches)
            metrics = train_step(
                model, optimizer, tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                state.step, cfg,
            )
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}", lr=f"{metrics['lr']:.2e}")
            if log is not None:
                log(state.step, metrics)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                save_checkpoint(ckpt_dir, model, optimizer, state, meta)
    finally:
        batches.close()  # stops DataLoader workers
        bar.close()
    return state
