"""Actor sizing per node (pipeline/plan.py) over ``ray.nodes()``-like node lists: every actor of the
default plan fits on the cluster shapes users run, a CPU head never inflates the request, overrides
win. Real multi-node placement is checked in tests/test_cluster_job.py and the documented infra shapes
in tests/test_infra.py."""
from __future__ import annotations

import itertools

import pytest

from pipeline.plan import CPU_ACTOR_CPUS, PENDING_GPU_CPUS, NodeShape, plan_actors, plan_warnings


_ids = itertools.count()


def node(cpus: float, gpus: float = 0, head: bool = False) -> NodeShape:
    return NodeShape(f"node{next(_ids):03d}", "10.0.0.1", cpus, gpus, head)


def cpu_head(cpus: float = 1) -> NodeShape:
    return node(cpus, 0, head=True)


def assert_every_actor_fits(plan) -> None:
    assert plan.capacity >= plan.actors, plan.describe()


@pytest.mark.parametrize("shape", [
    # (head CPUs, [(CPUs, GPUs) per worker], CPUs per actor): the cluster and the infra/ shapes
    (1, [(2, 1)], 2),                     # issue 15: CPU head + one 1-GPU node with 2 CPUs
    (1, [(2, 1), (2, 2)], 1),             # tests/test_cluster_job.py: smallest share of two GPU node shapes
    (0, [(11, 1)] * 8, 11),               # KubeRay pods (A100 share)
    (0, [(8, 1)] * 8, 8),                 # 8 x g5.2xlarge
    (8, [(96, 8)] * 2, 12),               # p4d.24xlarge: no cap at 8
    (8, [(192, 8)] * 4, 24),              # p5.48xlarge (8 x H100, 192 vCPUs)
    (64, [(4, 1)] * 4, 4),                # a big CPU head must not inflate the request
    (0, [(192, 8), (8, 1)], 8),           # mixed GPU node shapes: fits on both
    (1, [(11, 2)], 5.5),                  # CPUs that do not divide: fractional share, nothing left over
    (1, [(8, 3)], 2.66),                  # rounded down, so 3 shares fit in 8 CPUs
], ids=["issue15", "test-cluster", "kuberay", "aws-g5", "p4d", "p5", "big-cpu-head", "mixed-gpu", "11-over-2", "8-over-3"])
def test_default_plan_gives_each_gpu_its_nodes_cpus_and_places_every_actor(shape):
    head_cpus, workers, cpus = shape
    nodes = [cpu_head(head_cpus), *(node(c, g) for c, g in workers)]
    plan = plan_actors(nodes)
    assert plan.actors == sum(g for _, g in workers) and plan.gpus_per_actor == 1
    assert plan.cpus_per_actor == cpus and plan.decode_workers == int(cpus)
    assert_every_actor_fits(plan)
    assert plan.fits(nodes[0]) == 0, "an actor asked for a GPU the head does not have"
    assert all(plan.fits(n) == n.gpus for n in nodes[1:]), plan.describe()


def test_fractional_gpus_split_the_nodes_cpus_too():
    plan = plan_actors([cpu_head(), node(8, 1), node(16, 2)], gpus_per_actor=0.5)
    assert (plan.actors, plan.cpus_per_actor, plan.decode_workers) == (6, 4, 4)
    assert_every_actor_fits(plan)


def test_a_node_without_a_whole_gpu_share_is_not_a_host():
    plan = plan_actors([cpu_head(), node(4, 1), node(64, 2)], gpus_per_actor=2)
    assert (plan.actors, plan.cpus_per_actor) == (1, 64)
    assert plan.fits(NodeShape("n", "a", 4, 1)) == 0


def test_overrides_win():
    nodes = [cpu_head(), node(16, 2)]
    plan = plan_actors(nodes, actors=1, cpus_per_actor=3, decode_workers=5)
    assert (plan.actors, plan.gpus_per_actor, plan.cpus_per_actor, plan.decode_workers) == (1, 1, 3, 5)
    assert plan_actors(nodes, cpus_per_actor=0.5).decode_workers == 1  # at least one decoder


def test_an_override_that_fits_nowhere_is_reported():
    plan = plan_actors([cpu_head(), node(2, 1)], cpus_per_actor=3)  # the hang of issue 15, asked for explicitly
    assert plan.capacity == 0
    (warning,) = plan_warnings(plan, gpus_per_actor=None)
    assert "hold 0 of 1 actors asking for {GPU: 1, CPU: 3}" in warning and "--cpus-per-actor" in warning
    assert "room for 0 actors" in plan.describe()


def test_gpu_actors_asked_for_before_any_gpu_node_is_up():
    plan = plan_actors([cpu_head(16)], gpus_per_actor=1)  # an autoscaler will add GPU nodes
    assert (plan.actors, plan.cpus_per_actor) == (1, PENDING_GPU_CPUS)
    (warning,) = plan_warnings(plan, gpus_per_actor=1)
    assert "wait for nodes" in warning and "NO GPUS" not in warning


@pytest.mark.parametrize("cpus, actors, cpus_each", [
    ((2,), 1, 2),                          # this machine (CI): one actor with both CPUs
    ((16,), 4, CPU_ACTOR_CPUS),
    ((1, 16), 4, CPU_ACTOR_CPUS),          # a 1-CPU head takes no CPU actor
    ((6,), 1, CPU_ACTOR_CPUS),
])
def test_cpu_fallback_without_gpus(cpus, actors, cpus_each):
    plan = plan_actors([node(c, head=i == 0) for i, c in enumerate(cpus)])
    assert (plan.actors, plan.gpus_per_actor, plan.cpus_per_actor) == (actors, 0, cpus_each)
    assert_every_actor_fits(plan)
    (warning,) = plan_warnings(plan, gpus_per_actor=None)
    assert warning.startswith("NO GPUS") and f"{actors} encoder actors run on CPU" in warning


def test_cpu_actors_given_get_the_largest_share_that_places_them_all():
    assert plan_actors([node(16)], actors=1).cpus_per_actor == 16
    plan = plan_actors([cpu_head(), node(16)], actors=3)
    assert plan.cpus_per_actor == 5.33 and plan.fits(plan.nodes[1]) == 3
    plan = plan_actors([node(4), node(6)], actors=3)
    assert plan.cpus_per_actor == 3 and plan.capacity == 3


def test_too_many_cpu_actors_are_reported():
    plan = plan_actors([node(2)], actors=4, gpus_per_actor=0, cpus_per_actor=1)
    (warning,) = plan_warnings(plan, gpus_per_actor=0)
    assert "hold 2 of 4 actors asking for {GPU: 0, CPU: 1}" in warning and "--gpus-per-actor" not in warning


def test_cpu_chosen_explicitly_is_not_a_fallback():
    plan = plan_actors([cpu_head(), node(8, 1)], gpus_per_actor=0)
    assert plan.gpus_per_actor == 0 and plan_warnings(plan, gpus_per_actor=0) == []


def test_node_shapes_from_ray_nodes():
    head = {"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1",
            "Resources": {"CPU": 4.0, "memory": 1e9, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}}
    worker = {"NodeID": "b" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2",
              "Resources": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}}
    assert NodeShape.from_ray(head) == NodeShape("a" * 56, "10.0.0.1", 4.0, 0.0, True)
    assert NodeShape.from_ray(worker) == NodeShape("b" * 56, "10.0.0.2", 8.0, 1.0, False)
    plan = plan_actors([NodeShape.from_ray(head), NodeShape.from_ray(worker)])
    assert plan.describe().splitlines() == [
        "actor plan: 1 encoder actors x {1 GPU, 8 CPU}, 8 decode workers each; 2 alive nodes, 1 GPUs, room for 1 actors",
        "  node aaaaaaaaaaaa 10.0.0.1 (head): 4 CPU, 0 GPU -> 0 actors",
        "  node bbbbbbbbbbbb 10.0.0.2: 8 CPU, 1 GPU -> 1 actors",
    ]


@pytest.mark.parametrize("kwargs", [{"actors": 0}, {"cpus_per_actor": -1}, {"gpus_per_actor": -0.5}, {"decode_workers": -1}])
def test_bad_overrides_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be >= "):
        plan_actors([node(4, 1)], **kwargs)


def test_cli_sizing_flags(capsys):
    from jobs.pretokenize import build_parser, config_from_args

    base = ["in", "out", "--tokenizer", "tok"]
    cfg = config_from_args(build_parser().parse_args([*base, "--cpus-per-actor", "2.5", "--decode-workers", "3"]))
    assert (cfg.actors, cfg.gpus_per_actor, cfg.cpus_per_actor, cfg.decode_workers) == (None, None, 2.5, 3)
    for bad in (["--decode-workers", "-1"], ["--cpus-per-actor", "-1"], ["--cpus-per-actor", "nan"], ["--actors", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])
        assert "must be >= " in capsys.readouterr().err
