"""Progress of a preprocessing run while it runs: work units and bytes done of the total, rows/s, time left.

Workers call `report()` as they read. Each report increments Beam metrics
(namespace `codistill`: counters `parts_done`, `bytes_read`, `rows_read`, and
the distribution `part_bytes`), which remote runners show live in their UIs
(Dataflow's job page, Flink's web UI) and return from `result.metrics()`. The
in-process runners only hand metrics over once `run()` returns (the Dask
runner never does), so each report is also sent as one small UDP datagram to
the `ProgressMonitor` the driver opens on 127.0.0.1: any local worker process
reaches it (FnApiRunner's multi_processing workers, a LocalCluster's
workers), a worker elsewhere sends into the void at no cost, and the monitor
only sums increments, so the order and the process they come from do not
matter. (A retried bundle counts twice in the monitor; Beam's committed
metrics do not.)

The totals are set on the driver while the pipeline is built, by the
transform that plans the work (`expect()`), or, where only the workers find
the work (the files of ImageNet's class folders, listed in parallel), added
by them as they find it (`report(found_parts=..., found_bytes=...)`).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable

from apache_beam.metrics import Metrics

from codistill.units import duration, size

NAMESPACE = "codistill"
FIELDS = ("parts", "bytes", "rows", "found_parts", "found_bytes")
_COUNTERS = {"parts": Metrics.counter(NAMESPACE, "parts_done"), "bytes": Metrics.counter(NAMESPACE, "bytes_read"),
             "rows": Metrics.counter(NAMESPACE, "rows_read"), "found_parts": Metrics.counter(NAMESPACE, "parts_found"),
             "found_bytes": Metrics.counter(NAMESPACE, "bytes_found")}
_PART_BYTES = Metrics.distribution(NAMESPACE, "part_bytes")

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


def expect(parts: int, bytes: int) -> None:  # noqa: A002
    """Totals of the work being planned (called on the driver while the pipeline is built)."""
    if _monitor is not None:
        _monitor.totals[0] += parts
        _monitor.totals[1] += bytes


class ProgressMonitor:
    """Driver side: sums the workers' reports and prints a progress line every `every` seconds.

    Use as a context manager around building and running the pipeline.
    """

    def __init__(self, every: float = 5.0, write: Callable[[str], None] | None = None):
        self.every = every
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.totals = [0, 0]  # parts, bytes
        self.done = [0, 0, 0]  # parts, bytes, rows
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
            self.write(self.line(final=True))

    def line(self, final: bool = False) -> str:
        (parts_total, bytes_total), (parts, done, rows) = self.totals, self.done
        elapsed = max(time.monotonic() - self._start, 1e-9)
        fraction = min(1.0, done / bytes_total) if bytes_total else float(parts >= parts_total)
        text = (f"progress: {min(parts, parts_total)}/{parts_total} input parts, {size(done)} of "
                f"{size(bytes_total)} read ({100 * fraction:.0f}%), {rows} rows, {rows / elapsed:,.0f} rows/s")
        if final:
            return f"{text}, done in {duration(elapsed)}"
        if fraction < 1:
            left = f"~{duration(elapsed * (1 - fraction) / fraction)} left" if fraction > 0 else "time left unknown"
            return f"{text}, {left} ({duration(elapsed)} so far)"
        return f"{text}, writing the shards ({duration(elapsed)} so far)"

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
            for i, value in enumerate(increments[:3]):
                self.done[i] += value
            for i, value in enumerate(increments[3:]):
                self.totals[i] += value
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
                self.write(self.line())
                next_line += self.every
