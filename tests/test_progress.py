"""Progress of `codistill preprocess`: reports from worker processes reach the driver's monitor, and the same
counts are Beam metrics, which the monitor also reads from the pipeline's result (where UDP cannot reach it)."""

from __future__ import annotations

import socket

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from conftest import RUNNER, criteo_config, dask_args, run_criteo

from codistill.dataset import load_manifest
from pipelines import progress
from pipelines.criteo import CriteoToShards
from pipelines.run import pipeline_options, preprocess
from pipelines.synth_criteo import generate_criteo
from pipelines.textfiles import expand_inputs, plan_ranges

SPLIT = 1 << 16


@pytest.fixture(scope="module")
def raw_input(tmp_path_factory) -> tuple[str, int, int, int]:
    """Two plain files of several ranges each and a gzip: (glob, rows, input parts, bytes)."""
    root = tmp_path_factory.mktemp("progress")
    generate_criteo(str(root / "plain"), 2000, files=2, seed=1)
    generate_criteo(str(root / "gz"), 300, files=1, seed=2, gzip=True)
    pattern = f"{root}/plain/train-*,{root}/gz/train-*"
    ranges = [r for path in expand_inputs(pattern) for r in plan_ranges(path, SPLIT)]
    return pattern, 2300, len(ranges), sum(r.length for r in ranges)


def test_monitor_sums_the_reports_of_two_worker_processes(raw_input, tmp_path, dask_cluster):
    """The workers are the Dask cluster's two processes (FnApiRunner's multi_processing workers report the
    same way, through the same WorkerDoFn setup)."""
    pattern, rows, parts, size = raw_input
    lines: list[str] = []
    preprocess(criteo_config(pattern, str(tmp_path / "out"), split_bytes=SPLIT), dask_args(dask_cluster),
               show_progress=lines.append)
    assert parts > 3
    assert lines[-1].startswith(f"progress: {parts}/{parts} input parts, ")
    assert f" read (100%), {rows} rows, " in lines[-1] and ", done in " in lines[-1]
    assert load_manifest(str(tmp_path / "out")).input_rows == rows


def test_progress_reaches_the_driver_through_dask_when_its_datagrams_do_not(raw_input, tmp_path, dask_cluster,
                                                                              monkeypatch):
    """As on a cluster of other machines, whose datagrams to 127.0.0.1 stay on their own host: here the workers
    send theirs to a closed port. The line still ends with every part and row, now from the Beam metrics the
    Dask workers publish through the scheduler (the previous test: with both sources, counted once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = closed.getsockname()
    monkeypatch.setattr(progress, "address", lambda: nowhere)  # where the workers built now will send
    pattern, rows, parts, size = raw_input
    lines: list[str] = []
    preprocess(criteo_config(pattern, str(tmp_path / "out"), split_bytes=SPLIT), dask_args(dask_cluster),
               show_progress=lines.append)
    assert lines[-1].startswith(f"progress: {parts}/{parts} input parts, ")
    assert f" read (100%), {rows} rows, " in lines[-1] and ", done in " in lines[-1]


def test_progress_line_shows_rate_and_time_left():
    monitor = progress.ProgressMonitor()
    monitor.planned, monitor.received = [6, 3_000_000], [2, 1_000_000, 50_000, 2, 1_000_000]
    monitor._start -= 10  # as if started 10 s ago
    line = monitor.line()
    assert line.startswith("progress: 2/8 input parts, 1.00 MB of 4.00 MB read (25%), 50000 rows, ")
    assert "~30s left (10s so far)" in line and "5,0" in line  # ~5,000 rows/s
    monitor.received = [8, 4_000_000, 200_000, 2, 1_000_000]
    assert "writing the shards" in monitor.line()


def test_sizes_found_by_the_workers_do_not_inflate_the_fraction():
    """Common Crawl plans its inputs but not their sizes (no request per input on the driver): the workers add
    each input's size as they stage it, so until all are known the fraction is that of the parts done."""
    monitor = progress.ProgressMonitor()
    monitor.planned = [100, 0]
    monitor.received = [1, 1_000_000, 10, 0, 2_000_000]  # 2 inputs' sizes known, 1 input read
    assert monitor.line().startswith("progress: 1/100 input parts, 1.00 MB of 2.00 MB read (1%), 10 rows, ")


def test_each_count_comes_from_the_source_that_saw_more():
    monitor = progress.ProgressMonitor()
    monitor.planned = [8, 4_000_000]
    monitor.received, monitor.metrics = [3, 1_000_000, 10, 0, 0], [2, 2_000_000, 20, 0, 0]
    assert monitor.line().startswith("progress: 3/8 input parts, 2.00 MB of 4.00 MB read (50%), 20 rows, ")


def test_monitor_ignores_datagrams_that_are_not_reports():
    lines: list[str] = []
    with progress.ProgressMonitor(write=lines.append) as monitor:
        progress.connect(monitor.address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            for junk in [b"\xff\xfe", b"{}", b"[1, 2]", b'["a", 1, 2, 0, 0]', b"[1.5, 0, 0, 0, 0]",
                         b"[1, 0, 0, 0, 0.5]", b"null", b""]:
                other.sendto(junk, monitor.address)
        progress.report(parts=1, bytes=10, rows=3)
        progress.connect(None)
    assert monitor.received == [1, 10, 3, 0, 0] and ", done in " in lines[-1]


def test_no_monitor_means_no_reports_and_no_errors(raw_input, tmp_path):
    assert progress.address() is None
    run_criteo(raw_input[0], str(tmp_path / "out"), split_bytes=SPLIT)


@pytest.mark.parametrize("runner", ["FnApiRunner", "DaskRunner"])
def test_counts_are_beam_metrics(raw_input, tmp_path, runner, request):
    pattern, rows, parts, size = raw_input
    config = criteo_config(pattern, str(tmp_path / "out"), split_bytes=SPLIT)
    args = dask_args(request.getfixturevalue("dask_cluster")) if runner == "DaskRunner" else [RUNNER]
    p = beam.Pipeline(options=pipeline_options(args))
    _ = p | CriteoToShards(expand_inputs(pattern), config.data)
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace(progress.NAMESPACE))
    counters = {c.key.metric.name: c.committed for c in metrics["counters"]}
    assert counters == {"parts_done": parts, "rows_read": rows, "bytes_read": size}
    (part_bytes,) = metrics["distributions"]
    assert part_bytes.committed.count == parts and part_bytes.committed.sum == size
