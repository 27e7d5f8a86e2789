"""A run stays safe when things go wrong: NaN data, signals, a killed launcher, two launches on one run
directory, planted checkpoints, a torn metrics line. Real processes throughout (`codistill train`, the
deepspeed launcher, gloo ranks on CPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from codistill.cli import main as cli
from codistill.dataset import join, load_manifest, write_manifest
from codistill.run import locked_run
from codistill.rundir import RunDir
from pipelines.formats import read_shard, write_shard
from training.launch import GroupCommand, RunLocked, group_commands, locked_run_dir, run_groups
from training.report import eval_records
from training.train import checkpoint_problem

from conftest import REPO
from test_training import (BIN, TINY, alive, data_dir, env, processes_mentioning, records, run,  # noqa: F401
                           sets_args, tail)

pytestmark = pytest.mark.timeout(420)

PY = sys.executable


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll a condition on real processes or files (no sleep stands in for an event we could wait on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def gone(marker: str, timeout: float = 30) -> None:
    wait_until(lambda: not processes_mentioning(marker), timeout, f"every process of {marker} to end")


# --- NaN data: the group stops, the peer never adopts NaN -------------------------------------------------


def poison_labels(source: str, out: Path, group: int) -> None:
    """A copy of the dataset whose `group` train labels are 5% NaN, with a manifest that matches (it passes
    the launch checks and the sha256 checks on read: only the values are bad)."""
    import shutil

    shutil.copytree(source, out)
    manifest = load_manifest(str(out))
    rng = np.random.default_rng(0)
    shards = []
    for shard in manifest.shards:
        if shard.split == "train" and shard.group == group:
            url = join(str(out), shard.path)
            blocks = list(read_shard(url, manifest.features, manifest.format))
            for block in blocks:
                block["label"] = np.where(rng.random(len(block["label"])) < 0.05, np.nan, block["label"]).astype(
                    block["label"].dtype)
            written = write_shard(url, blocks, manifest.features, manifest.format,
                                  sample_prefix=Path(shard.path).name.split(".")[0])
            shard = dataclasses.replace(shard, bytes=written.bytes, sha256=written.sha256)
        shards.append(shard)
    write_manifest(str(out), dataclasses.replace(manifest, shards=tuple(shards)))


def test_nan_loss_stops_the_group_and_never_reaches_the_peer(data_dir, tmp_path):  # noqa: F811
    poisoned = tmp_path / "poisoned"
    poison_labels(data_dir, poisoned, group=0)
    run_dir = tmp_path / "nan-run"
    # Lockstep: group 1 waits at its first exchange for group 0, so it cannot finish (and fail on its own, for
    # want of a peer) before group 0's NaN ends the run: the failure reported is always group 0's.
    sets = TINY + [f"data.output={poisoned}", "schedule.steps=60", "eval.every=60", "train.checkpoint_every=60",
                   "deepspeed.ranks_per_group=1", "codistill.exchange_every=1", "codistill.poll_seconds=0.05",
                   "codistill.lockstep=true"]
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)])
    assert proc.returncode != 0, "a group trained on NaN labels and the run reported success"
    assert "non-finite loss" in proc.stdout, tail(proc.stdout + proc.stderr)
    assert "Error: group 0 exited with code" in proc.stderr, tail(proc.stderr)
    for g in (0, 1):
        logged = RunDir(run_dir).group(g).metrics
        assert not logged.exists() or all(math.isfinite(r["loss"]) for r in records(run_dir, g, "train")), \
            f"group {g} logged a non-finite loss: it trained on"
    # Whatever group 0 published before the NaN step is finite: the peer could only ever adopt finite weights.
    for snapshot in (run_dir / "store" / run_dir.name / "group-0").glob("*.safetensors"):
        state = safetensors.torch.load_file(str(snapshot))
        assert all(torch.isfinite(t).all() for t in state.values()), f"{snapshot.name} holds NaN/Inf"
    gone(str(run_dir))


# --- signals, a killed launcher, the run lock ------------------------------------------------------------


SLEEPER = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    with open(sys.argv[1], 'a') as f:
        f.write(f'{os.getpid()} {child.pid}\\n')
    time.sleep(120)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda sig: sig.name)
def test_a_signal_to_the_launcher_stops_every_group(tmp_path, sig):
    """What `kill`, `timeout`, Slurm, systemd and Kubernetes send: the groups must not be left training."""
    pids = tmp_path / "pids"
    launcher = textwrap.dedent(f"""
        import sys
        from training.launch import GroupCommand, GroupFailed, run_groups
        commands = [GroupCommand(g, [sys.executable, '-c', {SLEEPER!r}, {str(pids)!r}]) for g in range(2)]
        try:
            run_groups(commands, {{}}, poll_seconds=0.05)
        except GroupFailed as e:
            print('GroupFailed:', e, flush=True)
            sys.exit(3)
    """)
    proc = subprocess.Popen([PY, "-c", launcher], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_until(lambda: pids.exists() and len(pids.read_text().splitlines()) == 2, 30, "both groups to start")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3 and f"stopped by {sig.name}; stopped every group" in out, out
    started = [int(p) for line in pids.read_text().splitlines() for p in line.split()]
    wait_until(lambda: not any(alive(p) for p in started), 15, "every group process to end")


@pytest.mark.timeout(60)
def test_a_second_signal_while_stopping_does_not_cut_the_stop_short(tmp_path):
    """Ctrl-C again while the groups are being stopped: a group that ignores SIGTERM still gets SIGKILL."""
    marks = tmp_path / "marks"
    stubborn = textwrap.dedent(f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, lambda *_: open({str(marks)!r}, 'a').write('term\\n'))
        open({str(marks)!r}, 'a').write(f'{{os.getpid()}}\\n')
        while True:
            time.sleep(1)
    """)
    launcher = textwrap.dedent(f"""
        import sys
        from training.launch import GroupCommand, GroupFailed, run_groups
        try:
            run_groups([GroupCommand(0, [sys.executable, '-c', {stubborn!r}])], {{}}, poll_seconds=0.05)
        except GroupFailed as e:
            print('GroupFailed:', e, flush=True)
            sys.exit(3)
    """)
    proc = subprocess.Popen([PY, "-c", launcher], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_until(lambda: marks.exists(), 30, "the group to start")
    pid = int(marks.read_text().split()[0])
    try:
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "term" in marks.read_text(), 30, "the launcher to pass SIGTERM on to the group")
        proc.send_signal(signal.SIGINT)  # during the launcher's wait for the group to end
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 3 and "stopped by SIGTERM; stopped every group" in out, out
        assert not alive(pid), "the group that ignored SIGTERM was left running"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_run_groups_without_signals_still_returns_normally():
    out = io.StringIO()
    run_groups([GroupCommand(0, [PY, "-c", "print('done')"])], {}, out=out, poll_seconds=0.05)
    assert out.getvalue() == "[group 0] done\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "run_groups must restore the signal handlers"


@pytest.fixture
def live_run(data_dir, tmp_path):  # noqa: F811
    """`codistill train` with 2 groups x 1 rank that runs until stopped; yields once both groups train."""
    run_dir = tmp_path / "live-run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=100000", "eval.every=100000",
                   "train.checkpoint_every=100000", "deepspeed.ranks_per_group=1", "codistill.enabled=false"]
    log = open(tmp_path / "live.log", "w")
    proc = subprocess.Popen([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir),
                             *sets_args(sets)], cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)

    def training() -> bool:
        assert proc.poll() is None, tail((tmp_path / "live.log").read_text())
        return all(RunDir(run_dir).group(g).metrics.exists() for g in (0, 1))

    try:
        wait_until(training, 300, "both groups to log a step")
        yield proc, run_dir, sets
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()
        for pid in processes_mentioning(str(run_dir)):  # only if a test failed: never leave ranks behind
            os.kill(pid, signal.SIGKILL)


def test_a_second_launch_on_a_live_run_is_refused_and_sigkilling_the_launcher_ends_every_rank(live_run):
    proc, run_dir, sets = live_run
    base = ["train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)]
    for extra in ([], ["--resume"], ["--overwrite"]):
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code != 0 and "is in use by another `codistill train`" in result.output, \
            (extra, result.output)
    assert RunDir(run_dir).group(0).metrics.exists(), "--overwrite deleted a live run"
    ranks = processes_mentioning("training.train")
    ranks = [p for p in ranks if str(run_dir) in Path(f"/proc/{p}/cmdline").read_text()]
    assert ranks, "no group process found"
    proc.send_signal(signal.SIGKILL)  # cannot be caught: the ranks must notice by themselves
    proc.wait(10)
    gone(str(run_dir))
    with locked_run_dir(run_dir):  # and the lock died with its holder
        pass


# A launcher's hold on a run directory, in a process of its own, as `codistill train [--group G]` holds it.
HOLD = textwrap.dedent("""
    import sys
    from codistill.run import locked_run
    with locked_run(sys.argv[1], [int(g) for g in sys.argv[2:]] or None):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


@contextlib.contextmanager
def launcher_holding(run_dir: Path, groups: list[int]):
    proc = subprocess.Popen([PY, "-c", HOLD, str(run_dir), *map(str, groups)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(30)


def test_group_launchers_and_a_plain_launcher_on_one_run_directory_exclude_each_other(tmp_path):
    """`--group` holds the run shared and its groups exclusively; a plain launch (which `--overwrite` deletes
    under) holds the run exclusively: a plain launch never runs beside a live `--group` one, nor the reverse."""
    run_dir = tmp_path / "run"
    with launcher_holding(run_dir, [0]):
        with locked_run(str(run_dir), [1]):  # another group of the run, from another launcher: beside it
            pass
        for groups, held in (([0], f"{run_dir / 'group-0'} is in use"), (None, f"{run_dir} is in use")):
            with pytest.raises(RunLocked, match=held + r" by another `codistill train`"):
                with locked_run(str(run_dir), groups):
                    pass
    with launcher_holding(run_dir, []) as plain:
        with pytest.raises(RunLocked, match=rf"{run_dir} is in use by another `codistill train` \(pid {plain.pid}\)"):
            with locked_run(str(run_dir), [1]):
                pass
    with locked_run(str(run_dir), None):  # every hold ended with its process
        pass


def test_a_group_named_twice_is_started_once():
    result = CliRunner().invoke(cli, ["train", "criteo-tiny", "--group", "1", "--group", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.output.splitlines()[1:]] == ["group 1"]


def test_sigkilling_a_groups_deepspeed_launcher_ends_its_ranks(data_dir, tmp_path):  # noqa: F811
    """One group started by hand (`deepspeed ... --module training.train`): its launcher's middle process
    (deepspeed.launcher.launch) survives a SIGKILL of the launcher, so the ranks must notice by themselves."""
    run_dir = tmp_path / "hand-run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=100000", "eval.every=100000",
                   "train.checkpoint_every=100000", "codistill.enabled=false", f"train.run_dir={run_dir}"]
    log = open(tmp_path / "hand.log", "w")
    launcher = subprocess.Popen(group_commands("criteo-tiny", [0], 2, sets, resume=False)[0].argv, cwd=REPO, env=env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # as a shell would
    try:
        wait_until(lambda: RunDir(run_dir).group(0).metrics.exists() or launcher.poll() is not None, 300,
                   "the group to log a step")
        assert launcher.poll() is None, tail((tmp_path / "hand.log").read_text())
        launcher.kill()  # the launcher process alone, not its process group
        launcher.wait(10)
        gone(str(run_dir))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)  # only if the test failed: never leave ranks behind
        log.close()


# --- checkpoints: never unpickle code, fall back past a bad newest one -------------------------------------


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file if ever unpickled


def test_resume_refuses_a_planted_pickle_and_an_empty_latest_and_falls_back(data_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "ckpt-run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=4", "eval.every=4", "train.checkpoint_every=2",
                   "codistill.enabled=false", f"train.run_dir={run_dir}"]
    proc = run(group_commands("criteo-tiny", [0], 1, sets, resume=False)[0].argv)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    checkpoints = RunDir(run_dir).group(0).checkpoints
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000002", "step-00000004"]
    marker = tmp_path / "code-ran"
    # Someone with write access to the (shared) run directory plants code in the newest checkpoint...
    torch.save({"module": Exploit(str(marker))}, checkpoints / "step-00000004" / "mp_rank_00_model_states.pt")
    (checkpoints / "latest").write_text("")  # ...and a crash left `latest` empty
    proc = run(group_commands("criteo-tiny", [0], 1, sets, resume=True)[0].argv)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, tail(out)
    assert not marker.exists(), "--resume ran code from a checkpoint"
    assert "names no checkpoint" in out and "step-00000004 cannot be loaded" in out, tail(out)
    assert "io.open" in out, tail(out)
    assert "resumed at step 2" in proc.stdout
    assert eval_records(run_dir, 0)[-1]["step"] == 4


def test_checkpoint_problem_reads_no_tensor_data_and_names_the_problem(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    torch.save({"module": {"w": torch.zeros(3)}, "step": 1}, good / "mp_rank_00_model_states.pt")
    assert checkpoint_problem(good) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    assert checkpoint_problem(bad) == "no model states file"
    data = (good / "mp_rank_00_model_states.pt").read_bytes()
    (bad / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])  # truncated
    assert "not a readable torch checkpoint" in checkpoint_problem(bad)
    torch.save({"module": Exploit(str(tmp_path / "x"))}, bad / "mp_rank_00_model_states.pt")
    assert "io.open" in checkpoint_problem(bad)
    assert not (tmp_path / "x").exists()


# --- the report survives a torn metrics line ---------------------------------------------------------------


def test_a_torn_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = RunDir(tmp_path).group(0).metrics
    path.parent.mkdir()
    good = [{"kind": "eval", "step": s, "log_loss": 0.5} for s in (10, 20)]
    path.write_text(json.dumps(good[0]) + "\n" + '{"kind": "train", "st' + json.dumps(good[1]) + "\n"
                    + json.dumps(good[1]) + "\n" + '{"kind": "ev')  # torn mid-line by a kill, then appended to
    assert [r["step"] for r in eval_records(tmp_path, 0)] == [10, 20]
    assert "skipped 2 line(s)" in caplog.text
