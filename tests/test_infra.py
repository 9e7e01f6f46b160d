"""infra/: manifests parse, GPU groups ask for GPUs, every pretokenize command parses with the real CLI,
documented modules exist, and no AWS secret is written down anywhere."""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.plan import NodeShape, plan_actors
from tests.infra_docs import README, readme_commands, readme_ray_start_nodes

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())
PRETOKENIZE = ["python", "-m", "jobs.pretokenize"]
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
SECRET_OPTION_KEYS = {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
_B64 = "[A-Za-z0-9/+]"
SECRET_PATTERNS = [
    re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"),  # access key ids
    re.compile(rf"(?i)(?:aws_secret_access_key|aws_session_token)['\"]?[ \t]*[:=][ \t]*['\"]?{_B64}{{16,}}"),
    # a bare 40-character secret key: mixed case and digits
    re.compile(rf"(?<![A-Za-z0-9/+=])(?={_B64}*[a-z])(?={_B64}*[A-Z])(?={_B64}*[0-9]){_B64}{{40}}(?![A-Za-z0-9/+=])"),
]


@functools.cache
def parser():
    from jobs.pretokenize import build_parser

    return build_parser()


def parse_pretokenize(argv: list[str]):
    try:
        return parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"jobs.pretokenize rejects {shlex.join(argv)}")


def pretokenize_argv(command: str) -> list[str]:
    """Arguments after `python -m jobs.pretokenize` in a shell command line."""
    tokens = shlex.split(command.replace("\\\n", " "))
    for i in range(len(tokens) - 2):
        if tokens[i : i + 3] == PRETOKENIZE:
            return tokens[i + 3 :]
    raise ValueError(f"not a `python -m jobs.pretokenize` command: {command!r}")


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def nodes(obj):
    yield obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for child in children:
        yield from nodes(child)


def literal_secret_env(doc) -> list[str]:
    """Secret env vars given a value instead of a secretKeyRef."""
    return [
        n["name"] for n in nodes(doc)
        if isinstance(n, dict) and n.get("name") in SECRET_ENV
        and ("value" in n or "secretKeyRef" not in n.get("valueFrom", {}))
    ]


@functools.cache
def manifests() -> dict[str, list[dict]]:
    return {
        str(p.relative_to(INFRA)): [d for d in yaml.safe_load_all(p.read_text()) if d is not None] for p in YAML_FILES
    }


def kube(kind: str) -> dict:
    found = [d for docs in manifests().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def cluster_specs() -> list[dict]:
    return [kube("RayCluster")["spec"], kube("RayJob")["spec"]["rayClusterSpec"]]


def aws_cluster() -> dict:
    (doc,) = manifests()["aws/cluster.yaml"]
    return doc


def kuberay_nodes(spec: dict) -> list[NodeShape]:
    """The nodes a RayCluster spec starts (head first), as ``ray.nodes()`` would show them."""
    head = spec["headGroupSpec"]["rayStartParams"]
    nodes = [NodeShape("head", "head", float(head["num-cpus"]), float(head.get("num-gpus", 0)), head=True)]
    for g in spec["workerGroupSpecs"]:
        p = g["rayStartParams"]
        nodes += [NodeShape(f"{g['groupName']}-{i}", g["groupName"], float(p["num-cpus"]), float(p.get("num-gpus", 0)))
                  for i in range(g["replicas"])]
    return nodes


def aws_nodes(cfg: dict) -> list[NodeShape]:
    """The nodes of the autoscaler config at its minimum size (head first)."""
    types = cfg["available_node_types"]

    def shape(name: str, i: int, head: bool = False) -> NodeShape:
        res = types[name]["resources"]
        return NodeShape(f"{name}-{i}", name, float(res.get("CPU", 0)), float(res.get("GPU", 0)), head=head)

    return [shape(cfg["head_node_type"], 0, head=True)] + [
        shape(name, i) for name, t in types.items() for i in range(t.get("min_workers", 0))]


def readme_local_nodes() -> list[NodeShape]:
    """The one-machine cluster of the README's `ray start` lines."""
    return [NodeShape(f"node-{i}", "local", float(n["num_cpus"]), float(n["num_gpus"]), head=n["head"])
            for i, n in enumerate(readme_ray_start_nodes())]


def documented_clusters() -> dict[str, list[NodeShape]]:
    return {"kuberay": kuberay_nodes(kube("RayCluster")["spec"]), "aws": aws_nodes(aws_cluster()),
            "README one machine": readme_local_nodes()}


def assert_plan_places_every_gpu(args, nodes: list[NodeShape], where: str) -> None:
    """The driver's plan for ``args`` on ``nodes``: one actor per GPU, all of them placed, none on the head."""
    plan = plan_actors(nodes, args.actors, args.gpus_per_actor, args.cpus_per_actor, args.decode_workers)
    gpus = sum(n.gpus for n in nodes)
    assert plan.gpus_per_actor == 1 and plan.actors == gpus, f"{where}: {plan.describe()}"
    assert plan.capacity >= plan.actors, f"{where}: not every actor fits: {plan.describe()}"
    assert all(plan.fits(n) == 0 for n in nodes if n.head and not n.gpus), f"{where}: {plan.describe()}"


def pretokenize_commands() -> list[tuple[str, str]]:
    """(where, command) for every string in infra/ that runs the pretokenize job."""
    out = [(name, n) for name, docs in manifests().items() for n in nodes(docs)
           if isinstance(n, str) and "jobs.pretokenize" in n]
    out += [("README.md", c) for c in readme_commands() if "jobs.pretokenize" in c]
    return out


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def worker_groups(spec: dict) -> list[dict]:
    return [g for g in spec["workerGroupSpecs"] if int(g["rayStartParams"].get("num-gpus", 0)) > 0]


def test_yaml_parses_and_expected_files_exist():
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "aws/cluster.yaml"} <= set(manifests())
    for name, docs in manifests().items():
        assert docs and all(isinstance(d, dict) for d in docs), name


def test_kuberay_kinds_and_api_versions():
    for name, docs in manifests().items():
        if name.startswith("kuberay/"):
            for d in docs:
                assert d["apiVersion"] == "ray.io/v1", name
                assert d["kind"] in {"RayCluster", "RayJob"}, name
    assert kube("RayCluster") and kube("RayJob")


@pytest.mark.parametrize("which", [0, 1], ids=["raycluster", "rayjob"])
def test_head_has_no_gpu_and_gpu_workers_request_gpus(which):
    spec = cluster_specs()[which]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head should only run the driver"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    groups = worker_groups(spec)
    assert groups, "no GPU worker group"
    for g in groups:
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values must be strings"
        (c,) = g["template"]["spec"]["containers"]
        for kind in ("requests", "limits"):
            res = c["resources"][kind]
            assert int(res["nvidia.com/gpu"]) == int(params["num-gpus"]) >= 1, kind
            assert float(res["cpu"]) == float(params["num-cpus"]) >= 2, kind
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], "actor pool is planned from GPUs at start"
    images = {c["image"] for n in nodes(spec) if isinstance(n, dict) and "containers" in n for c in n["containers"]}
    assert len(images) == 1 and not next(iter(images)).endswith(":latest"), images


def test_rayjob_runs_the_raycluster_spec_once_and_cleans_up():
    job = kube("RayJob")["spec"]
    assert job["rayClusterSpec"] == kube("RayCluster")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["backoffLimit"], int) and 1 <= job["backoffLimit"] <= 5


def test_rayjob_entrypoint_fits_its_cluster():
    job = kube("RayJob")["spec"]
    args = parse_pretokenize(pretokenize_argv(job["entrypoint"]))
    assert all(u.startswith("s3://") for u in (*args.input, args.output, args.tokenizer))
    assert (args.views, args.precision, args.gpus_per_actor) == ("flip", "bf16", 1.0)
    assert_plan_places_every_gpu(args, kuberay_nodes(job["rayClusterSpec"]), "rayjob.yaml")


def test_aws_cluster_config_is_valid_for_the_ray_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = aws_cluster()
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    validate_config(prepare_config(cfg))  # Ray's own schema, defaults filled in
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types
    for t in gpu_types:
        assert 1 <= t["min_workers"] == t["max_workers"] <= cfg["max_workers"]
        assert t["resources"]["CPU"] >= 2
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"], "S3 access must come from an instance profile"
    assert cfg["docker"]["image"] and not cfg["setup_commands"]
    assert not any(n in json.dumps(cfg) for n in SECRET_ENV)


def test_every_pretokenize_command_parses():
    cmds = pretokenize_commands()
    assert {w for w, _ in cmds} >= {"kuberay/rayjob.yaml", "README.md"}
    for where, cmd in cmds:
        args = parse_pretokenize(pretokenize_argv(cmd))
        assert args.storage_options is None or not SECRET_OPTION_KEYS & {
            k.lower() for n in nodes(args.storage_options) if isinstance(n, dict) for k in n
        }, f"{where}: credentials in --storage-options"


def test_readme_ray_job_submit_parses_and_fits_every_documented_cluster():
    from ray.dashboard.modules.job.cli import submit

    lines = [c for c in readme_commands() if c.startswith("ray job submit")]
    assert len(lines) >= 2  # a running cluster; one machine (tests/test_cluster_job.py runs that one)
    for line in lines:
        ctx = submit.make_context("ray job submit", shlex.split(line, comments=True)[3:])
        assert ctx.params["working_dir"] == "."
        entry = list(ctx.params["entrypoint"])
        assert entry[:3] == PRETOKENIZE
        args = parse_pretokenize(entry[3:])
        for name, nodes in documented_clusters().items():
            assert_plan_places_every_gpu(args, nodes, f"{name}: {line}")


def test_documented_cluster_shapes():
    """The shapes the plan is checked on are the documented ones: CPU heads and 1-GPU workers."""
    clusters = documented_clusters()
    assert [(n.cpus, n.gpus) for n in clusters["kuberay"]] == [(0, 0)] + [(11, 1)] * 8
    assert [(n.cpus, n.gpus) for n in clusters["aws"]] == [(0, 0)] + [(8, 1)] * 8
    local = clusters["README one machine"]
    assert local[0].head and local[0].gpus == 0 and all(n.gpus >= 1 for n in local[1:])


def test_dockerfile():
    ins = dockerfile()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], next(a for k, a in ins if k == "FROM"))
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert m, f"not a Ray CUDA base image: {base}"
    assert {m.group(1)} == {s["rayVersion"] for s in cluster_specs()}, "image and KubeRay rayVersion differ"
    kinds = [k for k, _ in ins]
    assert "ENTRYPOINT" not in kinds, "KubeRay and the autoscaler override the command"
    assert "WORKDIR" in kinds
    assert any(k == "RUN" and re.search(r"pip install [^&]*\s\.(\s|$)", a) for k, a in ins), "project not installed"
    assert not [a for k, a in ins if k in ("ENV", "ARG") and "AWS_" in a]
    ignored = set((INFRA / "Dockerfile.dockerignore").read_text().split())
    assert {".git", "**/.aws", "**/.env"} <= ignored, "credentials could be copied into the image"
    (cmd,) = [json.loads(a) for k, a in ins if k == "CMD"]
    assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(cmd[2]) is not None, cmd


def test_documented_modules_and_scripts_exist():
    text = "\n".join(p.read_text() for p in (README, DOCKERFILE, *YAML_FILES))
    modules = set(re.findall(r"python -m ([\w.]+)", text))
    assert "jobs.pretokenize" in modules
    for mod in modules:
        assert importlib.util.find_spec(mod) is not None, mod
    for script in set(re.findall(r"python ([\w/]+\.py)", text)):
        assert (ROOT / script).is_file(), script


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_aws_secrets(path):
    assert not secrets_in(path.read_text()), path
    if path.suffix in (".yaml", ".yml"):
        for doc in manifests()[str(path.relative_to(INFRA))]:
            assert not literal_secret_env(doc), path


def test_checks_catch_bad_input():
    key_id = "AKIA" + "QX7T" * 4
    secret = "wJalr" + "XUtnFEMI" * 4 + "K7M"
    assert secrets_in(f"env:\n  - {key_id}") == [key_id]
    assert secrets_in(f"aws_secret_access_key: {secret}")
    assert secrets_in(f"--from-literal=AWS_SECRET_ACCESS_KEY={secret}")
    assert not secrets_in('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')
    assert literal_secret_env({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}) == ["AWS_SECRET_ACCESS_KEY"]
    ref = {"secretKeyRef": {"name": "s", "key": "k"}}
    assert not literal_secret_env({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": ref}]})
    with pytest.raises(ValueError):
        pretokenize_argv("python -m jobs.pretokenise in out --tokenizer t")
    with pytest.raises(pytest.fail.Exception):
        parse_pretokenize(pretokenize_argv("python -m jobs.pretokenize in out --tokenizer t --views five"))
