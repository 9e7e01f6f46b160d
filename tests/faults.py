"""Fault-drill helpers: an S3 proxy that injects errors, an output watcher, run comparison.

``FaultyS3Proxy`` listens on 127.0.0.1 only and forwards to a real S3 endpoint (the moto server).
Whether a request fails is a seeded hash of (method, key, query, range, n-th occurrence of that
request), so the same requests fail in every run whatever the interleaving of the processes.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ledger import ShardStats

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULT</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint
    server: "_Server"

    def log_message(self, *args) -> None:  # silence the per-request log lines
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        fault = self.server.proxy.decide(self.command, self.path, self.headers.get("Range", ""))
        if fault == "slowdown":
            self._reply(503, [("Content-Type", "application/xml")], SLOW_DOWN)
            return
        if fault != "reset":
            status, headers, data = self._forward(body)
        if fault:  # "reset" before or "reset_after" forwarding (the request took effect, the reply is lost)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # RST: the client sees "connection reset by peer"
            self.close_connection = True
            return
        self._reply(status, headers, data)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            return resp.status, kept, data
        finally:
            upstream.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        """Send a reply; a HEAD reply keeps the upstream Content-Length but carries no body."""
        self.send_response(status)
        for k, v in headers:
            if k.lower() != "content-length":
                self.send_header(k, v)
        length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(data)))
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: "FaultyS3Proxy"


class FaultyS3Proxy:
    """``with FaultyS3Proxy(upstream_url, rate=0.1) as proxy: ... proxy.url``.

    Of the requests it sees, about ``rate / 2`` get a 503 SlowDown XML reply, ``rate / 4`` a TCP
    reset instead of being forwarded and ``rate / 4`` a TCP reset after being forwarded (the
    request took effect, the reply is lost); the rest are forwarded. ``counts`` counts requests
    and faults, also per method (``"reset PUT"``). Past ``max_requests`` requests every request
    gets a 503 (a retry storm cannot run unbounded); after ``lifetime_s`` the proxy stops itself.
    """

    def __init__(self, upstream_url: str, rate: float = 0.1, seed: int = 0,
                 max_requests: int = 20_000, lifetime_s: float = 600.0):
        parsed = urllib.parse.urlsplit(upstream_url)
        self.upstream = (parsed.hostname, parsed.port)
        self.seed, self.max_requests = seed, max_requests
        self._bands = (("slowdown", rate / 2), ("reset", rate * 3 / 4), ("reset_after", rate))
        self.counts: collections.Counter[str] = collections.Counter()
        self._seen: collections.Counter[tuple] = collections.Counter()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def decide(self, method: str, path: str, byte_range: str) -> str | None:
        """``"slowdown"``, ``"reset"``, ``"reset_after"`` or None (forward), from the seeded hash."""
        url = urllib.parse.urlsplit(path)
        key = url.path.lstrip("/").partition("/")[2]  # without the bucket, which tests name at random
        query = "&".join(sorted(url.query.split("&")))
        with self._lock:
            ident = (method, key, query, byte_range)
            self._seen[ident] += 1
            self.counts["requests"] += 1
            if self.counts["requests"] > self.max_requests:
                self.counts["over_limit"] += 1
                return "slowdown"
            digest = hashlib.sha256(repr((self.seed, ident, self._seen[ident])).encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
            fault = next((f for f, p in self._bands if u < p), None)
            self.counts[fault or "forwarded"] += 1
            if fault:
                self.counts[f"{fault} {method}"] += 1
            return fault

    def start(self) -> "FaultyS3Proxy":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultyS3Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class OutputWatcher:
    """Polls ``OUT/data`` and ``OUT/stats`` while a run goes on and records every violation of:
    a listed data file is a complete Parquet file; a listed stats file is valid JSON whose data
    file exists. ``with OutputWatcher(out, storage_options) as w: ...``; then ``w.problems``."""

    def __init__(self, root: str, storage_options: dict | None = None, interval_s: float = 0.05):
        self.fs, self.root = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.interval_s = interval_s
        self.problems: list[str] = []
        self.polls = 0
        self._checked: set[str] = set()  # committed files never change: each is checked once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="output-watcher", daemon=True)

    def _list(self, folder: str) -> list[str]:
        self.fs.invalidate_cache(f"{self.root}/{folder}")
        try:
            return self.fs.ls(f"{self.root}/{folder}", detail=False)
        except FileNotFoundError:
            return []

    def check_once(self) -> None:
        stats_paths = self._list("stats")  # listed first: a stats file's data file must be in the next listing
        data_paths = self._list("data")
        data_names = {p.rsplit("/", 1)[-1] for p in data_paths}
        for path in data_paths:
            if path not in self._checked:
                self._check_data(path)
        for path in stats_paths:
            if path in self._checked:
                continue
            try:
                stats = ShardStats.from_json(self.fs.cat_file(path))
            except FileNotFoundError:
                continue
            except (ValueError, TypeError) as e:
                self.problems.append(f"invalid stats file {path}: {e}")
            else:
                if f"{stats.shard}.parquet" not in data_names:
                    self.problems.append(f"stats file {path} listed before its data file")
            self._checked.add(path)
        self.polls += 1

    def _check_data(self, path: str) -> None:
        try:
            with self.fs.open(path, "rb") as f:
                pq.read_table(f)
        except FileNotFoundError:
            return  # replaced since the listing (a rerun's rename): not a partial file
        except Exception as e:  # noqa: BLE001 - any unreadable data file is a violation
            self.problems.append(f"incomplete data file {path}: {type(e).__name__}: {e}")
        self._checked.add(path)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception as e:  # noqa: BLE001 - a watcher that stops watching must fail the test
                self.problems.append(f"watcher failed: {type(e).__name__}: {e}")
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "OutputWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.check_once()


def run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Start ``fn(*args, **kwargs)`` in a thread; the dict gets ``result`` or ``error``."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, name="pretokenize", daemon=True)
    thread.start()
    return thread, box


def wait_until(predicate, timeout_s: float = 120.0, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true; False when ``timeout_s`` passed first (a hung run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def read_output(out: str, storage_options: dict | None = None) -> dict[str, pa.Table]:
    """data file name -> its ``key`` and ``tokens`` columns."""
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    fs.invalidate_cache()
    tables = {}
    for path in sorted(fs.glob(f"{root.rstrip('/')}/data/*.parquet")):
        with fs.open(path, "rb") as f:
            tables[path.rsplit("/", 1)[-1]] = pq.read_table(f, columns=["key", "tokens"])
    return tables


def keyed_tokens(tables: dict[str, pa.Table]) -> dict[str, list]:
    """key -> tokens over all files; fails on a duplicate key."""
    result: dict[str, list] = {}
    for table in tables.values():
        for key, toks in zip(table["key"].to_pylist(), table["tokens"].to_pylist()):
            assert key not in result, f"duplicate key {key}"
            result[key] = toks
    return result


def assert_same_tokens(out: str, clean: str, storage_options: dict | None = None) -> None:
    """``out`` holds the clean run's files with identical token columns, and the same keys with
    the same tokens, none duplicated or missing."""
    got, want = read_output(out, storage_options), read_output(clean)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name in want:
        assert got[name]["tokens"].equals(want[name]["tokens"]), f"tokens column of {name} differs from the clean run"
    got_keys, want_keys = keyed_tokens(got), keyed_tokens(want)
    assert got_keys.keys() == want_keys.keys(), "missing or extra keys"
    assert all(got_keys[k] == want_keys[k] for k in want_keys), "tokens differ from the clean run"
