"""Fault-drill helpers: an S3 proxy that injects errors, an encoder actor with planned faults,
an output watcher, run comparison.

``FaultyS3Proxy`` listens on 127.0.0.1 only and forwards to a real S3 endpoint (the moto server).
Whether a request fails is a seeded hash of (method, key, query, range, n-th occurrence of that
request), so the same requests fail in every run whatever the interleaving of the processes.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import decode as decode_module
from pipeline.actor import SIMULATED_GPUS_ENV, EncoderWorker
from pipeline.decode import decode_record
from pipeline.ledger import ShardStats
from pipeline.records import DecodedImage
from pipeline.sources import iter_records, list_source
from tokenizer import load_tokenizer
from tokenizer.transform import ImageTransform

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
        if fault == "lose":  # acknowledge a write that never reaches the store
            self._reply(200, [("ETag", '"%s"' % hashlib.md5(body).hexdigest())], b"")
            return
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
                 max_requests: int = 20_000, lifetime_s: float = 600.0, lose_first_put: str | None = None):
        """``lose_first_put``: the first PUT of each key containing this text is acknowledged
        but dropped (a store that loses a write)."""
        parsed = urllib.parse.urlsplit(upstream_url)
        self.upstream = (parsed.hostname, parsed.port)
        self.seed, self.max_requests, self.lose_first_put = seed, max_requests, lose_first_put
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
            if (self.lose_first_put and method == "PUT" and self.lose_first_put in key and not query
                    and self._seen[ident] == 1):
                self.counts["lose PUT"] += 1
                return "lose"
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
        # listed first: a stats file's data file must be in the next listing (QA thumbnails are not stats)
        stats_paths = [p for p in self._list("stats") if p.endswith(".json")]
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


def finish(thread: threading.Thread, box: dict, timeout_s: float = 240.0):
    """The result of a ``run_in_thread`` call; fails when it hung or raised."""
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the run did not finish within {timeout_s:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def pretokenize_cli(*args) -> tuple[int, str, str]:
    """``pretok pretokenize ARGS`` in this process (joining the running cluster): exit status,
    stdout, stderr."""
    from jobs import pretokenize

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pretokenize.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def unshare_prefix() -> list[str] | None:
    """A command prefix that runs its command in a new mount namespace (where a bind mount gives
    it its own view of a folder), if this machine allows it."""
    for prefix in (["unshare", "-m"], ["unshare", "-m", "-r"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


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


def expected_tokens(inp, tok_dir, views="center", storage_options=None, **reading) -> dict[str, np.ndarray]:
    """key -> tokens [V,N] computed directly: the shared transform + tok.encode, no pipeline
    (``reading``: ``iter_records`` options such as ``max_member_bytes``)."""
    tok = load_tokenizer(tok_dir)
    transform = ImageTransform(tok.image_size, views)
    out = {}
    for shard in list_source(inp, storage_options=storage_options, images_per_shard=6).shards:
        for rec in iter_records(shard, storage_options, **reading):
            d = decode_record(rec, transform)
            if isinstance(d, DecodedImage):
                with torch.no_grad():
                    out[d.key] = tok.encode(torch.from_numpy(d.views).float() / 255).numpy()
    return out


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


class FaultyEncoder(EncoderWorker):
    """The real encoder actor with faults planned in ``faults.json`` beside the output folder
    (``tests`` installs it as ``pipeline.distributor.EncoderActor``). Keys of the plan:

    ``broken_gpu``: every shard raises on the actor holding this GPU id (a bad GPU);
    ``cuda_error_gpu``: the first shard on the actor holding this GPU id raises torch's CUDA
    out-of-memory error (before ``broken_gpu`` faults);
    ``hang_once``: the first shard never returns;
    ``hog_once``: bytes the first shard allocates (for Ray's memory monitor to kill it);
    ``vanish_once``: the first committed shard's files disappear (as on a node-local disk);
    ``real_gpus``: start() as on a machine whose Ray GPUs are real (no CPU simulation);
    ``decode_errors``: {key: exception class name}: decoding that image raises, on the first try;
    ``cwd``: actors run in this working directory (as under ``ray job submit --working-dir``).
    "Once" faults are shared by all actors of the run through marker files in the same folder.
    """

    def __init__(self, tokenizer_src, expected_fingerprint, job, torch_threads, decode_workers=0):
        super().__init__(tokenizer_src, expected_fingerprint, job, torch_threads, decode_workers)
        self.folder = os.path.dirname(os.path.abspath(job.layout.root))
        path = os.path.join(self.folder, "faults.json")
        self.plan = json.load(open(path)) if os.path.exists(path) else {}
        if "cwd" in self.plan:
            os.chdir(self.plan["cwd"])

    def _once(self, name: str) -> bool:
        return once(self.folder, name)

    def start(self):
        if self.plan.get("real_gpus"):
            os.environ.pop(SIMULATED_GPUS_ENV, None)
        identity = super().start()
        if self.plan.get("decode_errors") and self.decode_workers == 0:
            install_decode_errors(self.folder, self.plan["decode_errors"])  # decoding runs in this process
        return identity

    def decode_initializer(self) -> tuple:
        if self.plan.get("decode_errors"):  # decoding runs in the decode worker processes
            return install_decode_errors, (self.folder, self.plan["decode_errors"])
        return super().decode_initializer()

    def run(self, shard, attempt=1):
        gpus = self.identity.get("gpu_ids", [])
        if self.plan.get("cuda_error_gpu") in gpus and self._once("cuda"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.plan.get("broken_gpu") in gpus:
            raise RuntimeError(f"broken GPU {gpus}: illegal instruction")
        if self.plan.get("hang_once") and self._once("hang"):
            time.sleep(3600)
        if self.plan.get("hog_once") and self._once("hog"):  # Ray's memory monitor kills us here
            hog = np.ones(self.plan["hog_once"] // 8)
            time.sleep(30)
            del hog
        stats = super().run(shard, attempt)
        if self.plan.get("vanish_once") and self._once("vanish"):  # committed where the driver cannot see it
            os.unlink(self.job.layout.stats_path(shard.index))
            os.unlink(self.job.layout.data_path(shard.index))
        return stats


def once(folder: str, name: str) -> bool:
    """True for the first caller of any process of the run (a marker file in ``folder``)."""
    try:
        os.close(os.open(os.path.join(folder, f"fault-{name}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def install_decode_errors(folder: str, errors: dict[str, str]) -> None:
    """In this process: decoding image ``key`` raises ``errors[key]`` (an exception class name),
    once per run, from outside Pillow (where the real decoder runs it: an actor or decode worker)."""
    real_to_rgb, real_decode = decode_module.to_rgb, decode_module.decode_record

    def to_rgb(img):
        key = _DECODING.key
        if key in errors and once(folder, f"decode-{key}"):
            raise {"MemoryError": MemoryError, "RuntimeError": RuntimeError}[errors[key]](f"injected for {key}")
        return real_to_rgb(img)

    def decode_record(record, *args, **kwargs):
        _DECODING.key = record.key
        return real_decode(record, *args, **kwargs)

    import pipeline.encode as encode_module
    decode_module.to_rgb = to_rgb
    decode_module.decode_record = encode_module.decode_record = decode_record


_DECODING = threading.local()
