"""This package's optional dependencies (`[project.optional-dependencies]`): which extra installs a missing
module, and what an extra requires."""

from __future__ import annotations

import importlib.metadata

from packaging.requirements import Requirement

THIS = "codistill"
# The modules each extra brings (a module missing from a run that needs it names the extra to install).
EXTRA_MODULES = {
    "gcs": ("gcsfs",),
    "s3": ("s3fs",),
    "dask": ("dask", "distributed"),
    "gcp": ("apitools", "google.auth", "google.cloud", "google.api_core"),
    "tensorboard": ("tensorboard",),
}


def missing_extra(error: BaseException) -> str | None:
    """One line for an ImportError of a module an extra installs (raised as it is, or the cause of the error
    a library raised for it: fsspec's "Please install gcsfs...", Beam's runner errors); None for any other."""
    top = error
    while error is not None:
        name = getattr(error, "name", None) if isinstance(error, ImportError) else None
        for extra, modules in EXTRA_MODULES.items():
            if name and any(name == m or name.startswith(f"{m}.") for m in modules):
                return f"{top} (no module {name!r}): install the [{extra}] extra: pip install -e '.[{extra}]'"
        error = error.__cause__ or error.__context__
    return None


def extra_requirements(extra: str) -> list[str]:
    """The requirement lines of one of this package's extras."""
    if extra not in (importlib.metadata.metadata(THIS).get_all("Provides-Extra") or []):
        raise ValueError(f"{THIS} has no extra {extra!r}")
    lines = []
    for line in importlib.metadata.requires(THIS) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
            requirement.marker = None
            lines.append(str(requirement))
    return lines
