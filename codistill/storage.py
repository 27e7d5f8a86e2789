"""Every file-system call goes through here, so the manifest's `storage` rules reach each one.

A rule gives fsspec options for the URLs under a prefix (`StorageConfig`):
a dataset on one S3 endpoint and snapshots on another each get theirs. The
rules are per process: `configure()` installs them; the CLI and the trainer
do so from the manifest, and Beam workers from the DoFns that carry them
(`pipelines.run.WorkerDoFn`). URLs no rule matches get fsspec's own
configuration only (`FSSPEC_<PROTOCOL>_<OPTION>` variables, and for S3 the
usual `AWS_*` variables and profiles), exactly as plain fsspec would.

Files that readers must see whole or not at all (shards, manifests, markers,
the snapshot store's LATEST, a run's nonce) are written by `atomic_writer` /
`write_atomically`: on a local file system under a temp name in the same
directory (`.tmp-<random>-<name>`, which `is_temp` recognises) and then
renamed, since rename(2) is atomic and writing in place is not; on other file
systems as one upload at the final name, since object stores make an upload
visible only once it is complete (and have no rename: `mv` copies, then
deletes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING

import fsspec

from codistill.fields import ConfigError

if TYPE_CHECKING:
    from codistill.config import StorageConfig

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


class StoreError(OSError):
    """A store that cannot be used, in one line naming its URL and the likely cause (`explain`)."""


def explain(url: str, err: BaseException) -> str:
    """One line for a failed store access: the URL, the likely cause, then the error itself (its first line)."""
    detail = (str(err).strip().splitlines() or [""])[0][:200]
    text = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return f"{url}: {_likely_cause(err)} ({text})"


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store access raises: OSError, and the client libraries' own errors where they are installed
    (an unreachable S3 endpoint raises botocore's EndpointConnectionError, not an OSError)."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError
        errors.append(BotoCoreError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError
        errors.append(ClientError)
    return tuple(errors)


@contextlib.contextmanager
def explained(url: str) -> Iterator[None]:
    """Store errors inside the block become one StoreError line naming `url` and the likely cause (`explain`):
    not a bare `Forbidden`, nor a client library's traceback. FileNotFoundError passes through (callers say
    what is missing) and so does a StoreError."""
    try:
        yield
    except (StoreError, FileNotFoundError):
        raise
    except _store_errors() as err:
        raise StoreError(explain(url, err)) from err


def _likely_cause(err: BaseException) -> str:
    code = getattr(err, "errno", None)
    if isinstance(err, ConnectionError) or any("Connect" in cls.__name__ for cls in type(err).__mro__):
        return "cannot reach the store's endpoint: is it running, and is the endpoint_url (storage rule) right?"
    if any("NoCredentials" in cls.__name__ for cls in type(err).__mro__):  # botocore's, raised as it is by s3fs
        return ("no credentials found: set the storage rule's env variables (or the provider's own: AWS_* for "
                "S3, GOOGLE_APPLICATION_CREDENTIALS for GCS)")
    if isinstance(err, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return "access denied: wrong or missing credentials, or no permission there"
    if code == errno.EROFS:
        return "read-only file system"
    if code == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        return "a file stands where a directory must be"
    if isinstance(err, FileNotFoundError):
        return "not found"
    return "cannot be used"  # reads come through here too (a manifest, a peer's run.json)


TEMP_PREFIX = ".tmp-"  # the names files are written under before their rename


def is_temp(name: str) -> bool:
    """Whether a file or directory name is a temp name of `atomic_writer` (a leftover of an interrupted write)."""
    return name.startswith(TEMP_PREFIX)


def _renames_atomically(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


# Object stores: buckets hold keys, not directories. fs.makedirs would create a missing bucket (s3fs does), so
# a misspelt bucket name would put the data into a new bucket in the caller's account.
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl"})
_buckets_found: set[tuple[fsspec.AbstractFileSystem, str]] = set()


def make_dirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Make the directory `path` for files to go into. On an object store only check that its bucket exists
    (StoreError naming it otherwise): a bucket is never created here."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if not _BUCKETED.intersection(protocols):
        fs.makedirs(path, exist_ok=True)
        return
    bucket = fs._strip_protocol(path).split("/", 1)[0]
    if (fs, bucket) in _buckets_found:
        return
    try:
        fs.info(bucket)
    except FileNotFoundError as err:
        raise StoreError(f"{fs.unstrip_protocol(bucket)}: no such bucket; buckets are never created here: "
                         f"create it, or correct the name (writing {fs.unstrip_protocol(path)})") from err
    except PermissionError:
        pass  # credentials scoped to a prefix may not look at the bucket itself: the writes will say what they may
    _buckets_found.add((fs, bucket))


def _target(url: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(file system, path, temp path beside it), with the parent directory made."""
    fs, path = (fs, url) if fs is not None else url_to_fs(url)
    parent, name = path.rsplit("/", 1)
    make_dirs(fs, parent)
    return fs, path, f"{parent}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        fs.rm_file(path)


@contextlib.contextmanager
def atomic_writer(url: str, fs: fsspec.AbstractFileSystem | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write `url` through: it appears at `url` complete when the block ends. If the block
    raises, no part of it is left behind (a local file it was to replace stays). With `fs`, `url` is a path on
    that file system."""
    fs, path, tmp = _target(url, fs)
    written = tmp if _renames_atomically(fs) else path
    try:
        with fs.open(written, "wb") as f:
            yield f
        if written != path:
            fs.mv(written, path)
    except BaseException:
        _remove(fs, written)  # a temp file, or an upload cut short
        raise


def check_writable(url: str) -> None:
    """Write and delete a small file under the directory `url`, so a store that cannot take files fails now,
    in one line (StoreError), not on every later write."""
    probe = f"{url.rstrip('/')}/{TEMP_PREFIX}{uuid.uuid4().hex}-probe"
    try:
        fs, path, _ = _target(probe, None)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except StoreError:
        raise
    except Exception as err:  # any backend's error: what matters is that it names the store
        raise StoreError(explain(url, err)) from err


def write_atomically(url: str, data: bytes | str, fs: fsspec.AbstractFileSystem | None = None,
                     replace: bool = True) -> bool:
    """`data` (text as UTF-8) at `url`, all at once: locally a temp file and a rename, elsewhere one put.
    With `replace=False` a file already at `url` stays (an exclusive create: locally a hard link of the temp
    file, which fails if the name exists); returns whether `data` was written. With `fs`, `url` is a path on
    that file system."""
    data = data.encode() if isinstance(data, str) else data
    fs, path, tmp = _target(url, fs)
    if not _renames_atomically(fs):
        if replace:
            fs.pipe_file(path, data)
            return True
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True
    try:
        fs.pipe_file(tmp, data)
        if replace:
            fs.mv(tmp, path)
            return True
        try:
            fs.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        _remove(fs, tmp)  # left after a failed write or a link; a rename took it already
