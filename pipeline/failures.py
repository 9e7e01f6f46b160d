"""What a failed Ray call means for its shard and its actor: one table for the distributor.

| failure                                    | shard                      | actor                     |
|--------------------------------------------|----------------------------|---------------------------|
| ``BadShard`` (corrupt/truncated/gone input) | failed now, no retry       | kept                      |
| CUDA error in the task                     | retried, not charged       | replaced                  |
| any other task error (MemoryError, OSError) | retried, charged           | replaced after K in a row |
| actor or its node died, Ray OOM kill, stall | retried (charged unless its node died) | replaced     |
| result lost (``ObjectLostError``)          | retried, not charged       | kept                      |
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ray import exceptions as rex

from .sources import BadShard

_MAX_REASON = 300
_DEVICE_MARKERS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                   "device-side assert", "NCCL error", "an illegal memory access")
_NOISE = ("class_name:", "actor_id:", "pid:", "name:", "namespace:", "ip:")


class ActorStalled(RuntimeError):
    """A busy actor made no progress within the stall timeout; it was killed."""


class Kind(enum.Enum):
    BAD_SHARD = "bad shard"
    DEVICE = "device error"
    TASK = "task error"
    ACTOR_LOST = "actor lost"
    RESULT_LOST = "result lost"


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    reason: str           # one line for the user
    charge_shard: bool    # counts against the shard's --max-retries


def _short(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    return " ".join(lines)[:_MAX_REASON]


def describe(e: BaseException) -> str:
    """``Class: message`` of the real cause (the task's own exception inside a RayTaskError)."""
    cause = e.cause if isinstance(e, rex.RayTaskError) and e.cause is not None else e
    return _short(f"{type(cause).__name__}: {cause}")


def is_device_error(e: BaseException) -> bool:
    """A CUDA/accelerator failure: the device (or its driver state) is suspect, not the shard."""
    names = {c.__name__ for c in type(e).__mro__}
    if "AcceleratorError" in names or ("OutOfMemoryError" in names and type(e).__module__.startswith("torch")):
        return True
    return any(m in str(e) for m in _DEVICE_MARKERS)


def node_died(e: BaseException) -> bool:
    if isinstance(e, rex.NodeDiedError) or (isinstance(e, rex.RayActorError) and e.preempted):
        return True
    text = str(e).lower()
    return "node" in text and ("died" in text or "dead" in text) and "worker process" not in text


def classify(e: BaseException) -> Verdict:
    """The verdict for an exception from ``ray.get`` on a shard task."""
    reason = describe(e)
    if isinstance(e, rex.RayTaskError) and not isinstance(e, rex.RayActorError):
        cause = e.cause
        if isinstance(cause, BadShard):
            return Verdict(Kind.BAD_SHARD, reason, True)
        if cause is not None and is_device_error(cause):
            return Verdict(Kind.DEVICE, reason, False)
        return Verdict(Kind.TASK, reason, True)
    if isinstance(e, ActorStalled):
        return Verdict(Kind.ACTOR_LOST, reason, True)
    if isinstance(e, rex.ObjectLostError):
        return Verdict(Kind.RESULT_LOST, reason, False)
    if isinstance(e, rex.RayError):  # actor died/unavailable, node died, Ray OOM kill, worker crash, timeouts
        return Verdict(Kind.ACTOR_LOST, reason, not node_died(e) and not isinstance(e, rex.GetTimeoutError))
    return Verdict(Kind.TASK, reason, True)
