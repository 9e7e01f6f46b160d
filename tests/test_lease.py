"""Run leases on a local folder and on a real S3 server (moto): exclusive create, busy errors,
heartbeats, stale takeover (exactly one of several takers wins), loss detection."""
from __future__ import annotations

import json
import logging
import subprocess
import threading
import time

import fsspec
import pytest

from pipeline.lease import Lease, LeaseBusy, LeaseInfo, LeaseLost, live_leases


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def lock_file(root: str, name: str) -> str:
    return f"{root}/_locks/{name}.json"


def test_one_holder_at_a_time_and_a_clear_busy_error(root):
    with Lease(root, "split-train", "run-a", ttl_s=5):
        with pytest.raises(LeaseBusy, match=r"split-train of .* is being written by run run-a \(host .*pid \d+.*"
                                            r"last heartbeat \d+ s ago\): wait for it, or rerun with --lease-wait"):
            Lease(root, "split-train", "run-b", ttl_s=5).acquire()
        with Lease(root, "split-validation", "run-b", ttl_s=5):  # another split: no conflict
            assert {i.name for i in live_leases(root)} == {"split-train", "split-validation"}
    assert live_leases(root) == []
    fs, path = fsspec.core.url_to_fs(lock_file(root, "split-train"))
    assert not fs.exists(path), "a released lease leaves no lock object"


def test_waiting_run_gets_the_lease_when_the_holder_releases(root):
    first = Lease(root, "split-train", "run-a", ttl_s=5).acquire()
    timer = threading.Timer(0.5, first.release)
    timer.start()
    with Lease(root, "split-train", "run-b", ttl_s=5, wait_s=30) as second:
        assert second.lost is None
    timer.join()
    with pytest.raises(LeaseBusy, match="still held after waiting 0 s"):  # every wait ends
        with Lease(root, "split-x", "run-c", ttl_s=5):
            Lease(root, "split-x", "run-d", ttl_s=5, wait_s=0.3).acquire()


def test_heartbeat_keeps_a_live_lease_and_exactly_one_taker_wins_a_stale_one(root, caplog):
    held = Lease(root, "split-train", "run-a", ttl_s=0.6).acquire()
    time.sleep(1.0)  # several TTLs of heartbeats: still live
    with pytest.raises(LeaseBusy):
        Lease(root, "split-train", "run-b", ttl_s=0.6).acquire()
    held._stop.set()  # the holder hangs: no more heartbeats
    held._thread.join()
    time.sleep(0.8)
    winners, errors = [], []

    def take(run_id: str) -> None:
        try:
            winners.append(Lease(root, "split-train", run_id, ttl_s=60).acquire())
        except LeaseBusy as e:
            errors.append(e)

    with caplog.at_level(logging.WARNING, logger="pretok"):
        takers = [threading.Thread(target=take, args=(f"run-{i}",)) for i in range(4)]
        for t in takers:
            t.start()
        for t in takers:
            t.join()
    assert len(winners) == 1 and len(errors) == 3, (winners, errors)
    assert "took over the stale lease split-train" in caplog.text and "no heartbeat for" in caplog.text
    held._renew()  # the hung holder wakes up: it learns that it lost the lease, and stops
    with pytest.raises(LeaseLost, match=f"taken over by run {winners[0].run_id}"):
        held.check()
    winners[0].release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(root, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()
    info = LeaseInfo("run-dead", "split-train", *_this_host(), dead.pid, now, now, ttl_s=600)
    fs, path = fsspec.core.url_to_fs(lock_file(root, "split-train"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, info.encode())
    with caplog.at_level(logging.WARNING, logger="pretok"):
        with Lease(root, "split-train", "run-new", ttl_s=600) as lease:
            assert json.loads(fs.cat_file(path))["run_id"] == "run-new" and lease.lost is None
    assert f"its process {dead.pid} on this host is gone" in caplog.text


def test_s3_lease_uses_conditional_writes(s3_bucket, s3):
    """The moto server enforces If-None-Match / If-Match: a plain put would not be exclusive."""
    from pipeline.lease import _S3Store

    store = _S3Store(fsspec.filesystem("s3", **s3.storage_options))
    path = f"{s3_bucket[5:]}/l.json"
    token = store.create(path, b"one")
    assert token and store.create(path, b"two") is None and store.read(path)[0] == b"one"
    assert store.renew(path, b"three", '"0123456789abcdef0123456789abcdef"') is None
    assert store.renew(path, b"three", token) and store.read(path)[0] == b"three"


def _this_host() -> tuple[str, str]:
    import socket

    from pipeline.lease import _boot_id

    return socket.gethostname(), _boot_id()


def test_other_stores_get_a_best_effort_lease():
    """Stores without conditional writes (here fsspec's in-memory one) still refuse a second holder."""
    root = "memory://pretok-lease-test/out"
    with Lease(root, "split-train", "run-a", ttl_s=5):
        with pytest.raises(LeaseBusy, match="is being written by run run-a"):
            Lease(root, "split-train", "run-b", ttl_s=5).acquire()
    with Lease(root, "split-train", "run-b", ttl_s=5) as lease:
        assert lease.lost is None
