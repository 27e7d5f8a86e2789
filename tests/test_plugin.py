"""A fourth dataset added as a plugin touches no file of the project.

The toy dataset in tests/toy_dataset/toyparity (spec, pipeline, workload: the three files docs/extending.md
describes) is registered the way an installed package registers one: a distribution on the path whose
entry_points.txt names its spec module in the group `codistill.datasets`. It then goes through every command a
built-in dataset does, in subprocesses as a user runs them: synth, preprocess on a real Beam runner, verify,
and a 2-group lockstep codistillation with DeepSpeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codistill.rundir import RunDir

from conftest import REPO, RUNNER

pytestmark = pytest.mark.timeout(300)

TOY = Path(__file__).parent / "toy_dataset"
BIN = Path(sys.executable).parent
MANIFEST = """
name: toy
data:
  dataset: toyparity
  input: {raw}/parity-*.txt
  output: {data}
  groups: 2
  eval_fraction: 0.2
  shards_per_group: 1
  eval_shards: 1
  format: webdataset
  toyparity:
    flip: true
model:
  kind: toy_mlp
  hidden: 16
optimizer:
  name: adam
  lr: 0.01
schedule:
  steps: 40
  warmup_steps: 0
deepspeed:
  ranks_per_group: 1
  micro_batch_size: 32
codistill:
  enabled: true
  burn_in_steps: 10
  exchange_every: 10
  lockstep: true
  lockstep_timeout: 120
  poll_seconds: 0.05
eval:
  every: 20
train:
  checkpoint_every: 20
  log_every: 10
"""


def _distribution(where: Path, name: str, entry_points: str) -> None:
    """An installed distribution as pip leaves it: its dist-info, naming its entry points."""
    info = where / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[codistill.datasets]\n{entry_points}\n")


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine where the toy package is installed: its code and its dist-info on the path."""
    site = tmp_path_factory.mktemp("site")
    _distribution(site, "toyparity", "toyparity = toyparity.spec")
    path = os.pathsep.join([str(TOY), str(site), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def codistill(env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "codistill"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def toy_run(plugin_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    synth = codistill(plugin_env, "synth", "toyparity", "--out", str(tmp / "raw"), "--rows", "3000")
    with open(tmp / "raw" / "parity-00000.txt", "ab") as f:
        f.write(b"0101\n")  # a bad line: rejected with its reason, the rest kept
    manifest = tmp / "toy.yaml"
    manifest.write_text(MANIFEST.format(raw=tmp / "raw", data=tmp / "data"))
    preprocess = codistill(plugin_env, "preprocess", "toyparity", "-m", str(manifest), RUNNER)
    verify = codistill(plugin_env, "verify", str(tmp / "data"))
    train = codistill(plugin_env, "train", str(manifest), "--run-dir", str(tmp / "run"))
    return tmp, synth, preprocess, verify, train


def test_the_plugin_is_a_dataset_of_every_command(plugin_env):
    for command in ("synth", "preprocess"):
        assert "toyparity" in codistill(plugin_env, command, "--help").stdout
    assert "--flip" in codistill(plugin_env, "preprocess", "toyparity", "--help").stdout


def test_the_plugin_dataset_is_built_verified_and_codistilled(toy_run, plugin_env):
    tmp, synth, preprocess, verify, train = toy_run
    assert "wrote 3000 lines of bits" in synth.stdout
    # Read where the plugin is installed, as a user's code would.
    read = ("from codistill.dataset import load_manifest; m = load_manifest({!r}); "
            "print(m.input_rows, m.written_rows, m.rejected, repr(m.settings.toyparity))").format(str(tmp / "data"))
    facts = subprocess.run([sys.executable, "-c", read], env=plugin_env, capture_output=True, text=True, check=True)
    # in = out + rejected; the recorded settings come back as the spec's dataclass
    assert facts.stdout.split(" ", 2) == ["3001", "3000", "{'bad_line': 1} ToyParityConfig(flip=True)\n"]
    assert "toyparity" in preprocess.stdout
    for g in (0, 1):
        lines = RunDir(tmp / "run").group(g).metrics.read_text().splitlines()
        records = [json.loads(line) for line in lines]
        evals = [r for r in records if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == [20, 40] and evals[-1]["loss"] < 0.69, evals
        distilled = [r["step"] for r in records if r["kind"] == "train" and r["peers"]]
        assert distilled == list(range(11, 41)), distilled  # lockstep: a peer at every step after burn-in


def test_a_model_of_another_dataset_is_refused_at_parse_time(plugin_env, tmp_path):
    manifest = tmp_path / "toy.yaml"
    text = MANIFEST.format(raw=tmp_path, data=tmp_path / "data")
    manifest.write_text(text.replace("kind: toy_mlp", "kind: criteo_dnn"))
    proc = codistill(plugin_env, "train", str(manifest), "--run-dir", str(tmp_path / "r"), ok=False)
    assert "model.kind" in proc.stdout + proc.stderr and "toy_mlp" in proc.stdout + proc.stderr


def test_a_plugin_may_not_replace_a_built_in_dataset(plugin_env, tmp_path):
    (tmp_path / "evil_spec.py").write_text("from codistill.datasets.criteo import SPEC  # another module claims it\n")
    _distribution(tmp_path, "evil", "criteo = evil_spec")
    env = dict(plugin_env, PYTHONPATH=os.pathsep.join([str(tmp_path), plugin_env["PYTHONPATH"]]))
    proc = codistill(env, "synth", "--help", ok=False)
    assert "dataset 'criteo' of evil_spec is already registered by codistill.datasets.criteo" in proc.stderr


def test_a_plugin_installed_twice_registers_once(plugin_env, tmp_path):
    """The toy package's entry point again in a second distribution (as editable and regular installs leave)."""
    _distribution(tmp_path, "toyparity-again", "toyparity = toyparity.spec")
    env = dict(plugin_env, PYTHONPATH=os.pathsep.join([str(tmp_path), plugin_env["PYTHONPATH"]]))
    proc = codistill(env, "synth", "--help")
    assert "toyparity" in proc.stdout
