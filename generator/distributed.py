"""``--train-workers N``: the training loop on Ray Train (``TorchTrainer``; DDP over gloo on CPU, nccl on GPU).

Every worker runs ``generator.train.fit`` with its rank and world size from the Ray Train context;
rank 0 commits to CKPT. A worker that dies makes Ray Train restart the group (``FailureConfig``
``max_failures``), and the restarted workers continue from CKPT's last commit, so no step is lost or
done twice. Before anything starts, a placement group of the workers' bundles must be placeable
within ``placement_timeout_s``; otherwise the error names what was asked and what the cluster has.
"""
from __future__ import annotations

import logging
import os
import tempfile
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from .train import TrainJob, World, fit

log = logging.getLogger("pretok")
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def worker_bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def check_placement(workers: int, bundle: dict[str, float], timeout_s: float) -> None:
    """Reserve ``workers`` x ``bundle`` (PACK, as Ray Train does) and release it; a clear error when
    Ray cannot place it within ``timeout_s`` (Ray Train itself would wait and retry without end)."""
    pg = placement_group([dict(bundle)] * workers, strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready:
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        raise RuntimeError(
            f"cannot place {workers} training workers x {bundle} within {timeout_s:g} s: the cluster has "
            f"{total or 'no CPU/GPU'} in all, {free or 'nothing'} free now (lower --train-workers, "
            "--cpus-per-worker or --gpus-per-worker, or add nodes)"
        )


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    device = None
    if config["use_gpu"]:
        import torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) use the current device
    world = World(rank=ctx.get_world_rank(), size=ctx.get_world_size(), device=device,
                  report=lambda metrics: ray.train.report(metrics), in_ray_train=True)
    fit(job, world)


class TrainingFailed(RuntimeError):
    """Ray Train gave up on the run (its last error attached); CKPT keeps the last commit."""


def fit_distributed(
    job: TrainJob,
    workers: int,
    *,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 0.5,
    max_failures: int = 3,
    placement_timeout_s: float = 120.0,
) -> None:
    """Run ``job`` on ``workers`` Ray Train workers (the cluster at RAY_ADDRESS, or a local one)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.distributor import ensure_ray

    ensure_ray()
    bundle = worker_bundle(cpus_per_worker, gpus_per_worker)
    check_placement(workers, bundle, placement_timeout_s)
    # Ray Train retries a worker group that cannot start; bound each try by the placement timeout.
    os.environ.setdefault(START_TIMEOUT_ENV, str(max(60.0, placement_timeout_s)))
    use_gpu = gpus_per_worker > 0
    datasets = None
    if job.data.loader == "ray-data":
        from .ray_data import read_tokens

        datasets = {"train": read_tokens(job.data.open()[0])}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=bundle),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"pretok-train-{uuid.uuid4().hex[:8]}",
            storage_path=os.path.join(tempfile.gettempdir(), "pretok-ray-train"),  # Ray's own run files only
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=3),
        ),
        datasets=datasets,
    )
    log.info("Ray Train: %d workers x %s, %s", workers, bundle, "nccl" if use_gpu else "gloo")
    try:
        trainer.fit()
    except TrainingFailedError as e:
        raise TrainingFailed(f"Ray Train stopped after {max_failures} restarts; {job.ckpt} keeps its last "
                             f"commit: {e}") from e
