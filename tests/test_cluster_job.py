"""The documented cluster path, end to end: `ray job submit --working-dir <checkout> -- python -m
jobs.pretokenize ...` onto a running multi-node Ray cluster whose head serves the dashboard (the job
server), input, tokenizer and output on the moto S3 server.

The commands are those of infra/README.md ("Try it on one machine"): its `ray start` lines give the
nodes (a CPU head with 1 CPU, GPU nodes with 2 CPUs and 1 GPU and with 2 CPUs and 2 fake GPUs), started
with ``ray.cluster_utils.Cluster``, and its `ray job submit` line is submitted with the test's URLs,
address and S3 settings. That is the issue's failing shape plus a second GPU node shape: a plan from
cluster totals asked every actor for 5/3 CPUs, which only one actor per node can get, and the job hung.
Nodes start as `ray start` would from the project's activated environment: its python first on PATH,
no PYTHONPATH and no AWS variables, so the job can only work with the uploaded checkout and the S3
settings of its runtime env. One cluster for the module (``cluster``); more drills on it submit with
``submit(cluster, ...)``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray._common.utils import reset_ray_address
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient, JobType

from pipeline.ledger import ShardStats
from pipeline.plan import plan_cluster
from pipeline.synthetic import write_synthetic
from tests.faults import unshare_prefix
from tests.infra_docs import readme_argv, readme_ray_start_nodes
from tests.titok_fixtures import write_titok_checkpoint

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test: what --working-dir uploads
SHARDS, PER_SHARD = 4, 6
JOB_TIMEOUT_S = 300     # a hung job fails the test (and is stopped) instead of blocking the suite
STOP_TIMEOUT_S = 60
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def readme_nodes() -> tuple[dict, list[dict]]:
    """(head, workers) ``Cluster.add_node`` resources from the README's `ray start` lines."""
    nodes = readme_ray_start_nodes()
    shapes = [{"num_cpus": n["num_cpus"], "num_gpus": n["num_gpus"]} for n in nodes]
    heads = [s for s, n in zip(shapes, nodes) if n["head"]]
    assert len(heads) == 1 and len(shapes) >= 2, f"README: expected one `ray start --head` and workers: {nodes}"
    return heads[0], [s for s, n in zip(shapes, nodes) if not n["head"]]


def readme_job(inp: str, out: str, tokenizer: str) -> tuple[list[str], list[str]]:
    """(`ray job submit` options, entrypoint) of the README's local `ray job submit --address` line, with
    the URLs replaced."""
    from ray.dashboard.modules.job.cli import submit

    from jobs.pretokenize import build_parser

    lines = [argv for argv in readme_argv("ray job submit ") if "--address" in argv]
    assert len(lines) == 1, f"README: expected one `ray job submit --address ...` line, found {lines}"
    argv = lines[0][3:]
    entry = list(submit.make_context("ray job submit", list(argv)).params["entrypoint"])  # click eats its list
    args = build_parser().parse_args(entry[3:])
    assert len(args.input) == 1, f"README's ray job submit line: expected one INPUT, got {args.input}"
    swap = {args.input[0]: inp, args.output: out, args.tokenizer: tokenizer}
    return argv[: argv.index("--")], [swap.get(a, a) for a in entry]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    cluster: Cluster
    dashboard: str              # the job server, http://127.0.0.1:PORT
    client: JobSubmissionClient
    workers: dict[str, dict]    # node id -> the README's resources of that node
    temp_dir: str

    @property
    def gpu_nodes(self) -> dict[str, int]:
        """node id -> GPUs, for the nodes with GPUs."""
        return {node: shape["num_gpus"] for node, shape in self.workers.items() if shape["num_gpus"]}

    @property
    def cpus_per_gpu(self) -> float:
        """What the issue asks each actor to get: the smallest CPUs per GPU over the GPU nodes."""
        return min(self.workers[n]["num_cpus"] / g for n, g in self.gpu_nodes.items())

    @property
    def gpu_slots(self) -> set[tuple[str, str]]:
        """(node id, GPU id) of every GPU of the cluster."""
        return {(node, str(g)) for node, n in self.gpu_nodes.items() for g in range(n)}


@dataclass
class JobRun:
    submission_id: str
    returncode: int
    status: JobStatus
    logs: str

    def describe(self) -> str:
        return f"job {self.submission_id}: {self.status}, `ray job submit` exit {self.returncode}; job logs:\n{self.logs}"


def _wait_terminal(client: JobSubmissionClient, submission_id: str, timeout: float) -> JobStatus:
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(submission_id)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def _logs(rc: RayCluster, submission_id: str) -> str:
    try:
        return rc.client.get_job_logs(submission_id)
    except RuntimeError as e:  # e.g. the job was never created
        return f"(no job logs: {e})"


def _stop_jobs(rc: RayCluster) -> None:
    """Stop every submitted job still running; end a driver that outlives its stop (by pid, if it is ours)."""
    for job in rc.client.list_jobs():
        if job.type != JobType.SUBMISSION or job.status in TERMINAL:
            continue
        rc.client.stop_job(job.submission_id)
        _wait_terminal(rc.client, job.submission_id, STOP_TIMEOUT_S)
        pid = job.driver_info.pid if job.driver_info else None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
        except OSError:
            continue
        if b"jobs.pretokenize" in cmdline:
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(s3_server):
    from ray._private.utils import write_ray_address

    head, workers = readme_nodes()
    # Its own temp dir: the job server finds "its" cluster through the address file there (as after
    # `ray start --head`), which other clusters on this machine must not overwrite.
    temp_dir = tempfile.mkdtemp(prefix="pretok-ray-")
    venv_bin = str(Path(sys.executable).parent)
    with pytest.MonkeyPatch.context() as mp:  # the environment the nodes start with (and keep)
        mp.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
        for name in ("PYTHONPATH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "RAY_ADDRESS"):
            mp.delenv(name, raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={
            **head, "temp_dir": temp_dir, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
        })
        reset_ray_address()  # Cluster also publishes its address for any ray.init() on this machine: withdraw it
        write_ray_address(cluster.gcs_address, temp_dir)
        rc = None
        try:
            nodes = [cluster.add_node(temp_dir=temp_dir, **shape) for shape in workers]
            cluster.wait_for_nodes()
            dashboard = f"http://{cluster.webui_url}"
            rc = RayCluster(cluster, dashboard, JobSubmissionClient(dashboard),
                            {n.node_id: shape for n, shape in zip(nodes, workers)}, temp_dir)
            mp.undo()
            yield rc
        finally:
            if rc is not None:
                _stop_jobs(rc)
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def submit(rc: RayCluster, job: S3Job, output: str | None = None, timeout: float = JOB_TIMEOUT_S,
           wrap: Callable[[str], list[str]] | None = None) -> JobRun:
    """The README's `ray job submit` line for ``job``, waiting for its end. ``output`` replaces the job's
    output URL (a drill of another output, e.g. a local path, submits the same line); ``wrap`` turns the
    entrypoint's shell command into the one submitted (e.g. run in a mount namespace of its own)."""
    options, entrypoint = readme_job(job.input, output or job.output, job.tokenizer)
    if wrap is not None:
        entrypoint = wrap(shlex.join(entrypoint))
    assert options[options.index("--working-dir") + 1] == "."  # run from the checkout: it uploads ROOT
    options[options.index("--address") + 1] = rc.dashboard
    options[options.index("--runtime-env-json") + 1] = json.dumps({"env_vars": job.env})
    sid = f"pretok-{uuid.uuid4().hex[:8]}"
    ray_cli = Path(sys.executable).with_name("ray")
    cli = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    cmd = [*cli, "job", "submit", "--submission-id", sid, *options, "--", *entrypoint]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _stop_jobs(rc)
        printed = b"".join(x if isinstance(x, bytes) else (x or "").encode() for x in (e.stdout, e.stderr))
        pytest.fail(f"job {sid} did not finish within {timeout} s (stopped). `ray job submit` printed:\n"
                    f"{printed.decode(errors='replace')}\njob logs:\n{_logs(rc, sid)}")
    status = _wait_terminal(rc.client, sid, STOP_TIMEOUT_S)
    logs = _logs(rc, sid)
    if status not in TERMINAL:
        pytest.fail(f"`ray job submit` exited {proc.returncode} but job {sid} is {status}:\n{proc.stderr}\n{logs}")
    return JobRun(sid, proc.returncode, status, logs)


@dataclass(frozen=True)
class S3Job:
    """A dataset, a tokenizer and an output URL on the moto server, and the job's runtime env."""

    input: str
    output: str
    tokenizer: str
    keys: frozenset[str]
    storage_options: dict
    env: dict[str, str]


@pytest.fixture(scope="module")
def s3_job(s3_server, tmp_path_factory) -> S3Job:
    import s3fs

    so = s3_server.storage_options
    bucket = f"s3://{s3_server.bucket()}"
    info = write_synthetic(f"{bucket}/in", "webdataset", num_shards=SHARDS, images_per_shard=PER_SHARD,
                           num_classes=3, seed=3, storage_options=so)
    tok = write_titok_checkpoint("tiny_vq_single_stage", tmp_path_factory.mktemp("tok"))
    s3fs.S3FileSystem(**{"client_kwargs": {"endpoint_url": s3_server.endpoint_url}, "key": so["key"],
                         "secret": so["secret"]}).put(str(tok), f"{bucket}/tok", recursive=True)
    env = {"AWS_ACCESS_KEY_ID": so["key"], "AWS_SECRET_ACCESS_KEY": so["secret"],
           "AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"], "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    keys = frozenset(k for shard in info.shard_keys for k in shard)
    return S3Job(f"{bucket}/in", f"{bucket}/out", f"{bucket}/tok", keys, so, env)


def s3_listing(url: str, storage_options: dict) -> dict[str, tuple]:
    """path -> (ETag, LastModified) of every object under ``url``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    fs.invalidate_cache()
    return {p: (i.get("ETag"), i.get("LastModified")) for p, i in fs.find(root, detail=True).items()}


def read_stats(job: S3Job) -> list[ShardStats]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(job.output, **job.storage_options)
    fs.invalidate_cache()
    return [ShardStats.from_json(fs.cat_file(p)) for p in sorted(fs.glob(f"{root}/stats/*.json"))]


@pytest.fixture(scope="module")
def first_run(cluster: RayCluster, s3_job: S3Job) -> JobRun:
    """The job on a fresh output with every sizing default (no --actors/--gpus-per-actor/--cpus-per-actor)."""
    return submit(cluster, s3_job)


def test_job_succeeds_with_complete_rows_and_keys(first_run, s3_job):
    from datasets import load_dataset

    assert first_run.status == JobStatus.SUCCEEDED and first_run.returncode == 0, first_run.describe()
    stats = read_stats(s3_job)
    assert [s.index for s in stats] == list(range(SHARDS)), first_run.describe()
    assert all(s.rows_in == s.rows_written == PER_SHARD and not s.skipped for s in stats)
    ds = load_dataset("parquet", data_files=f"{s3_job.output}/data/train-*.parquet",
                      storage_options=dict(s3_job.storage_options), split="train")  # datasets adds keys
    keys = ds["key"]
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD and set(keys) == s3_job.keys
    assert f"{SHARDS} total: 0 already done, {SHARDS} written now, 0 failed" in first_run.logs


def test_actors_ran_on_gpu_nodes_with_distinct_gpus(first_run, cluster, s3_job):
    assert first_run.status == JobStatus.SUCCEEDED, first_run.describe()
    workers = [s.worker for s in read_stats(s3_job)]
    assert {w["node_id"] for w in workers} <= set(cluster.gpu_nodes), workers
    slots = {w["pid"]: (w["node_id"], tuple(w["gpu_ids"])) for w in workers}  # one entry per actor
    assert all(len(gpus) == 1 for _, gpus in slots.values()), slots
    assert len(set(slots.values())) == len(slots), f"two actors shared a GPU: {slots}"
    # each actor on its own GPU slot of the cluster (with two shards in flight per actor, the first
    # actors up may take every shard: the plan line of the logs shows all of them were asked for)
    assert {(node, gpus[0]) for node, gpus in slots.values()} <= cluster.gpu_slots, slots


def test_job_logs_show_the_actor_plan(first_run, cluster):
    gpus, cpus = len(cluster.gpu_slots), cluster.cpus_per_gpu
    assert f"actor plan: {gpus} encoder actors x {{1 GPU, {cpus:g} CPU}}, {int(cpus)} decode workers each; " \
           f"{1 + len(cluster.workers)} alive nodes, {gpus} GPUs, room for {gpus} actors" in first_run.logs, \
           first_run.describe()
    for node, shape in cluster.workers.items():
        line = rf"node {node[:12]} \S+: {shape['num_cpus']:g} CPU, {shape['num_gpus']:g} GPU -> {shape['num_gpus']} actors"
        assert re.search(line, first_run.logs), line
    assert re.search(r"\(head\): \d+ CPU, 0 GPU -> 0 actors", first_run.logs)
    assert "NO GPUS" not in first_run.logs and "wait for nodes" not in first_run.logs


def test_readme_job_uses_the_sizing_defaults():
    _, entrypoint = readme_job("in", "out", "tok")
    assert entrypoint[:3] == ["python", "-m", "jobs.pretokenize"]
    assert not {"--actors", "--gpus-per-actor", "--cpus-per-actor", "--decode-workers"} & set(entrypoint)


def test_resubmit_writes_nothing(first_run, cluster, s3_job):
    assert first_run.status == JobStatus.SUCCEEDED, first_run.describe()
    before = {p: v for p, v in s3_listing(s3_job.output, s3_job.storage_options).items() if "/data/" in p or "/stats/" in p}
    again = submit(cluster, s3_job)
    assert again.status == JobStatus.SUCCEEDED and again.returncode == 0, again.describe()
    assert f"{SHARDS} total: {SHARDS} already done, 0 written now, 0 failed" in again.logs, again.describe()
    after = {p: v for p, v in s3_listing(s3_job.output, s3_job.storage_options).items() if "/data/" in p or "/stats/" in p}
    assert len(before) == 3 * SHARDS and after == before  # data, stats JSON and QA thumbnail per shard


def test_upload_is_the_checkout_without_ignored_files(first_run, cluster):
    """`--working-dir` ships the project's tracked and untracked-unignored files: never .venv (gitignored),
    .git or caches, which could be far over Ray's package limit."""
    working_dir = cluster.client.get_job_info(first_run.submission_id).runtime_env["working_dir"]
    pkg = Path(cluster.cluster.head_node.get_session_dir_path(), "runtime_resources", "working_dir_files",
               Path(working_dir.split("://", 1)[1]).stem)
    uploaded = {str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file()}
    assert "jobs/pretokenize.py" in uploaded and "pipeline/plan.py" in uploaded, sorted(uploaded)[:20]
    assert not [p for p in uploaded if p.split("/")[0] in (".venv", ".git") or "__pycache__" in p]
    if shutil.which("git") and (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
        assert uploaded <= set(listed), sorted(uploaded - set(listed))[:20]


def test_default_plan_places_every_actor_next_to_a_cpu_only_node(cluster):
    """A CPU-only node with many CPUs joins: the plan is unchanged (it does not inflate the request) and
    one actor per GPU starts with it, each on its own GPU."""
    big = cluster.cluster.add_node(num_cpus=16, num_gpus=0, temp_dir=cluster.temp_dir)
    try:
        cluster.cluster.wait_for_nodes()
        ray.init(address=cluster.cluster.address, logging_level="WARNING")
        plan = plan_cluster()
        want = (len(cluster.gpu_slots), 1.0, cluster.cpus_per_gpu, int(cluster.cpus_per_gpu))
        assert (plan.actors, plan.gpus_per_actor, plan.cpus_per_actor, plan.decode_workers) == want, plan.describe()

        @ray.remote
        class Probe:
            def where(self) -> tuple[str, str]:
                return ray.get_runtime_context().get_node_id(), ",".join(map(str, ray.get_gpu_ids()))

        probes = [Probe.options(num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor).remote()
                  for _ in range(plan.actors)]
        refs = [p.where.remote() for p in probes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=120)
        assert len(ready) == len(refs), f"only {len(ready)} of {len(refs)} actors were placed within 120 s: {plan.describe()}"
        assert set(ray.get(refs)) == cluster.gpu_slots
    finally:
        ray.shutdown()
        cluster.cluster.remove_node(big)


def test_local_output_not_shared_with_the_gpu_nodes_fails_fast_and_writes_no_data(cluster, s3_job, tmp_path):
    """The same job into a local folder that the GPU nodes see differently from the driver (as on a
    cluster without a shared filesystem): the driver runs in a mount namespace where its own, empty
    folder covers ``outputs``, while the actors on the worker nodes write into the real one."""
    prefix = unshare_prefix()
    if prefix is None:
        pytest.skip("needs mount namespaces (unshare -m) to give the driver its own view of a folder")
    outputs, driver_view = tmp_path / "outputs", tmp_path / "driver-view"
    outputs.mkdir()
    driver_view.mkdir()
    out = outputs / "out"
    mount = f"mount --bind {shlex.quote(str(driver_view))} {shlex.quote(str(outputs))}"
    run = submit(cluster, s3_job, output=str(out), timeout=240,
                 wrap=lambda command: [*prefix, "sh", "-c", f"{mount} && exec {command}"])
    assert run.status == JobStatus.FAILED and run.returncode != 0, run.describe()
    assert f"local output {out} is not shared by the cluster" in run.logs, run.describe()
    assert "Use a filesystem every node mounts at the same path, or s3://" in run.logs
    assert "Traceback" not in run.logs, run.describe()
    assert (driver_view / "out" / "pretok.json").exists(), "the driver wrote its view, not the nodes' one"
    for where in (driver_view / "out", out, Path(cluster.temp_dir)):  # the driver's view, the nodes', their temp dirs
        written = [p for p in where.rglob("train-*") if p.suffix in (".parquet", ".json")]
        assert not written, f"{where}: {written}"
    assert not (driver_view / "out" / "data").exists() and not (out / "data").exists()
