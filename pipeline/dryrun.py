"""``--dry-run``: what a run would do, from the input listing, the output's ledger and the cluster's
nodes. It writes nothing: no manifest, lease, staging folder or card (reads only), and ``--estimate``
times its sample in a Ray task that writes nowhere.

Like a run it connects to ``RAY_ADDRESS`` or starts a local Ray (stopped again) to read the nodes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from .distributor import PretokenizeConfig, PreparedRun, ensure_ray, prepare_run
from .estimate import Estimate, EstimateError, project, sample_on_cluster
from .lease import live_leases
from .ledger import Ledger, redact_url
from .manifest import expected_manifest, run_fingerprint
from .plan import ActorPlan, cluster_nodes, plan_actors, plan_warnings
from .records import InputShard
from .urls import is_local


@dataclass(frozen=True)
class DryRun:
    """A run's plan."""

    output: str
    split: str
    input: str
    format: str
    shards_total: int                   # present input shards
    shards_missing: int                 # named but absent (--allow-missing)
    limit: int | None
    selected: int                       # shards the run may process (all, or the first --limit-shards)
    done: int                           # shards done by the ledger (size/ETag checked, as a run checks)
    pending: tuple[InputShard, ...]
    redo: int                           # stats files the ledger does not accept (their shards are redone)
    busy: tuple[str, ...]               # other runs holding this split's lease now
    input_bytes: int                    # listed sizes of all present shards
    pending_bytes: int
    unknown_sizes: int                  # shards the listing gave no size for
    plan: ActorPlan
    warnings: tuple[str, ...]
    estimate: Estimate | None = None
    estimate_error: str | None = None
    token_counts: bool = False          # --token-count-mse: decodes the estimate does not time

    def describe(self) -> str:
        unknown = f" ({self.unknown_sizes} shards of unknown size)" if self.unknown_sizes else ""
        lines = [
            "dry run  nothing was written; a run would do this:",
            f"output   {self.output} (split {self.split})",
            f"input    {self.input} ({self.format}): {self.shards_total} shards, {_size(self.input_bytes)}{unknown}",
            f"shards   {self.shards_total} total: {self.done} done (ledger), {len(self.pending)} pending "
            f"({_size(self.pending_bytes)})" + (f", {self.redo} to redo" if self.redo else ""),
        ]
        if self.limit is not None:
            lines.append(f"limit    --limit-shards {self.limit}: the first {self.selected} shards only; "
                         f"{len(self.pending)} of them pending")
        if self.shards_missing:
            lines.append(f"missing  {self.shards_missing} named input shards do not exist (--allow-missing)")
        lines += [f"BUSY     {b}: a run now would wait (--lease-wait) or fail" for b in self.busy]
        lines.append(self.plan.describe())
        lines += [f"WARNING  {w}" for w in self.warnings]
        if self.estimate is not None:
            lines.append(self.estimate.describe())
            if self.token_counts:
                lines.append("NOTE     the estimate leaves out the --token-count-mse decodes (a few per image, "
                             "each far slower than encoding)")
        elif self.estimate_error is not None:
            lines.append(f"estimate unavailable: {self.estimate_error}")
        return "\n".join(lines)


def _size(n: float) -> str:
    """Bytes for people: 512 B, 90.0 KiB, 1.2 TiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _pending(prepared: PreparedRun) -> tuple[list[InputShard], int, int]:
    """(pending shards, done shards, stats to redo) as the run would find them, with its refusals."""
    cfg, layout = prepared.cfg, prepared.layout
    manifest = expected_manifest(layout, prepared.manifest, cfg.overwrite, cfg.storage_options, cfg.overwrite_all)
    if cfg.overwrite or cfg.overwrite_all:
        return list(prepared.selected), 0, 0
    ledger = Ledger.read(layout, run_fingerprint(manifest, cfg.split), cfg.storage_options, verify=cfg.verify)
    pending = [s for s in prepared.selected if s.index not in ledger.done]
    return pending, sum(s.index in ledger.done for s in prepared.listing.shards), len(ledger.redo)


def dry_run(cfg: PretokenizeConfig, estimate_images: int | None = None) -> DryRun:
    """The plan of ``run_pretokenize(cfg)``, refusing what it would refuse (ManifestMismatch, bad
    input); with ``estimate_images`` also a timed sample of that many images and the projection."""
    prepared = prepare_run(cfg)
    cfg, listing, so = prepared.cfg, prepared.listing, prepared.cfg.storage_options
    pending, done, redo = _pending(prepared)
    now = time.time()
    busy = tuple(i.describe(now) for i in live_leases(prepared.layout.root, so) if i.name == f"split-{cfg.split}")
    sizes = [s.size for s in listing.shards]
    started = ensure_ray()
    try:
        plan = plan_actors(cluster_nodes(), cfg.actors, cfg.gpus_per_actor, cfg.cpus_per_actor, cfg.decode_workers)
        warnings = plan_warnings(plan, cfg.gpus_per_actor)
        if is_local(cfg.output) and len(plan.nodes) > 1:
            warnings.append(f"local output on a cluster of {len(plan.nodes)} nodes: a run refuses it unless every "
                            "actor's node sees the driver's folder (a shared filesystem); s3:// needs no such check")
        estimate = error = None
        if estimate_images:
            try:
                sample = sample_on_cluster(
                    prepared.ckpt, pending or prepared.selected, prepared.transform, estimate_images,
                    cfg.batch_size, cfg.precision, plan, so, cfg.placement_timeout_s + cfg.start_timeout_s,
                    cfg.max_member_bytes, cfg.fast_decode)
                estimate = project(sample, plan, pending)
            except EstimateError as e:
                error = str(e)
    finally:
        if started:
            ray.shutdown()
    return DryRun(
        output=redact_url(cfg.output), split=cfg.split, input=redact_url(listing.url), format=listing.format,
        shards_total=len(listing.shards), shards_missing=len(listing.missing), limit=cfg.limit_shards,
        selected=len(prepared.selected), done=done, pending=tuple(pending), redo=redo, busy=busy,
        input_bytes=sum(s for s in sizes if s is not None), pending_bytes=sum(s.size or 0 for s in pending),
        unknown_sizes=sizes.count(None), plan=plan, warnings=tuple(warnings),
        estimate=estimate, estimate_error=error, token_counts=cfg.token_count_mse is not None,
    )
