"""Errors the command line reports as one line, importable without Beam (so `codistill --help` stays fast)."""


class InputReadError(RuntimeError):
    """Reading an input failed (an I/O error, not damaged data): the work item fails, so the runner can
    retry it, instead of the rest of the file being booked as one corrupt record."""
