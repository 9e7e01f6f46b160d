"""Fault drills of the generator training loop; importable by Ray Train workers (``tests.train_drills``)."""
from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_once(step: int, rank: int, *, at_step: int, at_rank: int, marker: str) -> None:
    """``TrainJob.mid_step`` hook: SIGKILL this worker process after the backward pass of step
    ``at_step`` on rank ``at_rank``, the first time only (``marker`` records that it happened)."""
    if (step, rank) == (at_step, at_rank) and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
