"""The package as a user installs it: a built wheel, not this checkout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from codistill.datasets import DATASETS
from pipelines.requirements import imported_distributions, imports_of
from conftest import REPO

PACKAGES = ("codistill", "pipelines", "training", "tokenizer")
CODISTILL = Path(sys.executable).parent / "codistill"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (a build writes build/ and *.egg-info beside them)."""
    source = tmp_path_factory.mktemp("source")
    for name in (*PACKAGES, "manifests"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True)
    return next(out.glob("codistill-*.whl"))


def test_wheel_holds_every_module_manifest_and_plan(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for name in PACKAGES for p in (REPO / name).rglob("*.py")}
    assert sources - names == set()
    shipped = {p.relative_to(REPO / "manifests").as_posix() for p in (REPO / "manifests").rglob("*.yaml")}
    assert {"criteo-tiny.yaml", "experiments/demo.yaml"} <= shipped
    assert {f"codistill/manifests/{name}" for name in shipped} <= names


def test_bare_manifest_and_plan_names_resolve_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    # Dependencies come from this environment; the package itself only from the wheel (PYTHONPATH goes first, and
    # the cwd is outside the checkout).
    script = """if True:
        import json
        import codistill
        from codistill.config import load_experiment, resolve_manifest
        from codistill.plans import load_plan
        plan = load_plan(resolve_manifest("demo", "experiments"))
        print(json.dumps({"package": codistill.__file__, "manifest": resolve_manifest("criteo-tiny"),
                          "name": load_experiment("criteo-tiny").name, "plan": plan.name, "base": plan.base}))
    """
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert Path(seen["package"]).is_relative_to(site)
    assert Path(seen["manifest"]) == site / "codistill" / "manifests" / "criteo-tiny.yaml"
    assert seen["name"] == "criteo-tiny" and seen["plan"] == "demo" and seen["base"]


@pytest.mark.parametrize("args", [["--help"], ["preprocess", "--help"], ["preprocess", "criteo", "--help"],
                                  ["synth", "imagenet", "--help"], ["train", "--help"], ["demo", "--help"]],
                         ids=" ".join)
def test_help_loads_no_torch_beam_or_numpy(args):
    """Help is click's alone: the heavy libraries (seconds to import) load when a command runs."""
    script = """if True:
        import sys
        from codistill.cli import main
        try:
            main(sys.argv[1:])
        except SystemExit as e:
            assert e.code == 0, e.code
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "apache_beam", "numpy", "deepspeed"})
        print("loaded:", heavy, file=sys.stderr)
    """
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage: " in result.stdout and result.stderr.strip() == "loaded: []"


def test_beams_missing_gcp_client_warning_never_reaches_the_user(tmp_path):
    """`preprocess` imports Beam, whose BigQuery module warns on the root logger without google-apitools."""
    missing = tmp_path / "missing.yaml"
    result = subprocess.run([str(CODISTILL), "preprocess", "criteo", "-m", str(missing)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 1 and f"{missing}: manifest not found" in result.stderr
    assert "apitools" not in result.stderr, result.stderr


@pytest.mark.parametrize("dataset", ["criteo", "commoncrawl", "imagenet"])
def test_each_dataset_extra_is_exactly_what_its_pipeline_imports(dataset):
    imported = {canonicalize_name(d) for d in imported_distributions(DATASETS[dataset].pipeline)}
    extra = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["optional-dependencies"][dataset]}
    assert imported == extra, f"[{dataset}] lacks {sorted(imported - extra)}, has unused {sorted(extra - imported)}"


def test_tfrecord_and_warcio_are_test_only():
    outside_tests = {m.split(".")[0] for name in PACKAGES for p in (REPO / name).rglob("*.py") for m in imports_of(p)}
    assert outside_tests.isdisjoint({"tfrecord", "warcio"})
    test_extra = {Requirement(r).name for r in PYPROJECT["optional-dependencies"]["test"]}
    assert {"tfrecord", "warcio"} <= test_extra


def test_requirements_lock_pins_every_requirement_make_installs_within_its_bounds():
    extras = re.search(r"^EXTRAS := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split(",")
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines()
                if line and not line.startswith("#"))
    lock = {canonicalize_name(name): version for name, version in lock.items()}
    for extra in extras:
        assert extra in PYPROJECT["optional-dependencies"], f"make installs [{extra}], which pyproject.toml lacks"
    for line in PYPROJECT["dependencies"] + [r for e in extras for r in PYPROJECT["optional-dependencies"][e]]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "codistill":  # an extra naming others of this project's extras (bench: codistill[dask,s3])
            assert requirement.extras <= set(PYPROJECT["optional-dependencies"]), line
            continue
        assert name in lock, f"requirements.lock has no pin for {line} (run `make lock`)"
        assert requirement.specifier.contains(lock[name]), f"requirements.lock pins {name}=={lock[name]}, not {line}"


def test_a_pipeline_whose_extra_is_not_installed_names_the_extra(tmp_path):
    """As after `pip install codistill` alone: pyarrow (the [criteo] extra's) cannot be imported."""
    script = "import sys; sys.modules['pyarrow'] = None; from codistill.cli import main; main()"
    args = ["synth", "criteo", "--rows", "10", "--out", str(tmp_path / "raw")]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: the criteo pipeline: import of pyarrow halted; None in sys.modules (no module 'pyarrow'): install "
        "the [criteo] extra: pip install -e '.[criteo]'")
