"""This package's optional dependencies (`[project.optional-dependencies]`): which extra installs a missing
module (what an extra requires: `pipelines.requirements.extra_requirements`)."""

from __future__ import annotations

THIS = "codistill"
# The modules each extra brings (a module missing from a run that needs it names the extra to install).
EXTRA_MODULES = {
    "gcs": ("gcsfs",),
    "s3": ("s3fs",),
    "dask": ("dask", "distributed"),
    "gcp": ("apitools", "google.auth", "google.cloud", "google.api_core"),
    "tensorboard": ("tensorboard",),
    # Each dataset's own libraries (training ImageNet decodes with Pillow too).
    "criteo": ("pyarrow",),
    "commoncrawl": ("fastwarc", "resiliparse", "pycld2", "sentencepiece", "zlib_ng"),
    "imagenet": ("PIL", "simplejpeg"),
}


def missing_extra(error: BaseException) -> str | None:
    """One line for an ImportError of a module an extra installs (raised as it is, or the cause of the error
    a library raised for it: fsspec's "Please install gcsfs...", Beam's runner errors); None for any other."""
    top = error
    while error is not None:
        name = getattr(error, "name", None) if isinstance(error, ImportError) else None
        for extra, modules in EXTRA_MODULES.items():
            if name and any(name == m or name.startswith(f"{m}.") for m in modules):
                said = f"{top}" if repr(name) in str(top) else f"{top} (no module {name!r})"
                return f"{said}: install the [{extra}] extra: pip install -e '.[{extra}]'"
        error = error.__cause__ or error.__context__
    return None
