"""ImageNet input as users have it: where the images are, their labels, and the listing of each work item.

Three layouts, told apart by what the input folder (local or any fsspec URL) holds:

* extracted ILSVRC folders: `train/<wnid>/*`, optionally `val/` (`val/<wnid>/*`, or flat with a label file);
* the files as downloaded, read in place: `ILSVRC2012_img_train.tar` (one tar per class inside),
  `ILSVRC2012_img_val.tar` (flat), and the devkit for the val labels (`ILSVRC2012_devkit_t12.tar.gz`, or
  the folder it extracts to); a split may also come as a folder beside the other's tar;
* Kaggle's: `ILSVRC/Data/CLS-LOC/{train,val}` with `LOC_val_solution.csv` and `LOC_synset_mapping.txt` at
  the dataset root (the input may be that root or `ILSVRC/Data/CLS-LOC` itself).

Every image of a tar is a contiguous byte range of the file (tar does not compress), so nothing is ever
extracted: a worker lists a class tar or the val tar by walking its 512-byte headers, and the image tasks
read each image's bytes by offset, as they read files from folders.

Damaged archives stop the run with the archive and byte offset named: a truncated download or a broken
header leaves images unaccounted for, and a data set silently missing them would be worse.
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from scipy.io import loadmat

from codistill import storage
from codistill.dataset import join
from codistill.datasets.imagenet import ImageNetConfig
from pipelines import progress
from pipelines.synth_imagenet import read_synsets
from pipelines.worker import WorkerDoFn

TRAIN_ARCHIVE, VAL_ARCHIVE = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"  # `.tar.gz` as downloaded, or the folder it extracts to
GROUND_TRUTH, META = "data/ILSVRC2012_validation_ground_truth.txt", "data/meta.mat"
KAGGLE_DATA, KAGGLE_VAL_LABELS, KAGGLE_SYNSETS = "ILSVRC/Data/CLS-LOC", "LOC_val_solution.csv", "LOC_synset_mapping.txt"
JUNK = frozenset({"__MACOSX", "lost+found"})  # never classes, nor are dot-folders (.ipynb_checkpoints, .Trash-0)
WNID = re.compile(r"n\d{8}")
DEVKIT_MAX_BYTES = 256 << 20  # the devkit is ~2.5 MB compressed; a bigger one is not the devkit
LABEL_FILE_MAX_BYTES = 64 << 20
HEADER_READ = 1 << 16  # read-ahead when walking tar headers on object stores (not the images between them)
FILES_PER_ELEMENT = 4096  # a listing is emitted in lists of at most this many files


class ArchiveError(ValueError):
    """A tar that cannot be walked to its end: truncated, or a damaged header."""


@dataclass(frozen=True)
class Listing:
    """A work item a worker lists: a folder, or a tar (a byte range of an archive file)."""

    relative: str  # key prefix, and the input's name in the manifest: "train", "train/<wnid>", "val", ...
    split: str  # "train" or "val"
    wnid: str | None  # the class of every file in it; None: a split root or a flat val folder
    holds_classes: bool = False  # a split root: its class folders (or class tars) are listings of their own
    archive: str | None = None  # the tar file, relative to the data root; None: `relative` is a folder
    start: int = 0  # the tar's byte range in `archive`
    size: int = 0


@dataclass(frozen=True)
class InputFile:
    key: str  # path relative to the data root (escaped when the name is bad): train/<wnid>/<name>, val/<name>
    split: str
    wnid: str | None  # None: no label known
    size: int
    kind: str  # "file", "symlink", "bad_name", or what else it is ("directory", "hard link", "FIFO", ...)
    archive: str | None = None  # the archive file holding its bytes (relative to the data root); None: a file
    offset: int = 0  # where its bytes start in `archive`


@dataclass(frozen=True)
class InputPlan:
    root: str  # URL of the data root: keys and archives are relative to it
    classes: tuple[str, ...]  # wnids in label order
    listings: tuple[Listing, ...]
    val_labels: dict[str, str]  # flat val: file stem -> wnid
    val_is_eval: bool
    facts: dict = field(default_factory=dict)  # for the manifest: where classes, labels and splits came from


# --- names -----------------------------------------------------------------------------------------


def escaped(name: str, slashes: bool = False) -> str:
    """`name` printable: bytes that are not UTF-8 and control characters as \\xNN (and `/` too with
    `slashes`, so that an archive path cannot climb out of the folder it is written under)."""
    raw = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(f"\\x{ord(c):02x}" if not c.isprintable() or (slashes and c == "/") else c for c in raw)


def bad_name(name: str, path: bool = False) -> bool:
    """Not UTF-8, or holding control characters; with `path` (archive member names) also an absolute path
    or one with empty, `.` or `..` parts."""
    if escaped(name) != name:
        return True
    return path and any(part in ("", ".", "..") for part in name.split("/"))


def is_junk(name: str) -> bool:
    return name.startswith(".") or name in JUNK


def class_names(names: list[str], options: ImageNetConfig, where: str) -> tuple[list[str], list[str]]:
    """(class names, skipped junk) of the folders (or class tars) of a split. Names must be wnids unless
    `any_class_names`: a stray folder would otherwise take a label and shift every real one."""
    skipped = [n for n in names if is_junk(n)]
    names = [n for n in names if not is_junk(n)]
    bad = [escaped(n) for n in names if bad_name(n)]
    if bad:
        raise ValueError(f"{where}: class names that are not printable UTF-8: {bad[:5]}; rename them")
    if not options.any_class_names:
        odd = [n for n in names if not WNID.fullmatch(n)]
        if odd:
            raise ValueError(f"{where}: {len(odd)} class folder(s) not named as ImageNet wnids (n + 8 digits): "
                             f"{', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}; remove them, or set "
                             "data.imagenet.any_class_names (--any-class-names) to use other names")
    return names, skipped


# --- tars ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str  # as stored (surrogate escapes for bytes that are not UTF-8), without a leading "./"
    kind: str  # "file", "symlink", or what else it is
    size: int
    offset: int  # where its bytes start in the archive file


_KINDS = ((tarfile.TarInfo.isreg, "file"), (tarfile.TarInfo.issym, "symlink"), (tarfile.TarInfo.islnk, "hard link"),
          (tarfile.TarInfo.isdir, "directory"), (tarfile.TarInfo.ischr, "character device"),
          (tarfile.TarInfo.isblk, "block device"), (tarfile.TarInfo.isfifo, "FIFO"))


def _kind(info: tarfile.TarInfo) -> str:
    if info.issparse():  # its bytes are not one range of the archive
        return "sparse file"
    return next((name for test, name in _KINDS if test(info)), "special file")


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a seekable file, as a file of their own (a tar inside a tar)."""

    def __init__(self, raw, start: int, size: int):
        super().__init__()
        self.raw, self.start, self.size, self.pos = raw, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, (0, self.pos, self.size)[whence] + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.pos))
        self.raw.seek(self.start + self.pos)
        data = self.raw.read(count)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def tar_members(raw, start: int, size: int, where: str) -> Iterator[Member]:
    """The members of the tar at bytes [start, start + size) of `raw`, walking only the headers; raises
    ArchiveError unless the walk ends on the end-of-archive marker inside the range (so a truncated tar or a
    damaged header is never taken for the end)."""
    window = _Window(raw, start, size)
    try:
        with tarfile.open(fileobj=window, mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # the walk keeps nothing: a flat tar holds 50,000 headers
                data_end = info.offset_data + (info.size if info.isreg() else 0)
                if data_end > size:
                    raise ArchiveError(f"{where}: member {escaped(info.name)!r} at byte {info.offset} declares "
                                       f"{info.size} bytes, past the archive's end ({size} bytes): the archive "
                                       "is truncated or its header damaged")
                name = info.name[2:] if info.name.startswith("./") else info.name
                if name in ("", "."):
                    continue  # the archive's own folder
                yield Member(name, _kind(info), info.size, start + info.offset_data)
            end = tar.offset
    except tarfile.TarError as e:
        raise ArchiveError(f"{where}: not a readable tar ({e}): the archive is truncated or damaged") from None
    window.seek(end)
    if window.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise ArchiveError(f"{where}: no end-of-archive marker at byte {end} (a truncated archive, or a damaged "
                           "header there)")


def _open_archive(url: str):
    return storage.open(url, "rb", block_size=HEADER_READ)


def train_archive_classes(url: str) -> tuple[list[Member], list[str]]:
    """(class tars, junk names) of the train archive: its members `<name>.tar` (the rest is listed by a worker)."""
    classes, junk = [], []
    with _open_archive(url) as raw:
        size = raw.seek(0, io.SEEK_END)
        for member in tar_members(raw, 0, size, url):
            if is_junk(member.name.split("/")[0]):
                junk.append(member.name)
            elif _is_class_tar(member):
                classes.append(member)
    return classes, junk


def _is_class_tar(member: Member) -> bool:
    return member.kind == "file" and member.name.endswith(".tar") and "/" not in member.name


# --- labels ---------------------------------------------------------------------------------------------


def _read_capped(f, limit: int, where: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{where}: larger than {limit} bytes; not the file expected")
    return data


def read_val_labels(url: str) -> dict[str, str]:
    """File stem -> wnid from any of: Kaggle's LOC_val_solution.csv, `filename<TAB>wnid` lines, the devkit's
    ground truth (one ILSVRC2012 ID per line, with `meta.mat` beside it), the devkit archive or its folder."""
    fs, path = storage.url_to_fs(url)
    if fs.isdir(path):
        return _devkit_folder_labels(url)
    if path.endswith((".tar.gz", ".tgz", ".tar")):
        return devkit_archive_labels(url)
    with storage.open(url, "rb") as f:
        text = _read_capped(f, LABEL_FILE_MAX_BYTES, url).decode("utf-8", "replace")
    lines = text.splitlines()
    filled = [line for line in lines if line.strip()]
    if filled and all(line.strip().isdigit() for line in filled):
        meta = join(posixpath.dirname(url.rstrip("/")), "meta.mat")
        if not fs.exists(storage.url_to_fs(meta)[1]):
            raise FileNotFoundError(f"{url} lists ILSVRC2012 IDs: their wnids come from the devkit's meta.mat, "
                                    f"expected beside it ({meta})")
        with storage.open(meta, "rb") as f:
            return devkit_labels(text, _read_capped(f, DEVKIT_MAX_BYTES, meta), url)
    return _label_lines(lines, url)


def _label_lines(lines: list[str], url: str) -> dict[str, str]:
    kaggle = bool(lines) and lines[0].startswith("ImageId,")
    labels = {}
    for number, line in enumerate(lines[1:] if kaggle else lines, start=2 if kaggle else 1):
        if not line.strip():
            continue
        name, _, rest = line.partition("," if kaggle else "\t")
        fields = rest.split()
        if not name or not fields:
            raise ValueError(f"{url}:{number}: expected {'ImageId,PredictionString' if kaggle else 'filename<TAB>wnid'}"
                             f", got {line[:80]!r}")
        stem = name.strip() if kaggle else name.strip().rsplit(".", 1)[0]
        if labels.setdefault(stem, fields[0]) != fields[0]:
            raise ValueError(f"{url}:{number}: {stem} labelled both {labels[stem]} and {fields[0]}")
    return labels


def devkit_labels(ground_truth: str, meta: bytes, where: str) -> dict[str, str]:
    """`ILSVRC2012_val_<line:08d>` -> wnid: line n of the ground truth is the ILSVRC2012 ID of val image n;
    `meta.mat`'s `synsets` map IDs to wnids."""
    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        ids = {int(i): str(w) for i, w in zip(np.atleast_1d(synsets["ILSVRC2012_ID"]),
                                               np.atleast_1d(synsets["WNID"]))}
    except Exception as e:  # scipy raises many kinds on a file that is not a MATLAB file, or not this one
        raise ValueError(f"{where}: {META} is not the devkit's synset table ({type(e).__name__}: "
                         f"{str(e)[:100]})") from None
    labels = {}
    for number, line in enumerate(ground_truth.splitlines(), 1):
        if not line.strip():
            continue
        if not line.strip().isdigit() or int(line) not in ids:
            raise ValueError(f"{where}:{number}: {line.strip()[:40]!r} is not an ILSVRC2012 ID of {META}")
        labels[f"ILSVRC2012_val_{number:08d}"] = ids[int(line)]
    return labels


def devkit_archive_labels(url: str) -> dict[str, str]:
    """Val labels from the devkit archive as downloaded (streamed: only its two data files are read)."""
    found = {}
    with storage.open(url, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if info.offset_data + info.size > DEVKIT_MAX_BYTES:
                        raise ValueError(f"{url}: more than {DEVKIT_MAX_BYTES} bytes; not the devkit")
                    name = next((n for n in (GROUND_TRUTH, META) if info.name.endswith("/" + n) or info.name == n),
                                None)
                    if name and info.isreg():
                        found[name] = tar.extractfile(info).read()
                    if len(found) == 2:
                        break
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ArchiveError(f"{url}: not a readable devkit archive ({type(e).__name__}: {e})") from None
    missing = [n for n in (GROUND_TRUTH, META) if n not in found]
    if missing:
        raise FileNotFoundError(f"{url}: no {' or '.join(missing)} in the devkit archive")
    return devkit_labels(found[GROUND_TRUTH].decode("ascii", "replace"), found[META], f"{url}!{GROUND_TRUTH}")


def _devkit_folder_labels(url: str) -> dict[str, str]:
    fs, path = storage.url_to_fs(url)
    for name in (GROUND_TRUTH, META):
        if not fs.isfile(f"{path.rstrip('/')}/{name}"):
            raise FileNotFoundError(f"{url}: no {name} in the devkit folder")
    return read_val_labels(join(url, GROUND_TRUTH))


# --- the plan ---------------------------------------------------------------------------------------------


def _folders(fs, path: str) -> list[str]:
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                  if e["type"] == "directory" and not e.get("islink"))


def _first(fs, paths: list[str]) -> str | None:
    return next((p for p in paths if fs.exists(p)), None)


def _url(fs, path: str, source: str) -> str:
    """A path found on `source`'s file system, spelt as `source` is (a plain path for a plain path)."""
    return fs.unstrip_protocol(path) if "://" in source else path


def plan_input(source: str, options: ImageNetConfig) -> InputPlan:
    """On the driver: the layout, class list, labels and listings (cheap: no image is listed)."""
    fs, base = storage.url_to_fs(source)
    base = base.rstrip("/")
    kaggle = not (fs.isdir(f"{base}/train") or fs.isfile(f"{base}/{TRAIN_ARCHIVE}")) and fs.isdir(
        f"{base}/{KAGGLE_DATA}/train")
    root = f"{base}/{KAGGLE_DATA}" if kaggle else base
    root_url = join(source, KAGGLE_DATA) if kaggle else source
    # Kaggle's label files sit at the dataset root, three levels above the image folders.
    tops = [base] + ([posixpath.dirname(posixpath.dirname(posixpath.dirname(base)))]
                     if base.endswith("/" + KAGGLE_DATA) else [])
    facts = {"skipped": [], "sources": {}}
    train_classes, listings = _train_listings(fs, source, base, root, root_url, options, facts)
    val_is_eval, val_classes, val_labels = False, [], {}
    if fs.isdir(f"{root}/val") or fs.isfile(f"{root}/{VAL_ARCHIVE}"):
        val_is_eval = options.eval_source != "train"
    elif options.eval_source == "val":
        raise FileNotFoundError(f"{source}: data.imagenet.eval_source is 'val' but there is no val/ folder or "
                                f"{VAL_ARCHIVE}")
    if val_is_eval:
        val_classes, val_labels, more = _val_listings(fs, source, base, root, tops, options, facts)
        listings += more
    synset_mapping = _first(fs, [f"{top}/{KAGGLE_SYNSETS}" for top in tops])
    if options.synsets:
        classes, facts["classes_from"] = read_synsets(options.synsets), options.synsets
    elif synset_mapping:
        classes, facts["classes_from"] = read_synsets(_url(fs, synset_mapping, source)), KAGGLE_SYNSETS
    else:
        classes, facts["classes_from"] = train_classes, "the sorted train class names"
    if len(set(classes)) != len(classes):
        raise ValueError(f"{facts['classes_from']}: a wnid is listed twice")
    unknown = sorted(set(train_classes + val_classes) - set(classes))
    if unknown:
        where = "train/" if classes is train_classes else f"the synset list {facts['classes_from']}"
        raise ValueError(f"{source}: {len(unknown)} class(es) not in {where} ({', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}); remove the folders or use a synset list with them")
    return InputPlan(root_url, tuple(classes), tuple(listings), val_labels, val_is_eval, facts)


def _train_listings(fs, source: str, base: str, root: str, root_url: str, options: ImageNetConfig,
                    facts: dict) -> tuple[list[str], list[Listing]]:
    """(sorted class names, listings) of the train split: class folders, or the train archive's class tars."""
    if fs.isdir(f"{root}/train"):
        names, skipped = class_names(_folders(fs, f"{root}/train"), options, f"{source}: train/")
        listings = [Listing("train", "train", None, True)] + [Listing(f"train/{w}", "train", w) for w in names]
        facts["sources"]["train"] = posixpath.relpath(f"{root}/train", base) + "/"
    elif fs.isfile(f"{root}/{TRAIN_ARCHIVE}"):
        members, skipped = train_archive_classes(join(root_url, TRAIN_ARCHIVE))
        names, more = class_names([m.name[:-len(".tar")] for m in members], options, join(source, TRAIN_ARCHIVE))
        skipped += more
        if len(set(names)) != len(names):
            raise ArchiveError(f"{join(source, TRAIN_ARCHIVE)}: a class tar is in it twice")
        by_name = {m.name[:-len(".tar")]: m for m in members}
        listings = [Listing("train", "train", None, True, TRAIN_ARCHIVE, 0, fs.size(f"{root}/{TRAIN_ARCHIVE}"))]
        listings += [Listing(f"train/{w}", "train", w, False, TRAIN_ARCHIVE, by_name[w].offset, by_name[w].size)
                     for w in names]
        facts["sources"]["train"] = TRAIN_ARCHIVE
    else:
        raise FileNotFoundError(f"{source}: no train/ folder, {TRAIN_ARCHIVE} or {KAGGLE_DATA}/train/ (expected "
                                "ImageNet as downloaded, extracted into train/<wnid>/, or Kaggle's layout)")
    facts["skipped"] += [f"train/{n}" for n in skipped]
    return sorted(names), listings


def _val_listings(fs, source: str, base: str, root: str, tops: list[str], options: ImageNetConfig,
                  facts: dict) -> tuple[list[str], dict[str, str], list[Listing]]:
    """(classes named, flat val labels, listings) of the val split: class folders, or one flat folder or the
    val archive with labels from elsewhere."""
    if not fs.isdir(f"{root}/val"):
        facts["sources"]["val"] = VAL_ARCHIVE
        names = []
    else:
        facts["sources"]["val"] = posixpath.relpath(f"{root}/val", base) + "/"
        names, skipped = class_names(_folders(fs, f"{root}/val"), options, f"{source}: val/")
        facts["skipped"] += [f"val/{n}" for n in skipped]
    if names:
        return names, {}, [Listing("val", "val", None, True)] + [Listing(f"val/{w}", "val", w) for w in names]
    labels, facts["val_labels_from"] = _val_labels(fs, source, base, tops, options)
    listing = (Listing("val", "val", None) if fs.isdir(f"{root}/val") else
               Listing("val", "val", None, False, VAL_ARCHIVE, 0, fs.size(f"{root}/{VAL_ARCHIVE}")))
    return sorted(set(labels.values())), labels, [listing]


def _val_labels(fs, source: str, base: str, tops: list[str], options: ImageNetConfig) -> tuple[dict, str]:
    """Labels of a flat val split: `val_labels` if given, else Kaggle's CSV, else the devkit (archive or folder)."""
    if options.val_labels:
        return read_val_labels(options.val_labels), options.val_labels
    found = _first(fs, [f"{top}/{KAGGLE_VAL_LABELS}" for top in tops] + [f"{base}/{DEVKIT}.tar.gz",
                                                                          f"{base}/{DEVKIT}"])
    if found is None:
        raise FileNotFoundError(f"{source}: val/ is one flat folder (or {VAL_ARCHIVE}) but there is no label file: "
                                f"neither {KAGGLE_VAL_LABELS} nor the devkit ({DEVKIT}.tar.gz or its folder); give "
                                "one with data.imagenet.val_labels (--val-labels)")
    return read_val_labels(_url(fs, found, source)), posixpath.relpath(found, base)


# --- listing (on workers) ---------------------------------------------------------------------------------


def _member_file(listing: Listing, member: Member, wnid: str | None) -> InputFile:
    name, kind = member.name, member.kind
    if bad_name(name, path=True):
        name, kind = escaped(name, slashes=True), "bad_name"
    return InputFile(f"{listing.relative}/{name}", listing.split, wnid, member.size, kind, listing.archive,
                     member.offset)


class ListInput(WorkerDoFn):
    """A listing -> its files, in lists (few elements: Beam costs ~250 us each); `inputs` counts per listing."""

    def __init__(self, root: str, val_labels: dict[str, str]):
        super().__init__()
        self.root, self.val_labels = root, val_labels

    def setup(self):
        super().setup()
        self.fs, root = storage.url_to_fs(self.root)
        self.base = root.rstrip("/")

    def process(self, listing: Listing):
        files = list(self._archive(listing) if listing.archive else self._folder(listing))
        # The driver plans listings only: the files (and bytes) to read are known once each is listed.
        progress.report(found_parts=len(files), found_bytes=sum(f.size for f in files))
        yield beam.pvalue.TaggedOutput("inputs", (listing.relative, len(files)))
        for start in range(0, len(files), FILES_PER_ELEMENT):
            yield files[start:start + FILES_PER_ELEMENT]

    def _label(self, listing: Listing, name: str) -> str | None:
        return listing.wnid if listing.wnid is not None else self.val_labels.get(name.rsplit(".", 1)[0])

    def _folder(self, listing: Listing) -> Iterator[InputFile]:
        for entry in sorted(self.fs.ls(f"{self.base}/{listing.relative}", detail=True), key=lambda e: e["name"]):
            name = posixpath.basename(entry["name"].rstrip("/"))
            kind = "symlink" if entry.get("islink") else entry["type"]
            if kind == "directory" and (listing.holds_classes or (listing.wnid is None and is_junk(name))):
                continue  # class folders, and junk beside them or in a flat val folder (skipped on the driver)
            label = self._label(listing, name)
            if bad_name(name):  # keys, records and rejected/ paths are printable UTF-8: report it escaped
                name, kind = escaped(name), "bad_name"
            yield InputFile(f"{listing.relative}/{name}", listing.split, label, int(entry.get("size") or 0), kind)

    def _archive(self, listing: Listing) -> Iterator[InputFile]:
        where = f"{join(self.root, listing.archive)}" + (f" (its member {listing.wnid}.tar)" if listing.wnid else "")
        with _open_archive(join(self.root, listing.archive)) as raw:
            for member in tar_members(raw, listing.start, listing.size, where):
                if listing.holds_classes and (_is_class_tar(member) or is_junk(member.name.split("/")[0])):
                    continue  # listed on their own, or skipped on the driver
                yield _member_file(listing, member, self._label(listing, member.name))


def read_input(fs, base: str, file: InputFile, max_bytes: int) -> bytes:
    """The file's bytes (at most `max_bytes`: a file may grow after it was listed); OSError if unreadable."""
    if file.archive is None:
        with fs.open(f"{base}/{file.key}", "rb") as f:
            return f.read(max_bytes + 1)
    return fs.cat_file(f"{base}/{file.archive}", start=file.offset, end=file.offset + file.size)
