"""Beam pipeline options on the command line exactly as Beam takes them, checked with `preprocess --dry-run`."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from codistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _readme_runner_commands() -> list[str]:
    """Every complete `codistill preprocess ... --runner ...` command in the README and docs/ (continuation
    lines joined; a synopsis with [optional] parts or `...` is not a command)."""
    text = "\n".join(p.read_text() for p in GUIDES).replace("\\\n", " ")
    commands = [re.sub(r"\s+#.*", "", line).strip() for line in text.splitlines()]
    return list(dict.fromkeys(c for c in commands if c.startswith("codistill preprocess ") and "--runner" in c
                              and "[" not in c and "..." not in c))  # README repeats some of docs/ on purpose


def _dry_run(args: list[str]) -> dict:
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _values(options: dict) -> set[str]:
    return {str(x) for v in options.values() for x in (v if isinstance(v, list) else [v])}


def test_the_readme_shows_every_runner():
    runners = {shlex.split(c)[shlex.split(c).index("--runner") + 1] for c in _readme_runner_commands()}
    assert runners == {"DataflowRunner", "DaskRunner", "FlinkRunner", "SparkRunner"}


@pytest.mark.parametrize("command", _readme_runner_commands())
def test_every_readme_runner_command_parses(command):
    """Each Beam option of the command (whatever this command does not know), in either form, reaches
    Beam's PipelineOptions with its value."""
    args = shlex.split(command)[1:]
    parsed = _dry_run(args)
    options = parsed["pipeline_options"]
    known = {name for p in main.commands["preprocess"].get_command(None, args[1]).params for name in p.opts}
    beam = [a for a in args if a.startswith("--") and a.split("=")[0] not in known]
    for arg in beam:
        name, _, value = arg.partition("=")
        if not value:
            value = args[args.index(arg) + 1]
        assert value in _values(options), (arg, options)
    runner = args[args.index("--runner") + 1]
    assert options["runner"] == {"DaskRunner": "pipelines.dask_runner.DaskRunner"}.get(runner, runner)
    for flag in ("--input", "--output"):
        if flag in args:
            assert parsed[flag[2:]] == args[args.index(flag) + 1]


@pytest.mark.parametrize("options", [
    ["--runner", "DataflowRunner", "--project", "my-project", "--region", "us-central1", "--temp_location",
     "gs://bkt/tmp", "--requirements_file", "worker-requirements.txt", "--num_workers", "4"],
    ["--runner", "DaskRunner", "--dask_client_address", "tcp://10.0.0.1:8786", "--dask_npartitions", "8"],
    ["--runner", "FlinkRunner", "--flink_master", "host:8081", "--environment_type", "LOOPBACK"],
    ["--runner", "SparkRunner", "--spark_master_url", "spark://host:7077", "--some_future_option", "x"],
])
def test_space_and_equals_forms_give_the_same_options(options):
    pairs = list(zip(options[::2], options[1::2]))
    spaced = _dry_run(["preprocess", "criteo", "-m", "criteo-tiny", *options])
    joined = _dry_run(["preprocess", "criteo", "-m", "criteo-tiny", *(f"{k}={v}" for k, v in pairs)])
    assert spaced == joined
    assert {v for k, v in pairs if k != "--runner"} <= _values(spaced["pipeline_options"])


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    for name in ("day_0.gz", "day_1.gz", "day_2.gz"):
        (tmp_path / name).write_bytes(b"")
    return sorted(str(p) for p in tmp_path.glob("day_*.gz"))  # what the shell makes of an unquoted day_*.gz


@pytest.mark.parametrize("where", ["last", "before a Beam flag", "after a Beam flag", "equals form"])
def test_a_glob_the_shell_expanded_is_refused(inputs, tmp_path, where):
    out = ["--output", str(tmp_path / "out")]
    given = {"last": [*out, "--input", *inputs],
             "before a Beam flag": ["--input", *inputs, "--save_main_session", *out],
             "after a Beam flag": ["--experiments", *out, "--input", *inputs],  # not swallowed as its value
             "equals form": [f"--input={inputs[0]}", *inputs[1:], "--project", "p"]}[where]
    result = CliRunner().invoke(main, ["preprocess", "criteo", *given, "--dry-run"])
    assert result.exit_code == 2
    assert "--input" in result.output and "got 3 paths" in result.output and "quote it" in result.output
    assert not (tmp_path / "out").exists()


def test_tokenizer_train_refuses_an_expanded_glob_too(inputs, tmp_path):
    result = CliRunner().invoke(main, ["tokenizer", "train", "--input", *inputs, "--out", str(tmp_path / "m"),
                                       "--vocab-size", "400"])
    assert result.exit_code == 2 and "got 3 paths" in result.output


@pytest.mark.parametrize("args", [["stray"], ["--save_main_session", "stray"], ["--project=p", "stray"]])
def test_an_argument_no_option_takes_is_an_error(args, tmp_path):
    result = CliRunner().invoke(main, ["preprocess", "criteo", "-m", "criteo-tiny", "--output",
                                       str(tmp_path / "out"), *args])
    assert result.exit_code == 1
    assert "unexpected argument 'stray': no pipeline option takes it" in result.output
    assert not (tmp_path / "out").exists()
