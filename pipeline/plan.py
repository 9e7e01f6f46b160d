"""Encoder actor sizing from the cluster's nodes: how many actors, and what each one asks for.

Sized per node from ``ray.nodes()``, never from cluster totals: a CPU head with many CPUs must not
inflate the request of actors that can only land on GPU nodes. An actor gets the CPUs per GPU of the
GPU nodes it can land on (each node's CPUs split over the actors its GPUs hold), the minimum over
those nodes so it fits on every one of them. No CPUs are held back for Ray's own daemons: they hold no
logical CPUs, so a reserve would only idle a core; start a node with a smaller ``--num-cpus`` to keep
cores for other work.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import ray

log = logging.getLogger("pretok")
CPU_ACTOR_CPUS = 4.0     # CPU fallback: CPUs per encoder actor (torch threads + decoding)
PENDING_GPU_CPUS = 1.0   # GPU actors with no GPU node up yet (autoscaler): a request any GPU node fits
_EPS = 1e-6


def _floor(x: float) -> float:
    """Round down to 0.01: shares of a node never add up to more than the node (Ray is exact to 1e-4)."""
    return math.floor(x * 100 + _EPS) / 100


@dataclass(frozen=True)
class NodeShape:
    """An alive node's logical resources."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    head: bool = False

    @classmethod
    def from_ray(cls, node: dict) -> NodeShape:
        res = node.get("Resources", {})
        return cls(node["NodeID"], node.get("NodeManagerAddress", "?"), float(res.get("CPU", 0.0)),
                   float(res.get("GPU", 0.0)), "node:__internal_head__" in res)


@dataclass(frozen=True)
class ActorPlan:
    """What the driver starts: ``actors`` encoder actors, each asking for ``gpus_per_actor`` GPUs and
    ``cpus_per_actor`` CPUs and decoding on ``decode_workers`` workers."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    decode_workers: int
    nodes: tuple[NodeShape, ...] = ()

    def fits(self, node: NodeShape) -> int:
        """How many of these actors fit on an empty ``node``."""
        counts = [math.floor(node.gpus / self.gpus_per_actor + _EPS)] if self.gpus_per_actor > 0 else []
        if self.cpus_per_actor > 0:
            counts.append(math.floor(node.cpus / self.cpus_per_actor + _EPS))
        return min(counts) if counts else self.actors

    @property
    def capacity(self) -> int:
        """Actors of this plan the nodes hold at once."""
        return sum(self.fits(n) for n in self.nodes)

    def describe(self) -> str:
        device = f"{self.gpus_per_actor:g} GPU" if self.gpus_per_actor > 0 else "CPU only"
        lines = [
            f"actor plan: {self.actors} encoder actors x {{{device}, {self.cpus_per_actor:g} CPU}}, "
            f"{self.decode_workers} decode workers each{'' if self.decode_workers else ' (threads in the actor)'}; {len(self.nodes)} alive nodes, "
            f"{sum(n.gpus for n in self.nodes):g} GPUs, room for {self.capacity} actors"
        ]
        lines += [
            f"  node {n.node_id[:12]} {n.address}{' (head)' if n.head else ''}: {n.cpus:g} CPU, {n.gpus:g} GPU "
            f"-> {self.fits(n)} actors" for n in self.nodes
        ]
        return "\n".join(lines)


def plan_actors(
    nodes: Sequence[NodeShape],
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    decode_workers: int | None = None,
) -> ActorPlan:
    """The plan for ``nodes`` (alive nodes); the other arguments are the user's overrides (None: default).

    ``gpus_per_actor=None``: one GPU each when a node has a GPU, else CPU encoders. GPU actors: one per
    GPU share on every node, CPUs = the smallest per-actor CPU share among the nodes that hold one. CPU
    encoders: ``CPU_ACTOR_CPUS`` each (less on a smaller cluster), or with ``actors`` given the largest
    equal share that places them all. ``decode_workers``: decode processes, one per whole CPU of the
    actor, at least 1; 0 = decode on threads inside the actor (the in-thread path).
    """
    nodes = tuple(nodes)
    gpa = gpus_per_actor if gpus_per_actor is not None else (1.0 if any(n.gpus >= 1 for n in nodes) else 0.0)
    if gpa < 0 or (cpus_per_actor is not None and cpus_per_actor < 0):
        raise ValueError("--gpus-per-actor and --cpus-per-actor must be >= 0")
    if actors is not None and actors < 1:
        raise ValueError(f"--actors must be >= 1, not {actors}")
    if decode_workers is not None and decode_workers < 0:
        raise ValueError(f"--decode-workers must be >= 0, not {decode_workers}")
    if gpa > 0:
        per_node = {n: math.floor(n.gpus / gpa + _EPS) for n in nodes}
        hosts = [n for n, k in per_node.items() if k > 0]
        n_actors = actors or max(1, sum(per_node.values()))
        share = min((n.cpus / per_node[n] for n in hosts), default=PENDING_GPU_CPUS)
    else:
        n_actors, share = _cpu_actors(nodes, actors)
    cpa = cpus_per_actor if cpus_per_actor is not None else _floor(share)
    workers = decode_workers if decode_workers is not None else max(1, math.floor(cpa + _EPS))
    return ActorPlan(n_actors, gpa, cpa, workers, nodes)


def _cpu_actors(nodes: Sequence[NodeShape], actors: int | None) -> tuple[int, float]:
    """(actors, CPUs each) for CPU encoders."""
    cpus = [n.cpus for n in nodes if n.cpus > 0]
    if not cpus:
        return actors or 1, 1.0
    if actors is None:
        share = min(CPU_ACTOR_CPUS, max(cpus))
        return max(1, sum(math.floor(c / share + _EPS) for c in cpus)), share
    # the largest share s with sum(floor(c / s)) >= actors is one of the c / k, k = 1..actors
    # (min(cpus) / actors always qualifies)
    candidates = {c / k for c in cpus for k in range(1, actors + 1)}
    return actors, max(s for s in candidates if sum(math.floor(c / s + _EPS) for c in cpus) >= actors)


def cluster_nodes() -> list[NodeShape]:
    """The connected cluster's alive nodes."""
    return [NodeShape.from_ray(n) for n in ray.nodes() if n.get("Alive")]


def plan_warnings(plan: ActorPlan, gpus_per_actor: float | None) -> list[str]:
    """What a user must hear about ``plan`` (``gpus_per_actor``: the user's value, None if not given)."""
    out = []
    if plan.gpus_per_actor == 0 and gpus_per_actor is None:
        out.append(
            f"NO GPUS: no node of this cluster has a GPU, so {plan.actors} encoder actors run on CPU, which is "
            "orders of magnitude slower. Check `ray status` on the cluster, or pass --gpus-per-actor 1 to wait "
            "for GPU nodes instead.")
    if plan.capacity < plan.actors:
        out.append(
            f"the alive nodes hold {plan.capacity} of {plan.actors} actors asking for {{GPU: "
            f"{plan.gpus_per_actor:g}, CPU: {plan.cpus_per_actor:g}}} each; the rest wait for nodes with room (an "
            "autoscaler may add them). Lower --actors or --cpus-per-actor to fit this cluster"
            + (", or pass --gpus-per-actor 0 to encode on CPU." if plan.gpus_per_actor > 0 else "."))
    return out


def plan_cluster(
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    decode_workers: int | None = None,
) -> ActorPlan:
    """``plan_actors`` for the connected cluster, logged with its warnings (``ray job logs`` shows them)."""
    plan = plan_actors(cluster_nodes(), actors, gpus_per_actor, cpus_per_actor, decode_workers)
    log.info("%s", plan.describe())
    for warning in plan_warnings(plan, gpus_per_actor):
        log.warning("%s", warning)
    return plan
