"""Progress of a preprocessing run while it runs: work units and bytes done of the total, rows/s, time left.

Workers call `report()` as they read. Each report increments Beam metrics
(namespace `codistill`: counters `parts_done`, `bytes_read`, `rows_read`,
`parts_found`, `bytes_found` and the distribution `part_bytes`), and is also
sent as one small UDP datagram to the `ProgressMonitor` the driver opens on
127.0.0.1. The monitor's line shows, per counter, the larger of the two
sources (never their sum: they count the same work):

- the UDP datagrams, the fast local path: any worker process on this machine
  reaches them (FnApiRunner's multi_processing workers, a LocalCluster's
  workers); a worker elsewhere sends into the void at no cost. (The monitor
  only sums increments, so order and sender do not matter; a retried bundle
  counts twice here.)
- the pipeline result's Beam metrics, polled every line once the runner hands
  over its result (`follow()`) and once more when it has finished (committed
  values where the runner has them, else attempted). Which runners count
  while the job runs: Dataflow (each `metrics()` asks the service) and this
  project's Dask runner (its workers publish each bundle's metrics through
  Dask itself: `pipelines/dask_runner.py`), wherever their workers run. The
  in-process runners (FnApiRunner, which `DirectRunner` uses) return their
  result only once `run()` is over; the portable runners (Flink, Spark,
  Prism through a job server) fill in metrics only when the job ends, and
  Beam's client keeps the first answer it gets, so they are asked only then.

The totals are set on the driver while the pipeline is built, by the
transform that plans the work (`expect()`), or, where only the workers find
the work (the files of ImageNet's class folders, listed in parallel), added
by them as they find it (`report(found_parts=..., found_bytes=...)`).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.portable_runner import PipelineResult as PortablePipelineResult

from codistill.units import duration, size, time_left

NAMESPACE = "codistill"
FIELDS = ("parts", "bytes", "rows", "found_parts", "found_bytes")
COUNTER_NAMES = ("parts_done", "bytes_read", "rows_read", "parts_found", "bytes_found")  # one per field
_COUNTERS = {field: Metrics.counter(NAMESPACE, name) for field, name in zip(FIELDS, COUNTER_NAMES)}
_PART_BYTES = Metrics.distribution(NAMESPACE, "part_bytes")

logger = logging.getLogger(__name__)

# Worker side: where this process sends its reports (set by `connect`).
_address: tuple[str, int] | None = None
_socket: socket.socket | None = None
# Driver side: the monitor of the pipeline being built and run here, if any.
_monitor: ProgressMonitor | None = None


def connect(address: tuple[str, int] | None) -> None:
    global _address, _socket
    if address is not None and _socket is None:
        _socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _address = address


def report(parts: int = 0, bytes: int = 0, rows: int = 0, part_bytes: int | None = None,  # noqa: A002
           found_parts: int = 0, found_bytes: int = 0) -> None:
    """Count work done in this worker: `parts` finished work units, `bytes` and `rows` read; `found_parts` and
    `found_bytes` add work found here to the totals."""
    values = (parts, bytes, rows, found_parts, found_bytes)
    for name, value in zip(FIELDS, values):
        if value:
            _COUNTERS[name].inc(value)
    if part_bytes is not None:
        _PART_BYTES.update(part_bytes)
    if _address is not None:
        try:
            _socket.sendto(json.dumps(values).encode(), _address)
        except OSError:
            pass  # progress is best effort; the work is not


def address() -> tuple[str, int] | None:
    """Where workers built now should report: the driver's monitor, if one runs."""
    return _monitor.address if _monitor is not None else None


def say(line: str) -> None:
    """A line from a step the driver itself runs while the pipeline is built (training the tokenizer), where
    the progress lines go; nothing without a monitor."""
    if _monitor is not None:
        _monitor.write(line)


def expect(parts: int, bytes: int) -> None:  # noqa: A002
    """Totals of the work being planned (called on the driver while the pipeline is built)."""
    if _monitor is not None:
        _monitor.planned[0] += parts
        _monitor.planned[1] += bytes


class ProgressMonitor:
    """Driver side: counts the workers' reports and prints a progress line every `every` seconds.

    Use as a context manager around building and running the pipeline; hand it the pipeline's result
    (`follow`) as soon as the runner returns one.
    """

    def __init__(self, every: float = 5.0, write: Callable[[str], None] | None = None):
        self.every = every
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.planned = [0, 0]  # parts, bytes: the totals set on the driver (`expect`)
        self.received = [0] * len(FIELDS)  # sums of the UDP reports, per field
        self.metrics = [0] * len(FIELDS)  # the result's Beam metrics, per field
        self._result = None
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.address = self._socket.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-monitor", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> ProgressMonitor:
        global _monitor
        _monitor = self
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _monitor
        self._stop.set()
        self._thread.join()
        self._drain()
        self._socket.close()
        _monitor = None
        if exc[0] is None:
            self._poll()  # the result has finished: every runner's metrics are complete now
            self.write(self.line(final=True))

    def follow(self, result) -> None:
        """Also count from `result`'s Beam metrics (a `PipelineResult`, as `Pipeline.run()` returns it)."""
        self._result = result

    def counts(self) -> list[int]:
        """Per field, the larger count of the two sources (each counts all the work it sees)."""
        return [max(a, b) for a, b in zip(self.received, self.metrics)]

    def line(self, final: bool = False) -> str:
        parts, done, rows, found_parts, found_bytes = self.counts()
        parts_total, bytes_total = self.planned[0] + found_parts, self.planned[1] + found_bytes
        elapsed = max(time.monotonic() - self._start, 1e-9)
        # Bytes give the finer fraction once every part's size is known: planned with the parts, or found with
        # them (ImageNet's class folders). Common Crawl plans parts only; its sizes arrive as inputs are staged.
        if self.planned[1] or not self.planned[0]:
            fraction = min(1.0, done / bytes_total) if bytes_total else float(parts >= parts_total)
        else:
            fraction = min(1.0, parts / parts_total)
        text = (f"progress: {min(parts, parts_total)}/{parts_total} input parts, {size(done)} of "
                f"{size(bytes_total)} read ({100 * fraction:.0f}%), {rows} rows, {rows / elapsed:,.0f} rows/s")
        if final:
            return f"{text}, done in {duration(elapsed)}"
        if fraction < 1:
            return f"{text}, {time_left(fraction, elapsed)}"
        return f"{text}, writing the shards ({duration(elapsed)} so far)"

    def _poll(self) -> None:
        """Read the counters from the result's metrics, summed over the steps that increment them."""
        if self._result is None:
            return
        try:
            counters = self._result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
        except Exception as e:  # a runner without metrics, a service that does not answer: the line goes on
            logger.debug("no metrics from the pipeline result: %s", e)
            return
        sums = dict.fromkeys(COUNTER_NAMES, 0)
        for counter in counters:
            if counter.key.metric.name in sums:
                sums[counter.key.metric.name] += counter.result or 0  # committed, else attempted
        self.metrics = [sums[name] for name in COUNTER_NAMES]

    def _receive(self) -> bool:
        try:
            data = self._socket.recv(256)
        except (TimeoutError, BlockingIOError):
            return False
        try:
            increments = json.loads(data)
        except ValueError:
            return True  # not ours (anything local can send here): ignored
        if isinstance(increments, list) and len(increments) == len(FIELDS) and all(
                type(v) is int for v in increments):
            self.received = [total + value for total, value in zip(self.received, increments)]
        return True

    def _drain(self) -> None:
        self._socket.setblocking(False)
        while self._receive():
            pass

    def _run(self) -> None:
        next_line = time.monotonic() + self.every
        while not self._stop.is_set():
            self._receive()
            if time.monotonic() >= next_line:
                if not isinstance(self._result, PortablePipelineResult):  # see the module's docstring
                    self._poll()
                self.write(self.line())
                next_line += self.every
