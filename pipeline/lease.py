"""Run leases on an output dataset: one writer per split, short read-modify-writes of shared files.

A lease is a small JSON lock object under ``OUT/_locks/`` (run id, host, pid, heartbeat). It is
created atomically (``O_CREAT|O_EXCL`` locally, ``PutObject`` with ``If-None-Match: *`` on S3) and
renewed by a heartbeat thread with a compare-and-swap (S3: ``If-Match`` on the ETag; locally a
check-and-rename). A lease whose heartbeat is older than its TTL, or whose process is gone from
this host, is stale: the next run takes it over with a warning (one taker wins: S3 ``If-Match``,
locally an ``O_EXCL`` takeover guard). Other fsspec stores get the same protocol as far as they
support it (``pipe_file(mode="create")``). Losing the lease (taken over, or not renewable within the TTL) is
reported by ``check``; the holder must stop writing.

Protocol of a run: lease ``split-{split}`` for the whole run; lease ``manifest`` only around each
read-modify-write of ``pretok.json`` and the card. Runs of different splits thus proceed together.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import fsspec.asyn

from .layout import OutputError, filesystem
from .ledger import redact_url
from .sources.storage import storage_errors
from .urls import is_local

log = logging.getLogger("pretok")
LOCKS = "_locks"
DEFAULT_TTL_S = 60.0
MANIFEST_WAIT_S = 120.0
TAKEOVER_GUARD_S = 10.0   # a local takeover guard older than this was left by a dead taker   # manifest holders hold it for a few requests; waiting longer means trouble


class LeaseBusy(RuntimeError):
    """Another live run holds the lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over or could not be renewed; it must stop writing."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LeaseInfo:
    run_id: str
    name: str
    host: str
    boot_id: str
    pid: int
    created: float
    heartbeat: float
    ttl_s: float
    seq: int = 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "LeaseInfo | None":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def stale_reason(self, now: float) -> str | None:
        """Why this lease no longer protects anything, or None while its holder looks alive."""
        if self.host == socket.gethostname() and self.boot_id == _boot_id() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        if now - self.heartbeat > self.ttl_s:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (TTL {self.ttl_s:.0f} s)"
        return None

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, last heartbeat "
                f"{max(0.0, now - self.heartbeat):.0f} s ago)")


class _LocalStore:
    """Lock files on a local (or shared POSIX) filesystem; tokens are content hashes."""

    def create(self, path: str, data: bytes) -> str | None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return hashlib.sha256(data).hexdigest()

    def read(self, path: str) -> tuple[bytes, str, float] | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest(), mtime

    def renew(self, path: str, data: bytes, token: str) -> str | None:
        """Replace the lease in place (no moment without one) if it is still ``token``."""
        current = self.read(path)
        if current is None or current[1] != token:
            return None
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return hashlib.sha256(data).hexdigest()

    def take_over(self, path: str, data: bytes, token: str) -> str | None:
        """``renew`` a stale lease under a takeover guard (O_EXCL), so that one taker wins."""
        guard = f"{path}.takeover"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a taker that died holding the guard
                if time.time() - os.stat(guard).st_mtime > TAKEOVER_GUARD_S:
                    os.unlink(guard)
            except FileNotFoundError:
                pass
            return None
        try:
            return self.renew(path, data, token)
        finally:
            os.unlink(guard)

    def delete(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def list(self, folder: str) -> list[str]:
        try:
            return [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".json")]
        except FileNotFoundError:
            return []


class _FsspecStore:
    """Any fsspec store: ``pipe_file(mode="create")`` (atomic where the store implements it, e.g.
    gcsfs; check-then-write elsewhere) and read-compare-write renewals; tokens are content hashes."""

    def __init__(self, fs):
        self.fs = fs

    def create(self, path: str, data: bytes) -> str | None:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return None
        return hashlib.sha256(data).hexdigest()

    def read(self, path: str) -> tuple[bytes, str, float] | None:
        self.fs.invalidate_cache(path)
        try:
            data = self.fs.cat_file(path)
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        modified = info.get("mtime") or info.get("updated") or info.get("LastModified")
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or time.time())
        return data, hashlib.sha256(data).hexdigest(), stamp

    def renew(self, path: str, data: bytes, token: str) -> str | None:
        current = self.read(path)
        if current is None or current[1] != token:
            return None
        self.fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest()

    take_over = renew

    def delete(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def list(self, folder: str) -> list[str]:
        self.fs.invalidate_cache(folder)
        try:
            return [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []


def _precondition_failed(e: BaseException) -> bool:
    while e is not None:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        e = e.__cause__ or e.__context__
    return False


class _S3Store(_FsspecStore):
    """Lock objects on S3: conditional create (``If-None-Match: *``) and CAS on the ETag (``If-Match``)."""

    def _put(self, path: str, data: bytes, **condition) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except (FileExistsError, OSError) as e:
            if not isinstance(e, FileExistsError) and not _precondition_failed(e):
                raise
            # A retried request whose first try took effect also lands here: it is ours if it reads back so.
            current = self.read(path)
            return current[1] if current is not None and current[0] == data else None
        return out["ETag"]

    def create(self, path: str, data: bytes) -> str | None:
        return self._put(path, data, IfNoneMatch="*")

    def read(self, path: str) -> tuple[bytes, str, float] | None:
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str, float]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                data = await body.read()
            return data, resp["ETag"], resp["LastModified"].timestamp()

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def renew(self, path: str, data: bytes, token: str) -> str | None:
        return self._put(path, data, IfMatch=token)

    take_over = renew


def _store(root: str, storage_options: dict | None):
    fs, _ = filesystem(root, storage_options)
    if is_local(root):
        return _LocalStore()
    return (_S3Store if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else _FsspecStore)(fs)


def _lock_dir(root: str, storage_options: dict | None) -> str:
    _, path = filesystem(root, storage_options)
    return posixpath.join(path.rstrip("/"), LOCKS) if not is_local(root) else os.path.join(path, LOCKS)


class Lease:
    """``with Lease(root, "split-train", run_id, ...) as lease: ...; lease.check()``."""

    def __init__(self, root: str, name: str, run_id: str, storage_options: dict | None = None,
                 ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0, what: str | None = None):
        self.root, self.name, self.run_id = root, name, run_id
        self.storage_options = storage_options
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.what = what or name
        self._store = _store(root, storage_options)
        self.path = _join(_lock_dir(root, storage_options), f"{name}.json")
        self._info: LeaseInfo | None = None
        self._token: str | None = None
        self._lost: str | None = None
        self._renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def _errors(self) -> Iterator[None]:
        with storage_errors("cannot lock output", redact_url(self.root), self.storage_options, OutputError):
            yield

    def acquire(self) -> "Lease":
        """Take the lease, waiting up to ``wait_s`` for a live holder; ``LeaseBusy`` after that."""
        now = time.time()
        self._info = LeaseInfo(self.run_id, self.name, socket.gethostname(), _boot_id(), os.getpid(),
                               now, now, self.ttl_s)
        deadline = time.monotonic() + self.wait_s
        said = False
        while True:
            with self._errors():
                holder = self._try_take()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                hint = (f"wait for it, or rerun with --lease-wait SECONDS; a lease without a heartbeat for "
                        f"{holder.ttl_s:.0f} s is taken over" if self.wait_s == 0 else
                        f"still held after waiting {self.wait_s:.0f} s")
                raise LeaseBusy(f"{self.what} of {redact_url(self.root)} is being written by "
                                f"{holder.describe(time.time())}: {hint}")
            if not said:
                log.warning("%s of %s is held by %s; waiting up to %.0f s", self.what, redact_url(self.root),
                            holder.describe(time.time()), self.wait_s)
                said = True
            time.sleep(min(1.0, self.ttl_s / 4, max(0.01, deadline - time.monotonic())))
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _try_take(self) -> LeaseInfo | None:
        """Create or take over the lease (``None``); else the live holder."""
        data = self._info.encode()
        holder = None
        for _ in range(3):  # the lease may vanish or change between our steps: look again
            token = self._store.create(self.path, data)
            if token is not None:
                self._token = token
                return None
            current = self._store.read(self.path)
            if current is None:
                continue
            raw, token, modified = current
            holder = LeaseInfo.decode(raw)
            now = time.time()
            if holder is None:  # being written (local O_EXCL create) or garbage: judge by its age
                holder = LeaseInfo("(unfinished lock file)", self.name, "?", "", 0, modified, modified, self.ttl_s)
                reason = f"unreadable and {now - modified:.0f} s old" if now - modified > self.ttl_s else None
            elif holder.run_id == self.run_id:  # ours: an earlier create whose reply was lost
                self._token = token
                return None
            else:
                reason = holder.stale_reason(now)
            if reason is None:
                return holder
            new_token = self._store.take_over(self.path, data, token)
            if new_token is not None:
                log.warning("took over the stale lease %s of %s from %s: %s", self.name, redact_url(self.root),
                            holder.describe(now), reason)
                self._token = new_token
                return None
        now = time.time()
        return holder or LeaseInfo("(changing)", self.name, "?", "", 0, now, now, self.ttl_s)

    def _heartbeat(self) -> None:
        interval = max(0.05, self.ttl_s / 6)
        while not self._stop.wait(interval):
            try:
                self._renew()
            except Exception as e:  # noqa: BLE001 - storage trouble: retried until the TTL runs out
                if time.monotonic() - self._renewed > self.ttl_s * 0.8:
                    self._lost = f"could not renew it for {self.ttl_s * 0.8:.0f} s: {type(e).__name__}"
                    return
            if self._lost:
                return

    def _renew(self) -> None:
        info = self._info
        info.seq += 1
        info.heartbeat = time.time()
        token = self._store.renew(self.path, info.encode(), self._token)
        if token is None:
            current = self._store.read(self.path)
            holder = LeaseInfo.decode(current[0]) if current else None
            self._lost = ("it was taken over by " + holder.describe(time.time())) if holder else "it was removed"
            return
        self._token = token
        self._renewed = time.monotonic()

    @property
    def lost(self) -> str | None:
        return self._lost

    def check(self) -> None:
        """``LeaseLost`` once the lease is no longer ours."""
        if self._lost:
            raise LeaseLost(f"this run ({self.run_id}) lost its lease on {self.what} of {redact_url(self.root)}: "
                            f"{self._lost}; it stopped writing (rerun to resume)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._token is None or self._lost:
            return
        try:
            current = self._store.read(self.path)
            if current is not None and current[1] == self._token:
                self._store.delete(self.path)
        except Exception as e:  # noqa: BLE001 - a lease left behind goes stale; never fail the run for it
            log.warning("could not release lease %s of %s (%s); it expires after %.0f s",
                        self.name, redact_url(self.root), type(e).__name__, self.ttl_s)
        self._token = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live_leases(root: str, storage_options: dict | None = None, prefix: str = "split-") -> list[LeaseInfo]:
    """Leases under ``OUT/_locks`` whose holders look alive (``prefix`` filters their names)."""
    store = _store(root, storage_options)
    now = time.time()
    out = []
    for path in store.list(_lock_dir(root, storage_options)):
        current = store.read(path)
        info = LeaseInfo.decode(current[0]) if current else None
        if info is not None and info.name.startswith(prefix) and info.stale_reason(now) is None:
            out.append(info)
    return out


def _join(folder: str, name: str) -> str:
    return os.path.join(folder, name) if os.path.isabs(folder) else posixpath.join(folder, name)


