"""Start every group of a run on this machine: one `deepspeed` launch per group.

Each group's lines are prefixed with `[group g]`. If one group fails, the
others are stopped and the failure is reported; nothing is left running.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch


class GroupFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class GroupCommand:
    group: int
    argv: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_commands(manifest: str, groups: list[int], ranks: int, sets: list[str], resume: bool) -> list[GroupCommand]:
    commands = []
    for group in groups:
        argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", str(ranks),
                "--master_port", str(free_port()), "--module", "training.train",
                "--manifest", manifest, "--group", str(group)]
        for assignment in sets:
            argv += ["--set", assignment]
        if resume:
            argv.append("--resume")
        commands.append(GroupCommand(group, argv))
    return commands


# DeepSpeed's own progress chatter (launcher INFO lines, the shm op load, "no hostfile" on a local
# run): dozens of lines per group that say nothing about training. Warnings and errors still show.
_CHATTER = re.compile(r"^\[[\d\- :,]+\] \[INFO\] |op built successfully$|Unable to find hostfile")


def _forward(group: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        if not _CHATTER.search(line.rstrip("\n")):
            out.write(f"[group {group}] {line}")
            out.flush()


def run_groups(commands: list[GroupCommand], ranks_per_group: int, out=sys.stdout, poll_seconds: float = 0.2) -> None:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Share the cores among all ranks of all groups: oversubscribed OpenMP threads
        # spin-wait on each other and make every step ~30x slower.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (len(commands) * ranks_per_group))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    procs: dict[int, subprocess.Popen] = {}
    threads = []
    try:
        for command in commands:
            # Own session: stopping a group stops the launcher and every rank under it.
            proc = subprocess.Popen(command.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=env, start_new_session=True)
            procs[command.group] = proc
            thread = threading.Thread(target=_forward, args=(command.group, proc.stdout, out), daemon=True)
            thread.start()
            threads.append(thread)
        while procs:
            for group, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[group]
                if code != 0:
                    raise GroupFailed(f"group {group} exited with code {code}; stopped the other groups")
            time.sleep(poll_seconds)
    finally:
        for proc in procs.values():
            _stop(proc)
        for thread in threads:
            thread.join(timeout=5)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
