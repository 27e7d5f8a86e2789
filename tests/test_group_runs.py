"""Groups of one run started apart (`codistill train MANIFEST --group G`, as a SLURM array task or a Kubernetes
Job per group would start them) agree on the run through the snapshot store they share: no nonce by hand."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from codistill.cli import main
from codistill.config import load_experiment
from codistill.rundir import RunDir
from conftest import REPO
from training.launch import agree_run_nonce, join_store_run, run_identity
from test_training import BIN, TINY, data_dir, env, records, run, sets_args, tail  # noqa: F401

pytestmark = pytest.mark.timeout(600)


def _train_group(group: int, run_dir, sets: list[str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "codistill"), "train", "criteo-tiny", "--group", str(group), "--run-dir",
                             str(run_dir), *sets_args(sets)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_groups_started_apart_complete_one_codistilled_run_and_another_run_is_refused(data_dir, tmp_path):  # noqa: F811
    store = tmp_path / "bucket"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=20", "eval.every=20", "train.checkpoint_every=20",
                   "deepspeed.ranks_per_group=1", "codistill.burn_in_steps=5", "codistill.exchange_every=5",
                   "codistill.poll_seconds=0.05", "codistill.lockstep=true", f"train.store={store}"]
    # Two "machines": each its own run directory (the same run name: `run`), one store.
    run_dirs = {0: tmp_path / "host-a" / "run", 1: tmp_path / "host-b" / "run"}
    procs = {g: _train_group(g, run_dirs[g], sets) for g in (0, 1)}
    outputs = {g: p.communicate(timeout=540)[0] for g, p in procs.items()}
    for g, p in procs.items():
        assert p.returncode == 0, tail(outputs[g])
        assert "placement: 1 group x 1 rank on CPU" in outputs[g], outputs[g][:300]
    record = json.loads((store / "run" / RunDir.RUN_FILE).read_text())
    for g in (0, 1):
        peer = str(1 - g)
        # Each distilled from the other's snapshots, which it accepts only under the same run nonce.
        assert any(peer in r.get("peers", {}) for r in records(run_dirs[g], g, "train")), outputs[g][-2000:]
        metas = [json.loads(p.read_text()) for p in (store / "run" / f"group-{g}").glob("*.json")]
        assert metas and {m["run_nonce"] for m in metas} == {record["run_nonce"]}

    other = run([str(BIN / "codistill"), "train", "criteo-tiny", "--group", "0", "--run-dir",
                 str(tmp_path / "host-c" / "run"), *sets_args(sets + ["train.seed=8"])], timeout=120)
    assert other.returncode == 1
    assert "the store holds run 'run' of another configuration (train.seed differ)" in other.stdout + other.stderr, \
        tail(other.stdout + other.stderr)
    assert not (tmp_path / "host-c" / "run" / "group-0" / "metrics.jsonl").exists()


def _nonce(path) -> str:
    return json.loads(path.read_text())["run_nonce"]


IDENTITY = run_identity(load_experiment("criteo-tiny"))


def test_a_run_directory_and_the_store_agree_on_one_nonce_in_either_order(tmp_path):
    """The nonce comes from the store's run record, which a run directory's own run.json seeds; the agreed
    nonce is written back, so a run started one way (plain, or --group) and continued the other is one run."""
    store = str(tmp_path / "store")
    plain, grouped = tmp_path / "plain" / "run", tmp_path / "grouped" / "run"
    (plain).mkdir(parents=True)
    (plain / RunDir.RUN_FILE).write_text('{"run_nonce": "from-an-earlier-plain-run"}\n')
    assert agree_run_nonce(plain, store, "run", IDENTITY) == "from-an-earlier-plain-run"  # seeds the store's record
    assert _nonce(tmp_path / "store" / "run" / RunDir.RUN_FILE) == "from-an-earlier-plain-run"
    assert agree_run_nonce(grouped, store, "run", IDENTITY) == "from-an-earlier-plain-run"  # a --group start joins
    assert _nonce(grouped / RunDir.RUN_FILE) == "from-an-earlier-plain-run"  # written back for a plain --resume

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / RunDir.RUN_FILE).write_text('{"run_nonce": "another-run"}\n')
    with pytest.raises(ValueError, match=r"is of run another-run, but .*store/run/run.json of run "
                                         r"from-an-earlier-plain-run: they are two runs"):
        agree_run_nonce(tmp_path / "other", store, "run", IDENTITY)


def test_what_a_machine_or_an_operator_chooses_is_not_another_run_and_a_refusal_names_what_differs(tmp_path):
    store = str(tmp_path / "store")
    nonce = join_store_run(store, "run", IDENTITY)
    same_run = load_experiment("criteo-tiny", [
        "loader.workers=7", "train.log_every=3", "train.tensorboard=true", "eval.every=9", "eval.batch_size=32",
        "codistill.poll_seconds=0.01", "codistill.lockstep_timeout=5", "codistill.min_peer_coverage=0",
        "deepspeed.precision=fp32", "train.groups=[0, 1]", "data.output=elsewhere", f"train.run_dir={tmp_path}/b"])
    assert join_store_run(store, "run", run_identity(same_run)) == nonce
    other_run = load_experiment("criteo-tiny", ["train.seed=8", "schedule.steps=700", "train.groups=[1]",
                                                "codistill.snapshot_dtype=bf16"])
    with pytest.raises(ValueError, match=r"of another configuration \(codistill.snapshot_dtype, schedule.steps, "
                                         r"train.groups, train.seed differ\)"):
        join_store_run(store, "run", run_identity(other_run))


def test_a_run_started_group_by_group_resumes_as_one_run(data_dir, tmp_path):  # noqa: F811
    """`--group 0 --group 1`, then a plain `--resume` of the same run directory: the resume keeps the run's
    nonce (it used to draw a new one, and its groups refused the run's own snapshots as another run's)."""
    run_dir = tmp_path / "run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=10", "eval.every=10", "train.checkpoint_every=10",
                   "deepspeed.ranks_per_group=1", "codistill.burn_in_steps=2", "codistill.exchange_every=5",
                   "codistill.poll_seconds=0.05", "codistill.min_peer_coverage=0"]
    base = [str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)]
    started = run([*base, "--group", "0", "--group", "1"])
    assert started.returncode == 0, tail(started.stdout + started.stderr)
    resumed = run([*base, "--resume"])
    assert resumed.returncode == 0, tail(resumed.stdout + resumed.stderr)
    assert resumed.stdout.count("resumed at step 10") == 2, tail(resumed.stdout)
    nonce = _nonce(run_dir / RunDir.RUN_FILE)
    assert _nonce(run_dir / "store" / "run" / RunDir.RUN_FILE) == nonce
    snapshots = run_dir / "store" / "run"
    metas = [json.loads(p.read_text()) for g in (0, 1) for p in (snapshots / f"group-{g}").glob("*.json")]
    assert metas and {m["run_nonce"] for m in metas} == {nonce}


def test_a_group_refuses_a_missing_dataset_and_names_the_command_that_builds_it(tmp_path):
    """Every group's task would build it at once into the same data.output (and one failing task's cleanup
    would delete the others' pieces): it is built once, first, by the command the refusal names."""
    data = tmp_path / "data"
    sets = ["data.synth.rows=2000", f"data.output={data}"]
    result = CliRunner().invoke(main, ["train", "criteo-tiny", "--group", "1", "--run-dir", str(tmp_path / "run"),
                                       *sets_args(sets)])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert f"no dataset at {data}: with --group, build it first" in result.output
    assert not data.exists() and not (tmp_path / "run").exists()
    command = shlex.split(result.output.split("`")[1])
    assert command[:2] == ["codistill", "preprocess"]
    planned = CliRunner().invoke(main, [*command[1:], "--dry-run"])  # what it would build, and where
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.output)["output"] == str(data)


def _dry_run_output(argv: list[str], extra_env: dict[str, str]) -> str:
    environment = dict(env(), PATH=f"{BIN}:{env()['PATH']}", **extra_env)
    proc = subprocess.run(argv, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_slurm_array_script_runs_its_task_s_group(tmp_path):
    """deploy/slurm-groups.sbatch as array task 1 would run it (bash, SLURM_ARRAY_TASK_ID set), up to the
    launch (--dry-run passed through)."""
    out = _dry_run_output(["bash", "deploy/slurm-groups.sbatch", "manifests/criteo.yaml", str(tmp_path / "store"),
                           "--dry-run"], {"SLURM_ARRAY_TASK_ID": "1"})
    lines = out.splitlines()
    assert lines[0].startswith("placement: 1 group x ") and lines[1].startswith("group 1: ")
    assert f"train.store={tmp_path / 'store'}" in lines[1] and "--group 1" in lines[1]
    assert "--run-nonce '<the-run-nonce-agreed-at-launch>'" in lines[1]  # as the launch passes it


def test_the_kubernetes_indexed_job_runs_one_pod_per_group():
    job = yaml.safe_load((REPO / "deploy" / "k8s-groups.yaml").read_text())
    command = job["spec"]["template"]["spec"]["containers"][0]
    manifest = command["args"][0].split()[3]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == load_experiment(manifest).data.groups  # one pod per group
    out = _dry_run_output([*command["command"], command["args"][0] + " --dry-run"], {"JOB_COMPLETION_INDEX": "1"})
    assert "group 1: " in out and "train.store=gs://bkt/codistill/store" in out
