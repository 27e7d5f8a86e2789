"""Optional dependencies: a missing one is one line naming the extra; remote workers' requirements per dataset."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

from codistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    """The exact versions `make` installs (requirements.lock), by lower-case name."""
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return dict(line.lower().split("==") for line in lines if line and not line.startswith("#"))


def _requirements(tmp_path, dataset: str, *extras: str) -> list[str]:
    out = tmp_path / f"{dataset}-requirements.txt"
    args = ["worker-requirements", dataset, "--out", str(out), *(a for e in extras for a in ("--extra", e))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out.read_text().splitlines()


@pytest.mark.parametrize("dataset, own", [("criteo", {"pyarrow"}),
                                          ("commoncrawl", {"fastwarc", "resiliparse", "pycld2", "sentencepiece"}),
                                          ("imagenet", {"pillow", "simplejpeg"})])
def test_worker_requirements_are_what_each_pipeline_imports_at_the_project_pins(tmp_path, dataset, own):
    lines = _requirements(tmp_path, dataset, "gcs")
    pins = _pins()
    named = dict(re.match(r"([^=<>\[]+)(?:\[.*\])?[=<>]=(.+)", line.lower()).groups() for line in lines)
    # Exactly the dataset's extra (pyproject.toml, kept by hand) with the gcs extra, less Beam: nothing else.
    extra = {Requirement(r).name.lower() for r in PYPROJECT["optional-dependencies"][dataset]} - {"apache-beam"}
    assert set(named) == extra | {"gcsfs"} and own <= extra, sorted(set(named) ^ (extra | {"gcsfs"}))
    # What the pipeline imports is pinned at the version installed here (the lock's); an extra's own
    # requirement (gcsfs, not installed here) comes as pyproject.toml states it.
    assert all(pins[name] == version for name, version in named.items() if name != "gcsfs"), (named, pins)
    assert "gcsfs>=2026.10.0" in lines
    # Beam comes with the workers' SDK container; training's libraries are not the pipeline's.
    assert not {"apache-beam", "torch", "deepspeed", "click"} & set(named)


def test_worker_requirements_file_is_one_pip_installs(tmp_path):
    """Every line parses as pip reads a --requirements_file and is met by this environment's pins (pip
    offline: nothing to fetch, so anything unmet or malformed fails)."""
    _requirements(tmp_path, "commoncrawl")
    check = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r",
                            str(tmp_path / "commoncrawl-requirements.txt")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Would install" not in check.stdout


def test_an_unknown_extra_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["worker-requirements", "criteo", "--extra", "gpc"])
    assert result.exit_code == 1 and "codistill has no extra 'gpc'" in result.output


def _one_error_line(output: str, extra: str) -> str:
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"install the [{extra}] extra: pip install -e '.[{extra}]'" in errors[0], output
    return errors[0]


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_names_the_gcs_extra(tmp_path):
    result = CliRunner().invoke(main, ["preprocess", "criteo", "--input", "gs://bkt/criteo/day_*.gz",
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "gcsfs" in _one_error_line(result.output, "gcs")


@pytest.mark.skipif(importlib.util.find_spec("apitools") is not None, reason="apache-beam[gcp] is installed")
def test_dataflow_without_gcp_names_the_gcp_extra_before_anything_runs(tmp_path):
    result = CliRunner().invoke(main, ["preprocess", "criteo", "-m", "criteo-tiny", "--output", str(tmp_path / "out"),
                                       "--runner", "DataflowRunner", "--project", "my-project", "--region",
                                       "us-central1", "--temp_location", "gs://bkt/tmp"])
    assert result.exit_code == 1
    assert "DataflowRunner needs" in _one_error_line(result.output, "gcp")
    assert not (tmp_path / "out").exists()  # the synthetic input was not generated either


# These are installed here (the test extras): a fresh interpreter with them made unimportable, as if absent.
WITHOUT = "import sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(','))); " \
          "from codistill.cli import main; main(sys.argv[2:], prog_name='codistill')"


@pytest.mark.parametrize("absent, extra, args", [
    ("s3fs", "s3", ["--input", "s3://bkt/criteo/day_*.gz"]),
    ("dask,distributed", "dask", ["-m", "criteo-tiny", "--runner", "DaskRunner", "--dask_client_address",
                                  "tcp://127.0.0.1:1"]),
])
def test_s3_and_dask_without_their_libraries_name_the_extra(tmp_path, absent, extra, args):
    run = subprocess.run([sys.executable, "-c", WITHOUT, absent, "preprocess", "criteo", *args,
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert absent.split(",")[0] in _one_error_line(run.stderr, extra)
    assert not (tmp_path / "out").exists()


def test_training_imagenet_without_pillow_names_the_imagenet_extra(tmp_path):
    run = subprocess.run([sys.executable, "-c", WITHOUT, "PIL", "train", "imagenet-tiny", "--run-dir",
                          str(tmp_path / "run"), "--set", f"data.output={tmp_path / 'data'}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "PIL" in _one_error_line(run.stderr, "imagenet")
