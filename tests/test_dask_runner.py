"""Beam on dask.distributed: a LocalCluster of 2 worker processes, byte-identical shards to the in-process runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
import dask.distributed as ddist
import pytest
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.dask.dask_runner import DaskOptions
from apache_beam.testing.util import assert_that, equal_to
from click.testing import CliRunner
from conftest import RUNNER, dask_args, make_criteo_file, read_rejected, run_criteo, shard_bytes

from codistill.cli import main
from codistill.config import parse_experiment
from codistill.dataset import load_manifest
from codistill.verify import verify_dataset
from pipelines.run import DASK_RUNNER, pipeline_options, preprocess
from pipelines.synth_criteo import generate_criteo
from pipelines.synth_imagenet import generate_imagenet


@pytest.fixture
def cluster(dask_cluster):
    return dask_cluster


@pytest.mark.parametrize("name", ["DaskRunner", "apache_beam.runners.dask.dask_runner.DaskRunner"])
def test_dask_runner_names_run_the_fixed_runner(name):
    options = pipeline_options(["--runner", name])
    assert options.view_as(StandardOptions).runner == DASK_RUNNER
    assert options.view_as(DaskOptions).partition_size == 1  # one heavy work item per dask partition
    assert pipeline_options(["--runner", name, "--dask_npartitions=4"]).view_as(DaskOptions).npartitions == 4


class _SplitByParity(beam.DoFn):
    def process(self, x, offset) -> Iterator[tuple[str, int]]:
        yield beam.pvalue.TaggedOutput("odd" if x % 2 else "even", x + offset)
        yield "all", x


def test_tagged_outputs_side_inputs_and_every_leaf(cluster, tmp_path):
    """Each tag gets only its own elements, a side input is seen whole, and a leaf that is not the last
    transform still runs (Beam's own DaskRunner fails all three)."""
    leaf = tmp_path / "leaf.txt"
    with beam.Pipeline(options=pipeline_options(dask_args(cluster))) as p:
        offset = p | "Offset" >> beam.Create([100])
        split = (p | beam.Create(range(6))
                 | beam.ParDo(_SplitByParity(), beam.pvalue.AsSingleton(offset)).with_outputs("odd", "even",
                                                                                              main="all"))
        _ = (split.all | beam.GroupByKey() | beam.MapTuple(lambda k, v: leaf.write_text(str(sorted(v)))))
        assert_that(split.odd, equal_to([101, 103, 105]), label="Odd")
        assert_that(split.even, equal_to([100, 102, 104]), label="Even")
    assert leaf.read_text() == str(list(range(6)))


@pytest.fixture(scope="module")
def criteo_input(tmp_path_factory):
    """Several split ranges of a plain file with bad rows, and a gzip file: every path of the pipeline."""
    root = tmp_path_factory.mktemp("dask-input")
    generate_criteo(str(root / "in"), 3000, files=1, seed=3)
    make_criteo_file(str(root / "in" / "small.txt.gz"), 200, {9: "bad_hex", 150: "empty_line"}, compress=True)
    return f"{root}/in/train-*,{root}/in/small.txt.gz"


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_dask_shards_are_byte_identical_to_the_in_process_runner(cluster, criteo_input, tmp_path, fmt):
    local = run_criteo(criteo_input, str(tmp_path / "local"), split_bytes=1 << 16, format=fmt)
    dask = run_criteo(criteo_input, str(tmp_path / "dask"), split_bytes=1 << 16, format=fmt,
                      beam_args=dask_args(cluster))
    assert dask.shards == local.shards and dask.inputs == local.inputs and dask.rejected == local.rejected
    assert shard_bytes(str(tmp_path / "dask")) == shard_bytes(str(tmp_path / "local"))
    assert {(r["source"], r["line"]) for r in read_rejected(str(tmp_path / "dask"))} == {("small.txt.gz", 9),
                                                                                         ("small.txt.gz", 150)}
    assert verify_dataset(str(tmp_path / "dask")).ok


def test_imagenet_on_dask_is_byte_identical_and_reports_every_file(cluster, tmp_path):
    """ImageNet's files are found by the listing workers: they add them to the progress totals, and the
    processing workers count them done (bad files included)."""
    generate_imagenet(str(tmp_path / "raw"), classes=3, per_class=12, val_per_class=2, seed=1, min_size=32,
                      max_size=48, faults=1)

    def config(output: str):
        return parse_experiment({"name": "test", "data": {
            "dataset": "imagenet", "input": str(tmp_path / "raw"), "output": str(tmp_path / output), "groups": 2,
            "shards_per_group": 1, "eval_shards": 1, "seed": 3, "imagenet": {"images_per_task": 8}}})

    local = preprocess(config("local"), [RUNNER])
    lines: list[str] = []
    dask = preprocess(config("dask"), dask_args(cluster), show_progress=lines.append)
    assert shard_bytes(str(tmp_path / "dask")) == shard_bytes(str(tmp_path / "local"))
    assert dask.shards == local.shards and dask.rejected == local.rejected and dask.extra == local.extra
    files = dask.input_rows
    assert files == sum(1 for p in (tmp_path / "raw").rglob("*") if p.is_file() and p.parent.name != "raw")
    assert lines[-1].startswith(f"progress: {files}/{files} input parts, "), lines
    assert " read (100%), " in lines[-1] and f", {files} rows, " in lines[-1], lines


@pytest.fixture
def scheduler_address(tmp_path) -> Iterator[str]:
    """A cluster as the README starts one: `dask scheduler` and `dask worker` processes of their own, found
    by address (127.0.0.1, a free port the scheduler picks and writes to its scheduler file)."""
    dask_cli = str(Path(sys.executable).with_name("dask"))
    file = tmp_path / "scheduler.json"
    # Each in a process group of its own: `dask worker` runs its workers in child processes (nannies).
    processes = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                   "--scheduler-file", str(file)], start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None:  # the scheduler writes the file once it listens
            assert processes[0].poll() is None and time.monotonic() < deadline, "dask scheduler did not start"
            try:
                address = json.loads(file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.1)
        processes.append(subprocess.Popen([dask_cli, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                           "--host", "127.0.0.1", "--no-dashboard"], start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with ddist.Client(address) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(60)


def test_readme_cluster_form_runs_on_a_scheduler_started_apart(scheduler_address, criteo_input, tmp_path):
    """`--runner DaskRunner --dask_client_address tcp://HOST:PORT` (space-separated, as Beam's docs write it)
    runs on the workers of a separately started scheduler (byte-identity to the in-process runner: above)."""
    args = ["preprocess", "criteo", "--input", criteo_input, "--output", str(tmp_path / "dask"), "--groups", "2",
            "--runner", "DaskRunner", "--dask_client_address", scheduler_address]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with ddist.Client(scheduler_address) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and all(executed.values()), executed  # both workers did part of the work
    built = load_manifest(str(tmp_path / "dask"))
    assert (built.input_rows, sum(built.rejected.values())) == (3200, 2)
    assert verify_dataset(str(tmp_path / "dask")).ok
