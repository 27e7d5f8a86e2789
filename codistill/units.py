"""Human-readable sizes and durations for progress lines."""

from __future__ import annotations


def size(n: float) -> str:
    """Bytes in decimal units: `512 B`, `1.21 GB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def time_left(fraction: float, elapsed: float) -> str:
    """`~30s left (10s so far)`: the time so far scaled by the fraction of the work done."""
    left = f"~{duration(elapsed * (1 - fraction) / fraction)} left" if fraction > 0 else "time left unknown"
    return f"{left} ({duration(elapsed)} so far)"
