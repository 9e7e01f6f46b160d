"""The ``--loader ray-data`` feed: the token shards as a Ray Dataset (uint16 tokens and labels kept)."""
from __future__ import annotations

import ray

from pipeline.tokens import TokenFiles

from .train import TrainJob, World


def read_tokens(files: TokenFiles):
    """``ray.data.read_parquet`` of a split's shards, tokens and labels only (types as stored)."""
    import ray.data

    filesystem = None
    paths = list(files.files)
    if "://" in files.root:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, _ = fsspec.core.url_to_fs(files.root, **(files.storage_options or {}))
        filesystem = PyFileSystem(FSSpecHandler(fs))  # s3fs honours AWS_ENDPOINT_URL, pyarrow's S3 does not
        paths = [fs._strip_protocol(p) for p in paths]
    return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(["tokens", "label"])


def iterator_factory(job: TrainJob, world: World):
    """``epoch -> iterable with iter_batches``: this rank's Ray Train dataset shard, or (local run) the
    whole dataset, its block order shuffled per epoch."""
    if world.in_ray_train:  # the trainer was given datasets={"train": ...}
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        return lambda epoch: shard
    from pipeline.distributor import ensure_ray

    ensure_ray()
    files, _ = job.data.open()
    dataset = read_tokens(files)
    return lambda epoch: dataset.randomize_block_order(seed=job.train.seed + epoch)
