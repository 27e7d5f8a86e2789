"""`WorkerDoFn`: the base of every DoFn that touches storage or reports progress.

It carries the driver's storage rules and progress address to whichever
worker process runs it (a multi_processing FnApiRunner worker, a Dask worker,
a Dataflow VM) and installs them in `setup()`. (Its own module: the sinks and
readers that use it are imported by `pipelines.run`.)
"""

from __future__ import annotations

import apache_beam as beam

from codistill import storage
from pipelines import progress


class WorkerDoFn(beam.DoFn):
    """A DoFn that brings the run's storage rules and progress address (as set on the driver when the
    pipeline is built) to the worker that runs it. Subclasses that define `setup` call `super().setup()`."""

    def __init__(self):
        super().__init__()
        self._storage_rules = storage.rules()
        self._progress_address = progress.address()

    def setup(self):
        storage.configure(self._storage_rules)
        progress.connect(self._progress_address)
