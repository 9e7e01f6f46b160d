"""Training loop of one rank (world size 1: the plain local run): masked token modelling on global batches.

What a step computes does not depend on the world size W: the loader deals rank r the rows
``[r G/W, (r+1) G/W)`` of global batch k (``pipeline.tokens.StreamLoader``), the masks and class
drops of all G rows are drawn from ``(seed, step)`` and each rank takes its rows, and the loss is
the exact global-batch mean (every rank divides its weighted sum by the global weight sum, DDP sums
the gradients). Only dropout noise (drawn per rank and micro-batch from ``(seed, step, rank, i)``)
and float summation order change with W; with dropout 0, runs on any W dividing the data streams
follow the same curve up to rounding. All randomness derives from seeds and the step, so a checkpoint
(weights, EMA, optimizer, data position) is the whole state: a resumed run, on any W, continues exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.tokens import StreamLoader, TokenFiles, tokens_array

from .checkpoint import FORMAT
from .masking import global_batch_noise, token_loss_sums
from .model import GeneratorConfig, MaskGITTransformer
from .run import RunDir, TrainState, optimizer_state_dict

LOADERS = ("tokens", "ray-data")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 64              # per worker and micro-batch
    grad_accum: int = 1               # micro-batches per step
    data_streams: int = 64            # logical streams of the data order (a multiple of the world size)
    lr: float = 2e-4                  # peak, after linear warmup; cosine decay to end_lr
    end_lr: float = 1e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.03        # on matrices (not biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.96)
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.1
    unmasked_weight: float = 0.1      # loss weight of unmasked positions (masked: 1)
    ema_decay: float = 0.999          # per step, warmed up as min(decay, (1 + step) / (10 + step))
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 2         # step folders kept in CKPT
    val_every: int = 0                # 0: no validation
    val_batches: int = 4              # global batches of the held-out data per validation
    num_workers: int = 0              # DataLoader worker processes per rank

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataSpec:
    """Where the tokens come from: a split of a pretok output, with an optional held-out part."""

    out: str
    split: str = "train"
    storage_options: dict | None = field(default=None, repr=False)
    max_tokens: int | None = None
    buffer_shards: int | None = None
    loader: str = "tokens"            # one of LOADERS
    val_split: str | None = None      # a held-out split, or
    val_fraction: float = 0.0         # this fraction of the split's shards held out (at least one)

    def open(self) -> tuple[TokenFiles, TokenFiles | None]:
        """(training shards, validation shards or None)."""
        files = TokenFiles.open(self.out, self.split, self.storage_options)
        if self.val_split is not None:
            return files, TokenFiles.open(self.out, self.val_split, self.storage_options)
        if self.val_fraction <= 0:
            return files, None
        n = len(files.files)
        held = max(1, round(self.val_fraction * n))
        if held >= n:
            raise ValueError(f"holding out {held} of {n} shards leaves none to train on (lower --val-fraction)")
        order = np.random.default_rng(0).permutation(n)  # fixed: the held-out shards do not move with --seed
        return files.subset(order[held:]), files.subset(order[:held])


@dataclass(frozen=True)
class TrainJob:
    """Everything a rank needs; picklable (it travels to Ray Train workers)."""

    model: GeneratorConfig
    train: TrainConfig
    data: DataSpec
    ckpt: str
    metadata: dict                    # stored in config.json: tokenizer, label names, ...
    ckpt_options: dict | None = field(default=None, repr=False)
    device: str | None = None         # None: the Ray Train device, else cuda when available
    progress: bool = True
    mid_step: Callable[[int, int], None] | None = None  # (step, rank) after the backward pass (drills)


@dataclass
class World:
    """This process's place in the run: rank, world size, device, how metrics are reported."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None
    report: Callable[[dict], None] | None = None
    in_ray_train: bool = False

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(t)
        return t

    def all_gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out


def run_config(job: TrainJob, world_size: int) -> dict:
    """config.json of the run's checkpoints."""
    train = {**job.train.to_dict(), "world_size": world_size, "global_batch": job.train.global_batch(world_size),
             "loader": job.data.loader}
    return {"format": FORMAT, "generator": job.model.to_dict(), "train": train, "data": job.metadata}


# What must match for a resume to continue the same run (the schedule, steps and cadence may change).
_IDENTITY = {
    "generator": None,
    "data": ("tokenizer", "split", "max_tokens", "val_shards"),
    "train": ("seed", "data_streams", "global_batch", "loader", "label_smoothing", "unmasked_weight"),
}


def resume_problems(saved: dict, new: dict) -> list[str]:
    """Why ``new`` (a ``run_config``) cannot continue the run whose config is ``saved``; empty if it can."""
    problems = []
    for section, keys in _IDENTITY.items():
        a, b = saved.get(section, {}), new.get(section, {})
        for key in keys or sorted(set(a) | set(b)):
            if a.get(key) == b.get(key):
                continue
            if key == "tokenizer":
                fa, fb = ((x.get(key) or {}).get("fingerprint", "?")[:12] for x in (a, b))
                problems.append(f"another tokenizer: fingerprint {fa}... in CKPT, {fb}... in the data")
            else:
                problems.append(f"{section}.{key}: {a.get(key)!r} in CKPT, {b.get(key)!r} now")
    return problems


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


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


class Ema:
    """Exponential moving average of a model's weights, held in a model of the same shape."""

    def __init__(self, model: MaskGITTransformer, decay: float):
        self.decay = decay
        self.model = MaskGITTransformer(model.config).to(next(model.parameters()).device)
        self.model.load_state_dict(model.state_dict())
        self.model.eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - self.decay_at(step))


@contextlib.contextmanager
def _dropout_rng(seed: int, device: torch.device):
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    step: int,
    cfg: TrainConfig,
    world: World,
    mid_step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """One optimizer step on this rank's rows of the global batch (tokens int64 [G/W,N], labels [G/W])."""
    gen_cfg: GeneratorConfig = getattr(model, "module", model).config
    device = tokens.device
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    local, n = tokens.shape
    total = local * world.size
    rows = slice(world.rank * local, (world.rank + 1) * local)
    mask, drop, masked = global_batch_noise(seed_of(cfg.seed, 0, step), total, n, rows, gen_cfg.class_dropout)
    mask, drop = mask.to(device), drop.to(device)
    weight = masked + cfg.unmasked_weight * (total * n - masked)  # the global batch's loss weight sum
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    optimizer.zero_grad(set_to_none=True)
    chunks = list(torch.arange(local).split(cfg.batch_size))
    for i, idx in enumerate(chunks):
        sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), \
                _dropout_rng(seed_of(cfg.seed, 1, step, world.rank, i), device):
            x, m = tokens[idx], mask[idx]
            inputs = torch.where(m, torch.full_like(x, gen_cfg.mask_id), x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(inputs, labels[idx], drop[idx])
            weighted, correct = token_loss_sums(logits, x, m, cfg.label_smoothing, cfg.unmasked_weight)
            (weighted * (world.size / weight)).backward()  # DDP averages over ranks: the sum / weight remains
        sums += torch.stack([weighted.detach().double(), correct.double()])
    if mid_step is not None:
        mid_step(step + 1, world.rank)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    sums = world.all_reduce(sums).tolist()
    return {"loss": sums[0] / weight, "accuracy": sums[1] / masked, "lr": lr, "grad_norm": float(grad_norm)}


@torch.no_grad()
def evaluate(model: MaskGITTransformer, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
             world: World) -> tuple[float, float]:
    """(loss, masked-token accuracy) over fixed held-out global batches, class-conditional, no dropout."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)
    weight = masked_total = 0.0
    for i, (tokens, labels) in enumerate(batches):
        local, n = tokens.shape
        total = local * world.size
        rows = slice(world.rank * local, (world.rank + 1) * local)
        mask, _, masked = global_batch_noise(seed_of(cfg.seed, 2, i), total, n, rows, 0.0)
        mask = mask.to(tokens.device)
        inputs = torch.where(mask, torch.full_like(tokens, model.config.mask_id), tokens)
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.device.type == "cuda"):
            logits = model(inputs, labels)
        weighted, correct = token_loss_sums(logits, tokens, mask, cfg.label_smoothing, cfg.unmasked_weight)
        sums += torch.stack([weighted.double(), correct.double()])
        weight += masked + cfg.unmasked_weight * (total * n - masked)
        masked_total += masked
    model.train(was_training)
    sums = world.all_reduce(sums).tolist()
    return sums[0] / weight, sums[1] / masked_total


def step_batches(loader: StreamLoader, state: TrainState, num_workers: int, pin_memory: bool
                 ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Endless ``(epoch, global batches consumed in it, tokens, labels)`` from ``state``'s position;
    with DataLoader workers, each step's parts (one per worker, in worker order) are joined."""
    epoch, skip = state.epoch, state.batch
    parts = max(1, num_workers)
    while True:
        loader.set_epoch(epoch, skip)
        items = iter(DataLoader(loader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory))
        for i in range(skip, loader.steps_per_epoch):
            got = [next(items) for _ in range(parts)]
            yield epoch, i + 1, torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
        epoch, skip = epoch + 1, 0


def ray_data_batches(iterator_for: Callable[[int], object], state: TrainState, local_batch: int, seed: int,
                     rank: int, num_tokens: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The same from a Ray Data iterator (``iterator_for(epoch)``: this rank's DataIterator): pyarrow
    batches, one random view per row. Ray Data decides the order; a resume skips ``state.batch`` batches."""
    epoch, skip = state.epoch, state.batch
    while True:
        it = iterator_for(epoch)
        seen = 0
        batches = it.iter_batches(batch_size=local_batch, batch_format="pyarrow", drop_last=True,
                                  local_shuffle_buffer_size=4 * local_batch, local_shuffle_seed=seed_of(seed, 3, epoch))
        for i, table in enumerate(batches):
            seen += 1
            if i < skip:
                continue
            views = tokens_array(table.column("tokens"))
            pick = np.random.default_rng([seed, epoch, rank, i]).integers(views.shape[1], size=len(views))
            tokens = torch.from_numpy(views[np.arange(len(views)), pick, :num_tokens].astype(np.int64))
            yield epoch, i + 1, tokens, torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
        if seen == 0:
            raise RuntimeError(f"the Ray Data loader gave no batch of {local_batch} rows in epoch {epoch}")
        epoch, skip = epoch + 1, 0


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _device(job: TrainJob, world: World) -> torch.device:
    if world.device is not None:
        return world.device
    return torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _batches(job: TrainJob, world: World, state: TrainState, files: TokenFiles, device: torch.device):
    cfg = job.train
    if job.data.loader == "ray-data":
        from .ray_data import iterator_factory

        return ray_data_batches(iterator_factory(job, world), state, cfg.batch_size * cfg.grad_accum, cfg.seed,
                                world.rank, job.model.num_tokens)
    loader = StreamLoader(files, cfg.global_batch(world.size), cfg.data_streams, seed=cfg.seed, rank=world.rank,
                          world_size=world.size, max_tokens=job.data.max_tokens, buffer_shards=job.data.buffer_shards)
    workers = min(cfg.num_workers, len(loader.rank_streams()))
    return step_batches(loader, state, workers, pin_memory=device.type == "cuda")


def _val_batches(job: TrainJob, world: World, files: TokenFiles | None, device: torch.device):
    cfg = job.train
    if files is None or cfg.val_every <= 0:
        return []
    loader = StreamLoader(files, cfg.global_batch(world.size), cfg.data_streams, seed=cfg.seed, rank=world.rank,
                          world_size=world.size, max_tokens=job.data.max_tokens)
    out = []
    for tokens, labels in loader:
        out.append((tokens.to(device), labels.to(device)))
        if len(out) == cfg.val_batches:
            break
    return out


def check_data(job: TrainJob, world_size: int) -> None:
    """Fail before any worker starts when the data cannot make the job's global batches."""
    if job.data.loader == "tokens":
        files, val = job.data.open()
        cfg = job.train
        for part in (files, val) if val is not None and cfg.val_every > 0 else (files,):
            StreamLoader(part, cfg.global_batch(world_size), cfg.data_streams, world_size=world_size,
                         max_tokens=job.data.max_tokens)


def fit(job: TrainJob, world: World | None = None) -> TrainState:
    """Train this rank until ``job.train.steps``; rank 0 commits to ``job.ckpt`` every ``save_every``
    steps and at the end. An existing commit in ``job.ckpt`` is resumed (the caller checks it belongs
    to this run: ``resume_problems``)."""
    world = world or World()
    cfg = job.train
    device = world.device = _device(job, world)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = MaskGITTransformer(job.model).to(device).train()
    optimizer = build_optimizer(model, cfg)
    ema = Ema(model, cfg.ema_decay)
    run = RunDir(job.ckpt, job.ckpt_options)
    state, latest = TrainState(), run.latest()
    if latest is not None:
        folder = latest["dir"]
        model.load_state_dict(run.load_tensors(folder, "model.safetensors"))
        ema.model.load_state_dict(run.load_tensors(folder, "ema.safetensors"))
        optimizer.load_state_dict(optimizer_state_dict(run.read_bytes(folder, "optimizer.safetensors"), folder))
        saved = run.read_json(folder, "state.json")
        state = TrainState(**{k: saved[k] for k in asdict(TrainState())})
    ddp = model
    if world.size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    files, val_files = job.data.open()
    batches = _batches(job, world, state, files, device)
    val = _val_batches(job, world, val_files, device)
    config = run_config(job, world.size)
    records = run.metrics(upto=state.step) if world.rank == 0 else []
    global_batch = cfg.global_batch(world.size)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step",
               disable=not job.progress or world.rank != 0)
    try:
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            state.epoch, state.batch, tokens, labels = next(batches)
            t1 = time.perf_counter()
            metrics = train_step(ddp, optimizer, tokens.to(device, non_blocking=True),
                                 labels.to(device, non_blocking=True), state.step, cfg, world, job.mid_step)
            ema.update(model, state.step)
            state.step += 1
            state.samples += global_batch
            t2 = time.perf_counter()
            metrics.update(step=state.step, epoch=state.epoch, samples=state.samples, data_s=t1 - t0, step_s=t2 - t1,
                           samples_per_s=global_batch / (t2 - t0),
                           tokens_per_s=global_batch * job.model.num_tokens / (t2 - t0), world_size=world.size)
            if val and (state.step % cfg.val_every == 0 or state.step == cfg.steps):
                metrics["val_loss"], metrics["val_accuracy"] = evaluate(model, val, cfg, world)
                metrics["val_ema_loss"], metrics["val_ema_accuracy"] = evaluate(ema.model, val, cfg, world)
            if world.report is not None:
                world.report(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}", lr=f"{metrics['lr']:.2e}")
            if world.rank == 0:
                records.append(metrics)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                digests = world.all_gather(param_digest(model))
                if len(set(digests)) > 1:
                    raise RuntimeError(f"replicas diverged at step {state.step}: parameter digests {digests}")
                if world.rank == 0:
                    records[-1]["param_digests"] = digests
                    run.commit(state, config, model.state_dict(), ema.model.state_dict(), optimizer, records,
                               cfg.keep_checkpoints)
    finally:
        bar.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops DataLoader workers
    return state
