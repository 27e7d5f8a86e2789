"""Start every group of a run on this machine: one `deepspeed` launch per group; and the run's identity.

Each group's lines are prefixed with `[group g]`. If one group fails, or the
launcher gets SIGTERM/SIGHUP/SIGINT, every group is stopped and the cause
reported; ranks also end by themselves when their launcher dies (even by
SIGKILL, which cannot be caught): nothing is left running.

A run directory is locked (`flock`) by the launcher for the whole run. The
run's nonce, agreed through the store (`<store>/<run>/run.json`) and kept in
`<run_dir>/run.json`, goes into every snapshot so that a run never adopts
another run's weights.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from codistill import storage
from codistill.config import ExperimentConfig
from codistill.fields import to_dict
from codistill.rundir import RunDir
from codistill.storage import write_atomically

# DeepSpeed's JIT-built op, cached per environment: torch's shared default (~/.cache/torch_extensions) is rebuilt
# for every venv path, and a build killed half-way leaves a lock that makes every later start wait for ever.
JIT_CACHE = os.path.join(sys.prefix, "torch_extensions")
# Set for every group by run_groups: ranks end when this process (or any process between it and them) dies.
LAUNCHER_PID_ENV = "CODISTILL_LAUNCHER_PID"


class GroupFailed(RuntimeError):
    pass


class RunLocked(RuntimeError):
    pass


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class GroupCommand:
    group: int
    argv: list[str]


@dataclass(frozen=True)
class Placement:
    """Where each group of a run goes: a disjoint slice of this host's accelerators, or of a hostfile's slots,
    or on CPU a share of this host's cores."""

    slots: dict[int, dict[str, list[int]]]  # group -> {host: slot (GPU) ids}; {} on CPU
    ranks_per_group: int
    env: dict[str, str]  # what every group's process starts with beyond this process's environment
    summary: str  # what was chosen, in one line
    hostfile: str | None = None  # DeepSpeed's --hostfile the slots are of (None: this host)


# A hostfile run's rendezvous port for group 0, on the group's first host (DeepSpeed's default); group g takes
# this + g, so groups sharing a first host do not collide. (`free_port` only knows this machine's ports.)
MASTER_PORT = 29500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_accelerators() -> list[int]:
    """The ids of the GPUs this process may use, as DeepSpeed's launcher names them: CUDA_VISIBLE_DEVICES's
    list when set (the launcher sets the variable to each group's slice of these ids), else 0..count-1."""
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not listed:
        return list(range(count))
    try:
        return [int(i) for i in listed.split(",")][:count]
    except ValueError:
        raise PlacementError(f"CUDA_VISIBLE_DEVICES={listed}: give GPU indices (DeepSpeed's --include takes "
                             "indices, not UUIDs)") from None


def _groups(groups: list[int], ranks: int) -> str:
    return f"{len(groups)} group{'' if len(groups) == 1 else 's'} x {ranks} rank{'' if ranks == 1 else 's'}"


def _include(slots: dict[str, list[int]]) -> str:
    return "@".join(f"{host}:{','.join(map(str, ids))}" for host, ids in slots.items())


def _split(groups: list[int], ranks: int, slots: list[tuple[str, int]], what: str) -> dict[int, dict[str, list[int]]]:
    """Consecutive `ranks` of `slots` ((host, id) in order) for each group; more than there are is refused."""
    need = len(groups) * ranks
    if need > len(slots):
        raise PlacementError(f"{len(groups)} groups x {ranks} ranks_per_group need {need} GPUs, {what} has "
                             f"{len(slots)}: lower deepspeed.ranks_per_group, or train fewer groups here "
                             "(train.groups, or --group on each machine)")
    placed = {}
    for i, group in enumerate(groups):
        placed[group] = {}
        for host, slot in slots[i * ranks:(i + 1) * ranks]:
            placed[group].setdefault(host, []).append(slot)
    return placed


def place_groups(groups: list[int], ranks: int, accelerators: list[int], cores: int) -> Placement:
    """Each group on its own `ranks` of `accelerators` (in order); with none, on CPU, every rank of every group
    with an equal share of the `cores` (oversubscribed OpenMP threads spin-wait on each other and make every
    step ~30x slower)."""
    if not accelerators:
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // (len(groups) * ranks)))
        return Placement({}, ranks, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads},
                         f"placement: {_groups(groups, ranks)} on CPU ({cores} cores): "
                         f"{threads} thread{'' if threads == '1' else 's'} per rank")
    visible = f"this host ({len(accelerators)} visible: {','.join(map(str, accelerators))})"
    slots = _split(groups, ranks, [("localhost", a) for a in accelerators], visible)
    idle = len(accelerators) - len(groups) * ranks
    return Placement(slots, ranks, {}, f"placement: {_groups(groups, ranks)} on {len(groups) * ranks} of "
                     f"{len(accelerators)} GPUs" + (f" ({idle} idle)" if idle else "") + ": " + "; ".join(
                         f"group {g} on GPU{'s' if ranks > 1 else ''} {','.join(map(str, s['localhost']))}"
                         for g, s in slots.items()))


def place_on_hosts(groups: list[int], ranks: int, hostfile: str) -> Placement:
    """Each group on its own `ranks` of a DeepSpeed hostfile's slots (`host slots=N` lines), in order: one
    hostfile for the whole run, one DeepSpeed job per group."""
    from deepspeed.launcher.runner import fetch_hostfile

    if not os.path.isfile(hostfile):
        raise PlacementError(f"--hostfile {hostfile}: no such file")
    try:
        hosts = fetch_hostfile(hostfile)
    except ValueError as e:
        raise PlacementError(f"--hostfile {hostfile}: {e}") from None
    if not hosts:
        raise PlacementError(f"--hostfile {hostfile}: no hosts (lines `host slots=N`)")
    slots = _split(groups, ranks, [(h, i) for h, n in hosts.items() for i in range(n)],
                   f"{hostfile} ({sum(hosts.values())} slots on {len(hosts)} hosts)")
    return Placement(slots, ranks, {}, f"placement: {_groups(groups, ranks)} on the hosts of {hostfile}: "
                     + "; ".join(f"group {g} on {_include(s)}" for g, s in slots.items()), hostfile)


def group_commands(manifest: str, groups: list[int], ranks: int, sets: list[str], resume: bool,
                   placement: Placement | None = None, run_nonce: str | None = None,
                   master_port: int | None = None) -> list[GroupCommand]:
    """Each group's DeepSpeed launch: on its slots of `placement`, or (none, or on CPU) `ranks` processes here;
    with `run_nonce` (`agree_run_nonce`), else each group agrees on it itself. On a hostfile's hosts group g
    meets on `master_port` (default MASTER_PORT) + g of its first host; here, on a port free here."""
    commands = []
    for group in groups:
        slots = placement.slots.get(group) if placement else None
        if placement is not None and placement.hostfile:
            # Other hosts: DeepSpeed's runner reaches them (pdsh) and starts its per-node launcher on each.
            launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", placement.hostfile,
                        "--include", _include(slots), "--master_port", str((master_port or MASTER_PORT) + group)]
        else:
            # This host: DeepSpeed's per-node launcher itself, as the runner would exec it after ~2.5 s of its own
            # start-up. Its world is {host: the group's slot ids}; it makes those ids the ranks' visible devices.
            world = {"localhost": slots["localhost"] if slots else list(range(ranks))}
            launcher = [sys.executable, "-u", "-m", "deepspeed.launcher.launch",
                        f"--world_info={base64.urlsafe_b64encode(json.dumps(world).encode()).decode()}",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        argv = [*launcher, "--module", "training.train", "--manifest", manifest, "--group", str(group)]
        for assignment in sets:
            argv += ["--set", assignment]
        if resume:
            argv.append("--resume")
        if run_nonce:
            argv += ["--run-nonce", run_nonce]
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


class _Stopped(BaseException):  # BaseException: no `except Exception` on the way may swallow it
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise _Stopped(signum)


_HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def run_groups(commands: list[GroupCommand], env: dict[str, str], out=sys.stdout, poll_seconds: float = 0.2) -> None:
    """Run the groups to the end, each started with `env` (`Placement.env`) over this process's environment
    (a variable set here wins); GroupFailed (every group stopped) if one fails or we are told to stop."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals go to the main thread only
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in _HANDLED} if in_main_thread else {}
    try:
        _run_groups(commands, env, out, poll_seconds)
    except _Stopped as stop:
        raise GroupFailed(f"stopped by {signal.Signals(stop.signum).name}; stopped every group") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_groups(commands: list[GroupCommand], env: dict[str, str], out, poll_seconds: float) -> None:
    env = {**env, **os.environ}
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", JIT_CACHE)
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
        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C or SIGTERM must not cut the stop short (SIGKILL escalation, output joins);
            # run_groups restores the handlers afterwards.
            for sig in _HANDLED:
                signal.signal(sig, signal.SIG_IGN)
        _stop(list(procs.values()))
        for thread in threads:
            thread.join(timeout=5)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every group's process group at once, then SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        procs = [proc for proc in procs if proc.poll() is None]
        if not procs:
            return


# --- ranks end with their launcher -----------------------------------------------------------------


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _ancestors_up_to(top: int) -> list[int] | None:
    """Our ancestors from the parent up to `top` included; None if `top` is not one of them."""
    chain, pid = [], os.getppid()
    while pid and pid > 1:
        chain.append(pid)
        if pid == top:
            return chain
        pid = _parent_of(pid)
    return None


def exit_when_launcher_dies() -> None:
    """End this process as soon as any process between it and its launcher exits.

    The launcher is `$CODISTILL_LAUNCHER_PID` (`codistill train`) if that is an
    ancestor, else the leader of our process group (what a shell started, e.g.
    `deepspeed`), else just the parent. A launcher killed by SIGKILL cannot stop
    its children, and the deepspeed launcher's middle process would keep the
    ranks alive. One daemon thread waits (no polling) on pidfds of those
    processes; the first to exit ends this rank at once with exit code 1. (Not
    prctl(PR_SET_PDEATHSIG): it fires when the parent *thread* that forked us
    exits, and covers the parent only.)
    """
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    chain = ((_ancestors_up_to(launcher) if launcher else None) or _ancestors_up_to(os.getpgid(0))
             or [os.getppid()])
    fds = []
    for pid in chain:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:  # gone already
            os._exit(1)
    if os.getppid() != chain[0]:  # the parent died before its pidfd was open
        os._exit(1)

    def watch() -> None:
        select.select(fds, [], [])
        print(f"rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): its launcher exited; ending too",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


# --- run identity and lock --------------------------------------------------------------------------


@contextmanager
def locked_run_dir(run_dir: str | Path, shared: bool = False) -> Iterator[None]:
    """Hold a lock on `run_dir` while the block runs: exclusive (one `codistill train` per run directory), or
    `shared` (`--group` launchers, each also holding its groups' directories exclusively): either excludes
    the other.

    `flock` on `<run_dir>/.codistill.lock`: released by the kernel when this
    process ends however it ends, so a crashed run never leaves a stale lock.
    An exclusive holder writes its pid there (for the refusal); shared holders
    leave the file to each other.
    """
    path = RunDir(run_dir).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(64).strip()
            raise RunLocked(f"{run_dir} is in use by another `codistill train` "
                            f"({f'pid {holder}' if holder else 'of --group'}); wait for it to end or stop it "
                            "first") from None
        if shared:
            yield
            return
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # before the kernel drops the lock: a later shared holder is not named by our pid


def run_identity(config: ExperimentConfig) -> dict:
    """What defines a run, which every group of it must share: the dataset's settings (not where it is), the
    model, the optimizer and schedule, the batch and its split over ranks, the codistillation loss and exchange,
    the seed, what each group reads, and which groups train. Not what a machine or an operator may choose
    differently for one group (loader workers, logging, evaluation, polling, timeouts, coverage thresholds,
    precision, locations)."""
    data = {k: v for k, v in to_dict(config.data).items() if k not in ("input", "output", "split_bytes")}
    ds, cod = config.deepspeed, config.codistill
    identity = {
        "data": data,
        "model": to_dict(config.model),
        "optimizer": to_dict(config.optimizer),
        "schedule": to_dict(config.schedule),
        "deepspeed": {k: getattr(ds, k) for k in ("ranks_per_group", "micro_batch_size", "grad_accum",
                                                  "zero_stage", "gradient_clipping")},
        "codistill": {k: getattr(cod, k) for k in ("enabled", "weight", "burn_in_steps", "ramp_steps",
                                                   "exchange_every", "temperature", "distance", "max_staleness",
                                                   "lockstep", "snapshot_dtype")},  # peers read what others publish
        "train": {"seed": config.train.seed, "reads": config.train.reads,
                  "label_smoothing": config.train.label_smoothing, "groups": list(config.trained_groups)},
    }
    return json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from run.json


def _differing(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """The dotted names of the fields where two run identities differ."""
    names = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differing(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


def _nonce_in(path: Path) -> str | None:
    """The nonce a run directory's `run.json` holds, None if it has none."""
    if not path.exists():
        return None
    text = path.read_text()[:4096]
    try:
        nonce = json.loads(text)["run_nonce"]
    except (ValueError, KeyError, TypeError):
        nonce = None
    if not isinstance(nonce, str) or not nonce:
        raise ValueError(f"{path}: not a run file (expected {{\"run_nonce\": \"...\"}}), got {text[:80]!r}")
    return nonce


def agree_run_nonce(run_dir: str | Path, store: str, run_id: str, identity: dict) -> str:
    """The run's nonce, one for all its groups however and wherever they start: the store's run record
    (`join_store_run`), which a run directory's own `run.json` seeds when the record is not there yet (a run
    started before the record existed), and which is written back to `<run_dir>/run.json`. A run directory
    and a store that name two different runs are refused."""
    local = RunDir(run_dir).run_file
    seed = _nonce_in(local)
    nonce = join_store_run(store, run_id, identity, seed)
    if seed is None:
        write_atomically(str(local), json.dumps({"run_nonce": nonce}) + "\n")
    elif seed != nonce:
        raise ValueError(f"{local} is of run {seed}, but {store.rstrip('/')}/{run_id}/{RunDir.RUN_FILE} of run "
                         f"{nonce}: they are two runs; point train.store at this run's store, or start over "
                         "with --overwrite")
    return nonce


def join_store_run(store: str, run_id: str, identity: dict, seed: str | None = None) -> str:
    """The nonce of the run `<store>/<run_id>/run.json` records, written by whichever group of the run starts
    first (an exclusive create, with `seed` or a new nonce, and the run's identity, `run_identity`): groups
    started apart (`codistill train --group G` on several machines) agree on their run through the store they
    share, no nonce kept by hand. A record of another identity there is another run's, refused, naming the
    fields that differ."""
    url = f"{store.rstrip('/')}/{run_id}/{RunDir.RUN_FILE}"
    sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    write_atomically(url, json.dumps({"run_nonce": seed or uuid.uuid4().hex, "config_sha256": sha256,
                                      "config": identity}, sort_keys=True) + "\n", replace=False)
    with storage.open(url, "rb") as f:
        text = f.read(1 << 16)
    try:
        record = json.loads(text)
        nonce, theirs = record["run_nonce"], record["config_sha256"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{url}: not a run record (expected {{\"run_nonce\": ..., \"config_sha256\": ...}}), "
                         f"got {text[:80]!r}") from None
    if theirs != sha256:
        recorded = record.get("config")
        differ = (f"{', '.join(_differing(identity, recorded))} differ" if isinstance(recorded, dict) else
                  f"config sha256 {str(theirs)[:12]}..., this one's {sha256[:12]}...")
        raise ValueError(f"{url}: the store holds run {run_id!r} of another configuration ({differ}): give this "
                         "run another name (the last part of train.run_dir) or another train.store")
    return nonce


def next_attempt(path: Path) -> int:
    """0 for a group's first start in this run directory, one more on every restart (`--resume`); `path` is the
    group's attempt file (`GroupDir.attempt`)."""
    try:
        attempt = int(path.read_text().strip()) + 1
    except FileNotFoundError:
        attempt = 0
    except ValueError as err:
        raise ValueError(f"{path}: not an attempt number ({err})") from None
    write_atomically(str(path), f"{attempt}\n")
    return attempt
