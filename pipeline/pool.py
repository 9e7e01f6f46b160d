"""The encoder actor pool: a small state machine per actor slot.

```
PENDING --resources reserved--> STARTING --start() returns--> IDLE <--> BUSY (1..K shards)
   |  placement timeout            |  start failed / timed out        |  K task failures in a row,
   v                               v                                  v  a CUDA error, death, stall
  GONE (named in the summary)     replaced (new actor, PENDING)      replaced (new actor, PENDING)
```
Each slot reserves its resources as a one-bundle placement group, so "placed" means Ray granted
them (not that a worker process happened to start quickly); its actor is created inside it. A
started slot holds up to ``ActorSpec.shards_in_flight`` shards at once, so an actor starts the next
shard while it commits the last one (no drain at shard boundaries). When a slot's actor is
replaced, its other shards in flight come back as ``orphaned`` events: redone elsewhere, not
charged (the failure that replaced the actor is charged to the shard that reported it). ``N`` start failures in a row (any slots) abort the run with the real
cause; a slot replaced ``MAX_REPLACEMENTS`` times without a committed shard is retired. Every Ray
call has a timeout, and every Ray error is caught here and turned into an event.
"""
from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .failures import ActorStalled, describe
from .records import InputShard

log = logging.getLogger("pretok")
MAX_REPLACEMENTS = 3      # replacements of one slot without a committed shard before it is retired
PROGRESS_EVERY_S = 0.5    # how often the pool asks busy actors for their image counts
GET_TIMEOUT_S = 60.0      # fetching a ready result; longer means the object is stuck


class State(enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    GONE = "gone"


@dataclass(frozen=True)
class ActorSpec:
    """What each actor asks Ray for, and how long the pool waits for it."""

    count: int
    num_gpus: float
    num_cpus: float
    placement_timeout_s: float = 300.0
    start_timeout_s: float = 900.0
    stall_timeout_s: float = 900.0     # a busy actor whose image count does not move for this long is hung
    max_start_failures: int = 3
    shards_in_flight: int = 2          # per actor

    def resources(self) -> dict[str, float]:
        return {k: v for k, v in (("GPU", self.num_gpus), ("CPU", self.num_cpus)) if v}


@dataclass
class Slot:
    index: int
    state: State = State.PENDING
    actor: Any = None
    group: Any = None                # its placement group
    ref: Any = None                  # in flight: the group's ready() (PENDING), start() (STARTING)
    since: float = 0.0               # monotonic time of the last state change
    tasks: dict = field(default_factory=dict)  # BUSY: run() ref -> its shard, oldest first
    identity: dict = field(default_factory=dict)
    streak: list[int] = field(default_factory=list)  # shards of its consecutive task failures
    replacements: int = 0            # since its last committed shard
    images: int = 0                  # images its current actor reported
    moved: float = 0.0               # when ``images`` last changed (or the shard began)
    progress_ref: Any = None

    @property
    def device(self) -> str:
        """Where this slot's actor runs: a shard that failed here is preferably retried elsewhere."""
        ident = self.identity
        if ident.get("gpu_ids"):
            return f"{ident.get('node_id', '?')[:12]}/gpu{','.join(ident['gpu_ids'])}"
        return f"{ident.get('node_id', '?')[:12]}/pid{ident.get('pid', '?')}"

    def describe(self) -> str:
        return f"actor {self.index} ({self.device})" if self.identity else f"actor {self.index}"


@dataclass
class Event:
    kind: str                        # "done" | "failed" | "orphaned"
    slot: Slot
    shard: InputShard
    value: Any = None                # ShardStats for done, the exception for failed, why for orphaned


def _kill(slot: Slot) -> None:
    """Kill the slot's actor and give its reserved resources back."""
    if slot.actor is not None:
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if slot.group is not None:
        try:
            remove_placement_group(slot.group)
        except Exception:  # noqa: BLE001 - already removed
            pass
    slot.actor = slot.group = None


class Pool:
    """Actor slots; ``wait`` advances their state machines and returns finished shard tasks."""

    def __init__(self, spec: ActorSpec, make_actor: Callable[[dict], Any],
                 check_start: Callable[[dict], str | None] = lambda identity: None):
        """``make_actor(options)`` creates one actor with these Ray actor options (resources and
        scheduling strategy); ``check_start(identity)`` vets a started actor (returns why it must
        not be used: that aborts the run as a configuration error)."""
        self.spec, self._make, self._check_start = spec, make_actor, check_start
        self.start_failures = 0          # in a row, over all slots
        self.abort: str | None = None    # set when the run cannot go on
        self.abort_is_config = False
        self.unplaced: list[str] = []
        self.ever_started = False
        self.images_done = 0             # images reported by all actors so far
        self._progress_at = 0.0
        self.slots = [Slot(i) for i in range(spec.count)]
        self._orphans: list[Event] = []
        for slot in self.slots:
            self._launch(slot)

    # -- transitions ----------------------------------------------------------------------------
    def _set(self, slot: Slot, state: State, ref: Any = None) -> None:
        slot.state, slot.ref, slot.since = state, ref, time.monotonic()

    def _launch(self, slot: Slot) -> None:
        """Reserve the slot's resources (PENDING); its actor is created once they are granted."""
        slot.identity, slot.images, slot.progress_ref = {}, 0, None
        try:
            slot.group = placement_group([self.spec.resources() or {"CPU": 0.001}])
            self._set(slot, State.PENDING, slot.group.ready())
        except Exception as e:  # noqa: BLE001 - e.g. a cluster that refuses the request
            self._abort(f"cannot reserve resources for encoder actors: {describe(e)}", config=True)
            self._set(slot, State.GONE)

    def _create(self, slot: Slot) -> None:
        options = {"num_gpus": self.spec.num_gpus, "num_cpus": self.spec.num_cpus,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(slot.group, placement_group_bundle_index=0)}
        try:
            slot.actor = self._make(options)
            self._set(slot, State.STARTING, slot.actor.start.remote())
        except Exception as e:  # noqa: BLE001 - e.g. arguments that cannot be serialised
            self._abort(f"cannot create encoder actors: {describe(e)}", config=True)
            _kill(slot)
            self._set(slot, State.GONE)

    def replace(self, slot: Slot, why: str) -> None:
        """Kill the slot's actor and start a new one (or retire the slot); its other shards in
        flight are reported as orphaned by the next ``wait``."""
        _kill(slot)
        self._orphan(slot, why)
        slot.streak = []
        slot.replacements += 1
        if slot.replacements > MAX_REPLACEMENTS:
            log.warning("%s retired: replaced %d times without committing a shard (last: %s)",
                        slot.describe(), MAX_REPLACEMENTS, why)
            self._set(slot, State.GONE)
            return
        log.warning("replacing %s: %s", slot.describe(), why)
        self._launch(slot)

    def _orphan(self, slot: Slot, why: str) -> None:
        self._orphans += [Event("orphaned", slot, shard, why) for shard in slot.tasks.values()]
        slot.tasks = {}

    def committed(self, slot: Slot) -> None:
        slot.streak, slot.replacements = [], 0
        self.release(slot)

    def release(self, slot: Slot) -> None:
        """After a shard's task ended without condemning the actor: IDLE once none is in flight."""
        if not slot.tasks and slot.state is State.BUSY:
            self._set(slot, State.IDLE)

    def _abort(self, reason: str, config: bool) -> None:
        if self.abort is None:
            self.abort, self.abort_is_config = reason, config

    # -- work -----------------------------------------------------------------------------------
    def has_room(self, slot: Slot) -> bool:
        """True when the slot's actor is started and can take another shard now."""
        return slot.state is State.IDLE or (slot.state is State.BUSY and len(slot.tasks) < self.spec.shards_in_flight)

    def with_room(self) -> list[Slot]:
        return [s for s in self.slots if self.has_room(s)]

    def assign(self, slot: Slot, shard: InputShard, attempt: int) -> None:
        slot.moved = time.monotonic()
        if slot.state is State.IDLE:
            self._set(slot, State.BUSY)
        slot.tasks[slot.actor.run.remote(shard, attempt)] = shard

    def alive(self) -> bool:
        return any(s.state is not State.GONE for s in self.slots)

    def busy(self) -> bool:
        return any(s.state is State.BUSY for s in self.slots)

    def wait(self, timeout: float) -> list[Event]:
        """Wait up to ``timeout`` for any call in flight; handle placements and starts, and return
        the shard tasks that finished (results already fetched, errors as values)."""
        by_ref = {s.ref: s for s in self.slots if s.ref is not None}
        by_ref.update({ref: s for s in self.slots for ref in s.tasks})
        ready = []
        if by_ref:
            try:
                ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - the cluster itself is failing
                self._abort(f"lost contact with the Ray cluster: {describe(e)}", config=False)
                return []
        else:
            time.sleep(timeout)
        events = []
        for ref in ready:
            slot = by_ref[ref]
            try:
                value, error = ray.get(ref, timeout=GET_TIMEOUT_S), None
            except Exception as e:  # noqa: BLE001 - every Ray error class becomes an event
                value, error = None, e
            if slot.state is State.PENDING:
                if error is not None:
                    self._start_failed(slot, error)
                else:
                    self._create(slot)
            elif slot.state is State.STARTING:
                self._started(slot, value, error)
            elif ref in slot.tasks:
                shard = slot.tasks.pop(ref)
                events.append(Event("failed" if error else "done", slot, shard, error or value))
        self._expire()
        self._poll_progress()
        orphans, self._orphans = self._orphans, []
        return orphans + events + self._stalled()

    def _started(self, slot: Slot, identity: dict | None, error: Exception | None) -> None:
        if error is not None:
            self._start_failed(slot, error)
            return
        problem = self._check_start(identity)
        if problem:
            self._abort(problem, config=True)
            _kill(slot)
            self._set(slot, State.GONE)
            return
        slot.identity, slot.moved = identity, time.monotonic()
        self.start_failures = 0
        self.ever_started = True
        self._set(slot, State.IDLE)

    def _start_failed(self, slot: Slot, error: Exception | str) -> None:
        reason = error if isinstance(error, str) else describe(error)
        self.start_failures += 1
        if self.start_failures >= self.spec.max_start_failures:
            self._abort(f"encoder actors failed to start {self.start_failures} times in a row; last error: {reason}",
                        config=True)
            _kill(slot)
            self._set(slot, State.GONE)
            return
        self.replace(slot, f"it failed to start: {reason}")

    def _expire(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            age = now - slot.since
            if slot.state is State.PENDING and age > self.spec.placement_timeout_s:
                _kill(slot)
                self._set(slot, State.GONE)
                self.unplaced.append(f"actor {slot.index}")
                log.warning("actor %d could not be placed within %.0f s (asks %s; available now: %s); "
                            "going on without it", slot.index, self.spec.placement_timeout_s,
                            self.spec.resources(), _available())
            elif slot.state is State.STARTING and age > self.spec.start_timeout_s:
                self._start_failed(slot, f"start() did not return within {self.spec.start_timeout_s:.0f} s")
        if not self.ever_started and not self.alive() and self.unplaced:
            self._abort(
                f"no encoder actor could be placed within {self.spec.placement_timeout_s:.0f} s: "
                f"{self.spec.count} actor(s) asked for {self.spec.resources()} each; the cluster has "
                f"{_totals()} in all, {_available()} available", config=True)

    def _stalled(self) -> list[Event]:
        """Busy slots whose image count has not moved within the stall timeout: killed; the oldest
        shard is reported failed, the others orphaned."""
        now, events = time.monotonic(), []
        for slot in self.slots:
            if slot.state is State.BUSY and slot.tasks and now - slot.moved > self.spec.stall_timeout_s:
                why = f"no image done for {self.spec.stall_timeout_s:.0f} s on {slot.describe()}; killed"
                oldest = slot.tasks.pop(next(iter(slot.tasks)))
                _kill(slot)
                self._orphan(slot, why)
                events.append(Event("failed", slot, oldest, ActorStalled(why)))
        orphans, self._orphans = self._orphans, []
        return orphans + events

    def _poll_progress(self) -> None:
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_EVERY_S:
            return
        self._progress_at = now
        waiting = {s.progress_ref: s for s in self.slots if s.progress_ref is not None}
        if waiting:
            try:
                done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            except Exception:  # noqa: BLE001 - progress is informative only
                done = []
            for ref in done:
                slot = waiting[ref]
                slot.progress_ref = None
                try:
                    images = ray.get(ref, timeout=GET_TIMEOUT_S)
                except Exception:  # noqa: BLE001 - a dead actor shows up on its run() call
                    continue
                if images != slot.images:
                    self.images_done += max(0, images - slot.images)
                    slot.images, slot.moved = images, now
        for slot in self.slots:
            if slot.state is State.BUSY and slot.progress_ref is None:
                try:
                    slot.progress_ref = slot.actor.progress.remote()
                except Exception:  # noqa: BLE001
                    pass

    def rivals(self, slot: Slot) -> list[str | None]:
        """Devices of the other slots that may still work (None: not started yet)."""
        return [s.device if s.identity else None for s in self.slots if s is not slot and s.state is not State.GONE]

    def shutdown(self) -> None:
        """Kill every actor; slots still waiting for placement are named in ``unplaced``."""
        for slot in self.slots:
            if slot.state is State.PENDING:
                self.unplaced.append(f"actor {slot.index} (still pending at the end)")
            _kill(slot)
            slot.state = State.GONE


def _totals() -> dict:
    try:
        return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    except Exception:  # noqa: BLE001
        return {}


def _available() -> dict:
    try:
        return {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    except Exception:  # noqa: BLE001
        return {}
