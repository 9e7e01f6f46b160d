"""infra/README.md's shell commands, parsed as the shell and the tools parse them (for test_infra and
test_cluster_job, which runs the README's cluster commands)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "infra" / "README.md"


def readme_commands() -> list[str]:
    """Shell lines of the README's fenced blocks, continuation lines joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S)
    return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def readme_argv(prefix: str) -> list[list[str]]:
    """argv (comments dropped) of the README's shell lines that start with ``prefix``."""
    return [shlex.split(c, comments=True) for c in readme_commands() if c.startswith(prefix)]


def readme_ray_start_nodes() -> list[dict]:
    """`ray start` options (click's parse: ``head``, ``num_cpus``, ``num_gpus``, ...) of each README line."""
    from ray.scripts.scripts import start

    return [start.make_context("ray start", argv[2:]).params for argv in readme_argv("ray start ")]
