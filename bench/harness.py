"""What the benchmarks share around their measurements: a clock and a one-rank process group.

Benchmarks run as scripts (`.venv/bin/python bench/<name>.py`), so this directory is on `sys.path` and
they `from harness import ...`.
"""

from __future__ import annotations

import os
import time


class Clock:
    """Wall and CPU (this process) seconds of a block: CPU time is what "per core" means on a shared machine."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def init_single_process() -> None:
    """A one-rank gloo process group on a free port, started the trainer's way (`init_distributed`)."""
    from training.launch import free_port
    from training.train import init_distributed  # torch and DeepSpeed: only for the benchmarks that train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    init_distributed()
