"""Shared fixtures: a real S3 server (moto) on loopback, with fresh buckets per test."""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray tests start local clusters without auth tokens
# Ray's GPUs in tests are fake (ray.init(num_gpus=N)): GPU actors encode on CPU instead of refusing.
os.environ["PRETOK_SIMULATED_GPUS"] = "1"

S3_KEY = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server; the AWS environment variables point at it for the session."""

    endpoint_url: str

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for code that passes the endpoint and keys explicitly."""
        return {"endpoint_url": self.endpoint_url, "key": S3_KEY, "secret": S3_SECRET}

    def bucket(self) -> str:
        """Create a fresh, empty bucket and return its name."""
        import boto3

        name = f"pretok-{uuid.uuid4().hex[:16]}"
        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_ENDPOINT_URL": endpoint,  # honoured by botocore, hence s3fs and boto3
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield S3Server(endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    """The S3 server for one test, with s3fs instances (and their listing caches) starting clean."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3_server


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """``s3://`` URL of a fresh, empty bucket."""
    return f"s3://{s3.bucket()}"


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for a module: floats bit-identical to the single-threaded references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    """The tiny single-stage TiTok reference checkpoint as a loadable folder."""
    from tests.titok_fixtures import write_titok_checkpoint

    return str(write_titok_checkpoint("tiny_vq_single_stage", tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def cluster():
    """A fresh local Ray cluster with 2 CPUs and 2 fake GPUs for one test module (address="local":
    never joining another local cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
