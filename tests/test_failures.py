"""What each failure costs a shard and an actor: every Ray error class has a verdict, and the
shard book charges, refunds and places retries as the distributor relies on."""
from __future__ import annotations

import inspect

import pytest
import torch
from ray import exceptions as rex

from pipeline.distributor import _ShardBook
from pipeline.failures import ActorStalled, Kind, classify, describe, is_device_error
from pipeline.records import InputShard
from pipeline.sources import BadShard


def task_error(cause: Exception) -> rex.RayTaskError:
    """The exception ``ray.get`` raises for a task that raised ``cause`` (Ray's own wrapping)."""
    try:
        raise cause
    except Exception as e:  # noqa: BLE001
        return rex.RayTaskError("run", "Traceback ...", e).as_instanceof_cause()


def ray_error_classes() -> list[type]:
    """Every Ray error class (CrossLanguageError wraps errors of Java tasks only)."""
    return [c for _, c in inspect.getmembers(rex, inspect.isclass)
            if issubclass(c, rex.RayError) and c is not rex.CrossLanguageError]


def instance(cls: type) -> BaseException:
    """An instance of a Ray error class, built from its constructor's parameters."""
    if issubclass(cls, rex.RayTaskError):
        return task_error(RuntimeError("boom"))
    if cls is rex.ActorDiedError:
        return cls()
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    args = {"object_ref_hex": "ab" * 20, "owner_address": None, "call_site": "", "error_message": "lost",
            "message": "node 1 died", "actor_id": None}
    return cls(*[args.get(p.name, "x") for p in params])


@pytest.mark.parametrize("cls", ray_error_classes(), ids=lambda c: c.__name__)
def test_every_ray_error_class_has_a_verdict_and_a_one_line_reason(cls):
    e = instance(cls)
    verdict = classify(e)
    assert verdict.kind in Kind and "\n" not in verdict.reason and len(verdict.reason) <= 300
    if isinstance(e, rex.ObjectLostError):
        assert verdict.kind is Kind.RESULT_LOST and not verdict.charge_shard
    elif not isinstance(e, rex.RayTaskError):
        assert verdict.kind is Kind.ACTOR_LOST


def test_verdicts_for_what_a_shard_task_raises():
    assert classify(task_error(BadShard("tar is truncated"))).kind is Kind.BAD_SHARD
    cuda = classify(task_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")))
    assert cuda.kind is Kind.DEVICE and not cuda.charge_shard
    assert is_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    for cause in (MemoryError(), OSError("disk full"), RuntimeError("bug")):
        verdict = classify(task_error(cause))
        assert verdict.kind is Kind.TASK and verdict.charge_shard, cause
    assert describe(task_error(ValueError("bad\nvalue"))) == "ValueError: bad value"
    assert classify(ActorStalled("no image for 900 s")).kind is Kind.ACTOR_LOST
    node = classify(rex.NodeDiedError("node 1 died"))
    assert node.kind is Kind.ACTOR_LOST and not node.charge_shard
    oom = classify(rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory"))
    assert oom.kind is Kind.ACTOR_LOST and oom.charge_shard


def shards(n: int) -> list[InputShard]:
    return [InputShard(i, f"s3://b/{i}.tar", "webdataset") for i in range(n)]


def test_failures_on_a_replaced_actor_are_refunded_and_resurrect_failed_shards():
    book = _ShardBook(shards(3), max_retries=0)
    for s in (book.take("gpu0", []), book.take("gpu0", [])):
        book.retry(s, "gpu0", "broken", charged=True)   # budget 0: failed at once ...
    assert sorted(book.failed) == [0, 1] and [s.index for s in book.queue] == [2]
    book.refund([0, 1], "gpu0")                            # ... until the actor proves broken
    assert book.failed == {} and sorted(s.index for s in book.queue) == [0, 1, 2]
    assert book.attempt(0) == 2


def test_refund_spares_a_shard_that_failed_on_another_device_too():
    book = _ShardBook(shards(1), max_retries=1)
    book.retry(book.take("gpu1", []), "gpu1", "bad shard", charged=True)
    book.retry(book.take("gpu0", ["gpu1"]), "gpu0", "bad shard", charged=True)
    book.refund([0], "gpu0")
    assert list(book.failed) == [0] and not book.queue


def test_uncharged_failures_keep_the_budget_and_retries_prefer_another_device():
    book = _ShardBook(shards(2), max_retries=0)
    first = book.take("gpu0", ["gpu1"])
    book.retry(first, "gpu0", "CUDA error", charged=False)
    assert not book.failed and book.queue[0] is first
    assert book.take("gpu0", ["gpu1"]).index == 1           # gpu0 leaves its failed shard to gpu1
    assert book.take("gpu0", ["gpu1"]) is None              # ... and does not take it itself
    assert book.take("gpu0", [None]) is None                # nor while another actor is still starting
    assert book.take("gpu0", []) is first                   # unless it is the only device left
