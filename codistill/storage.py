"""Every file-system call goes through here, so the manifest's `storage` rules reach each one.

A rule gives fsspec options for the URLs under a prefix (`StorageConfig`):
a dataset on one S3 endpoint and snapshots on another each get theirs. The
rules are per process: `configure()` installs them; the CLI and the trainer
do so from the manifest, and Beam workers from the DoFns that carry them
(`pipelines.run.WorkerDoFn`). URLs no rule matches get fsspec's own
configuration only (`FSSPEC_<PROTOCOL>_<OPTION>` variables, and for S3 the
usual `AWS_*` variables and profiles), exactly as plain fsspec would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import fsspec

from codistill.config import ConfigError, StorageConfig

_rules: tuple[StorageConfig, ...] = ()


def configure(rules: Iterable[StorageConfig]) -> None:
    global _rules
    _rules = tuple(rules)


def rules() -> tuple[StorageConfig, ...]:
    return _rules


def _under(url: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return url == prefix or url.startswith(prefix + "/")


def options_for(url: str) -> dict:
    """The options of the longest prefix that `url` is under; variables named in `env` are read now."""
    matching = [rule for rule in _rules if _under(url, rule.prefix)]
    if not matching:
        return {}
    rule = max(matching, key=lambda r: len(r.prefix.rstrip("/")))
    options = dict(rule.options)
    for option, variable in rule.env.items():
        if variable not in os.environ:
            raise ConfigError(f"storage rule {rule.prefix}: environment variable {variable} (for {option}) is not set")
        options[option] = os.environ[variable]
    return options


def url_to_fs(url: str, **kwargs) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **options_for(url), **kwargs)


def open(url: str, mode: str = "rb", **kwargs) -> fsspec.core.OpenFile:  # noqa: A001 (fsspec.open's twin)
    return fsspec.open(url, mode, **options_for(url), **kwargs)
