"""ImageNet (ILSVRC-2012 layout) JPEG folders -> disjoint per-group shards, one image per record.

Input, local or any fsspec URL: `train/<wnid>/*` and optionally `val/`, either
as `val/<wnid>/*` or as one flat folder whose labels come from a label file
(Kaggle `LOC_val_solution.csv`, or `filename<TAB>wnid` lines).

Labels: the 0-based line of the wnid in `imagenet.synsets` (the standard
1000-class list), or the index among the sorted train folder names, plus
`label_offset`. A train or val folder (or label-file wnid) missing from the
synset list stops the pipeline before any work with a message naming it: a
wrong list would otherwise mislabel or silently drop a whole class.

Eval split: with `eval_source: auto` (default), the input's `val/` folder is
the shared eval split when there is one and every train image goes to a train
group; without it, a keyed-hash `data.eval_fraction` of train is the eval split.

Streaming: the driver lists only the class folders; workers list each folder
(path, size, type), each path's keyed hash picks its shard, only paths are
grouped by shard, and each task then reads, checks and writes ~`images_per_task`
images of one shard, in key-hash order (so no shard is sorted by class).

Every file is decided by its content, never its name:
* kept byte for byte: RGB and grayscale JPEGs (grayscale ones stay 1-channel
  unless `grayscale: rgb`);
* repaired (re-encoded as RGB or grayscale JPEG at `jpeg_quality`, recorded in
  the record's `repairs` and counted in `manifest.extra["repairs"]`): any other
  format (`png_to_jpeg`, ...), CMYK/YCCK JPEGs (`cmyk_to_rgb`, `ycck_to_rgb`),
  16-bit images (`16bit_to_8bit`), other modes (`rgba_to_rgb`, `p_to_rgb`, ...),
  and `resized` when `resize_shorter` shrinks it (never enlarged);
* quarantined (`rejected/<key>.jsonl`: path, reason, detail, never the bytes):
  `empty`, `not_an_image`, `truncated`, `corrupt` (a reduced-size `draft`
  decode of every image with LOAD_TRUNCATED_IMAGES off), `too_large` (more than
  `max_image_bytes`, from the listing, before reading), `decompression_bomb`
  (more than `max_image_pixels`, from the header), `symlink`,
  `not_a_regular_file` (FIFOs, devices, nested folders), `no_label`
  (a file outside a class folder, a flat val file missing from the label
  file), `bad_file_name` (not valid UTF-8), `unreadable`.
EXIF is never parsed; re-encoded images do not carry it (nor an ICC profile).

Records (`SCHEMA`): TFRecord Examples with the TensorFlow ImageNet converters'
features, or WebDataset samples `<key>.jpg`, `<key>.cls`, `<key>.json`.
"""

from __future__ import annotations

import collections
import io
import posixpath
import warnings
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from codistill import storage
from codistill.config import DataConfig
from codistill.datasets.imagenet import ImageNetConfig
from codistill.dataset import join
from pipelines import progress
from codistill.shards import Block, Feature, Schema
from pipelines.run import DatasetChecks, DatasetPipeline, ValueCheck
from pipelines.sharding import ShardLayout, string_hash
from pipelines.sinks import Rejected, WriteDataset, layout_for, write_pieces
from pipelines.synth_imagenet import read_synsets
from pipelines.worker import WorkerDoFn

SCHEMA: Schema = {
    "key": Feature("bytes", tfrecord="image/key", webdataset="json"),  # relative path, e.g. train/n01440764/x.JPEG
    "image": Feature("object", tfrecord="image/encoded", webdataset="jpg"),  # JPEG bytes
    "label": Feature("int64", tfrecord="image/class/label", webdataset="cls"),
    "synset": Feature("bytes", tfrecord="image/class/synset", webdataset="json"),
    "height": Feature("int64", tfrecord="image/height", webdataset="json"),
    "width": Feature("int64", tfrecord="image/width", webdataset="json"),
    "channels": Feature("int64", tfrecord="image/channels", webdataset="json"),  # 3, or 1 for grayscale
    "colorspace": Feature("bytes", tfrecord="image/colorspace", webdataset="json"),  # "RGB" or "Grayscale"
    "format": Feature("bytes", tfrecord="image/format", webdataset="json"),  # always "JPEG"
    "filename": Feature("bytes", tfrecord="image/filename", webdataset="json"),  # the file's base name
    "repairs": Feature("bytes", tfrecord="image/repairs", webdataset="json"),  # comma-separated, "" if none
}

_KEPT_MODES = {"RGB": "RGB", "L": "Grayscale"}
_JPEG_FORMATS = ("JPEG", "MPO")  # Pillow names a JPEG with an MPF segment (several pictures) MPO


# --- the input: folders, labels -------------------------------------------------------------------


@dataclass(frozen=True)
class Folder:
    """A folder a worker lists: a class folder (`wnid` set), or a split root / flat val folder (`wnid` None)."""

    relative: str
    wnid: str | None
    split: str  # "train" or "val"
    subfolders_are_classes: bool = False  # split roots: their subfolders are listed as folders of their own


@dataclass(frozen=True)
class InputFile:
    key: str  # path relative to the input root
    split: str
    wnid: str | None  # None: no label known
    size: int
    kind: str  # "file", "symlink", "directory", "other" (FIFO, device), "bad_name" (not UTF-8)


@dataclass(frozen=True)
class InputPlan:
    classes: tuple[str, ...]  # wnids in label order
    folders: tuple[Folder, ...]
    val_labels: dict[str, str]  # flat val: file stem -> wnid
    val_is_eval: bool


def read_val_labels(url: str) -> dict[str, str]:
    """File stem -> wnid from Kaggle's LOC_val_solution.csv or `filename<TAB>wnid` lines."""
    with storage.open(url, "r") as f:
        lines = f.read().splitlines()
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


def _is_utf8(name: str) -> bool:
    """Local names that are not valid UTF-8 reach Python with surrogate escapes."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _subfolders(fs, path: str) -> list[str]:
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                   if e["type"] == "directory" and not e.get("islink"))
    bad = [n.encode("utf-8", "surrogateescape") for n in names if not _is_utf8(n)]
    if bad:
        raise ValueError(f"{path}: folder names that are not valid UTF-8: {bad[:5]}; rename them")
    return names


def plan_input(source: str, options: ImageNetConfig) -> InputPlan:
    """On the driver: class folders, labels and where the eval split comes from (cheap: no image is listed)."""
    fs, root = storage.url_to_fs(source)
    root = root.rstrip("/")
    if not fs.isdir(f"{root}/train"):
        raise FileNotFoundError(f"{source}: no train/ folder (expected the ILSVRC layout train/<wnid>/*.JPEG)")
    train_classes = _subfolders(fs, f"{root}/train")
    has_val = fs.isdir(f"{root}/val")
    if options.eval_source == "val" and not has_val:
        raise FileNotFoundError(f"{source}: data.imagenet.eval_source is 'val' but there is no val/ folder")
    val_is_eval = has_val and options.eval_source != "train"
    folders = [Folder("train", None, "train", True)] + [Folder(f"train/{w}", w, "train") for w in train_classes]
    val_labels, val_classes = {}, []
    if val_is_eval:
        val_classes = _subfolders(fs, f"{root}/val")
        if val_classes:
            folders += [Folder("val", None, "val", True)] + [Folder(f"val/{w}", w, "val") for w in val_classes]
        else:
            labels_url = options.val_labels or join(source, "LOC_val_solution.csv")
            if not fs.exists(storage.url_to_fs(labels_url)[1]) and options.val_labels is None:
                raise FileNotFoundError(f"{source}: val/ is one flat folder but there is no label file "
                                        f"{labels_url}; give one with data.imagenet.val_labels")
            val_labels = read_val_labels(labels_url)
            val_classes = sorted(set(val_labels.values()))
            folders.append(Folder("val", None, "val"))
    if options.synsets:
        classes = read_synsets(options.synsets)
        if len(set(classes)) != len(classes):
            raise ValueError(f"{options.synsets}: a wnid is listed twice")
    else:
        classes = train_classes
    unknown = sorted(set(train_classes + val_classes) - set(classes))
    if unknown:
        where = f"the synset list {options.synsets}" if options.synsets else "train/"
        raise ValueError(f"{source}: {len(unknown)} class(es) not in {where} ({', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}); remove the folders or use a synset list with them")
    return InputPlan(tuple(classes), tuple(folders), val_labels, val_is_eval)


class ListFolder(WorkerDoFn):
    """A folder -> its files as one list (few elements: Beam costs ~250 us each); `inputs` counts per folder."""

    def __init__(self, source: str, val_labels: dict[str, str]):
        super().__init__()
        self.source, self.val_labels = source, val_labels

    def setup(self):
        super().setup()
        self.fs, root = storage.url_to_fs(self.source)
        self.root = root.rstrip("/")

    def process(self, folder: Folder):
        files = []
        for entry in sorted(self.fs.ls(f"{self.root}/{folder.relative}", detail=True), key=lambda e: e["name"]):
            name = posixpath.basename(entry["name"].rstrip("/"))
            kind = "symlink" if entry.get("islink") else entry["type"]
            if not _is_utf8(name):  # keys, records and rejected/ paths are UTF-8: report it escaped
                name, kind = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), "bad_name"
            if kind == "directory" and folder.subfolders_are_classes:
                continue
            wnid = folder.wnid if folder.wnid is not None else self.val_labels.get(name.rsplit(".", 1)[0])
            files.append(InputFile(f"{folder.relative}/{name}", folder.split, wnid, int(entry.get("size") or 0),
                                   kind))
        # The driver plans folders only: the files (and bytes) to read are known once each folder is listed.
        progress.report(found_parts=len(files), found_bytes=sum(f.size for f in files))
        yield beam.pvalue.TaggedOutput("inputs", (folder.relative, len(files)))
        if files:
            yield files


def file_destinations(layout: ShardLayout, hashes: np.ndarray, is_val, val_is_eval: bool) -> np.ndarray:
    """Each file's destination by its keyed hash: with the input's val/ folder as the eval split, val/ files
    go to eval shards and train/ files to train groups; otherwise the hash picks eval or train as well."""
    if not val_is_eval:
        return layout.assign(hashes)
    return np.where(is_val, layout.eval_destination(hashes), layout.train_destination(hashes))


class AssignShards(WorkerDoFn):
    """A folder's files -> (destination, [files]) by the keyed hash of each relative path."""

    def __init__(self, layout: ShardLayout, seed: int, val_is_eval: bool):
        super().__init__()
        self.layout, self.seed, self.val_is_eval = layout, seed, val_is_eval

    def process(self, files: list[InputFile]):
        hashes = np.array([string_hash(f.key, self.seed) for f in files], np.uint64)
        dest = file_destinations(self.layout, hashes, files[0].split == "val", self.val_is_eval)
        by_dest = collections.defaultdict(list)
        for d, h, f in zip(dest.tolist(), hashes.tolist(), files):
            by_dest[d].append((h, f))
        yield from by_dest.items()


def plan_tasks(dest: int, batches, per_task: int):
    """A shard's files in key-hash order, cut into tasks (destination, task index, files)."""
    ordered = sorted((item for batch in batches for item in batch), key=lambda item: (item[0], item[1].key))
    for index, start in enumerate(range(0, len(ordered), per_task)):
        yield dest, index, [f for _, f in ordered[start:start + per_task]]


# --- one image: read, check, repair ---------------------------------------------------------------


class Quarantine(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def configure_pillow(options: ImageNetConfig) -> None:
    """Process-wide Pillow settings the checks rely on (called in each worker's setup)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = options.max_image_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # such images are quarantined anyway


def check_entry(file: InputFile, max_bytes: int) -> None:
    """Checks on the listing entry, before any read (a FIFO would block, a symlink may point anywhere)."""
    if file.kind == "bad_name":
        raise Quarantine("bad_file_name", "the name is not valid UTF-8 (shown with \\x escapes)")
    if file.kind == "symlink":
        raise Quarantine("symlink", "symbolic links are not followed")
    if file.kind != "file":
        raise Quarantine("not_a_regular_file", f"a {file.kind}, not a regular file")
    if file.size > max_bytes:
        raise Quarantine("too_large", f"{file.size} bytes, more than data.imagenet.max_image_bytes={max_bytes}")


def read_file(fs, path: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of the file (a file may grow after it was listed)."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise Quarantine("unreadable", f"{type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise Quarantine("too_large", f"more than data.imagenet.max_image_bytes={max_bytes} bytes (grew after listing)")
    return data


def _decode(image: Image.Image, size: tuple[int, int] | None) -> None:
    """Decode (checking every byte of the stream); JPEGs at reduced size via `draft` when `size` is given."""
    if size is not None and image.format in _JPEG_FORMATS:
        image.draft(image.mode, size)
    try:
        image.load()
    except OSError as e:
        raise Quarantine("truncated" if "truncated" in str(e) else "corrupt", str(e)) from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise Quarantine("corrupt", f"{type(e).__name__}: {e}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values.astype(np.uint32) >> 8
    return Image.fromarray(values.clip(0, 255).astype(np.uint8), "L")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _target_size(width: int, height: int, shorter: int | None) -> tuple[int, int] | None:
    if shorter is None or min(width, height) <= shorter:
        return None
    scale = shorter / min(width, height)
    return max(shorter, round(width * scale)), max(shorter, round(height * scale))


def check_image(data: bytes, options: ImageNetConfig) -> tuple[bytes, int, int, str, list[str]]:
    """(JPEG bytes to store, width, height, mode "RGB"/"L", repairs) or Quarantine."""
    if not data:
        raise Quarantine("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Quarantine("not_an_image", f"not a format Pillow reads (starts with {data[:8]!r})") from None
    except Image.DecompressionBombError as e:
        raise Quarantine("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Quarantine("corrupt", f"{type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > options.max_image_pixels:
        raise Quarantine("decompression_bomb", f"{width}x{height} pixels, more than "
                         f"data.imagenet.max_image_pixels={options.max_image_pixels}")
    target = _target_size(width, height, options.resize_shorter)
    mode = image.mode
    keep = (image.format in _JPEG_FORMATS and mode in _KEPT_MODES and target is None
            and not (mode == "L" and options.grayscale == "rgb"))
    if keep:  # validation only: a 1/8-scale decode still reads every byte of the stream
        _decode(image, (max(1, width // 8), max(1, height // 8)))
        return data, width, height, mode, []
    _decode(image, target)
    repairs = [] if image.format in _JPEG_FORMATS else [f"{image.format.lower()}_to_jpeg"]
    if mode == "CMYK":
        repairs.append("ycck_to_rgb" if image.info.get("adobe_transform") == 2 else "cmyk_to_rgb")
        image = image.convert("RGB")
    elif mode.startswith("I"):
        image = _to_8bit(image)
        repairs.append("16bit_to_8bit")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in _KEPT_MODES:
        image = _flatten_alpha(image)
        repairs.append(f"{mode.lower()}_to_rgb")
    if image.mode == "L" and options.grayscale == "rgb":
        image = image.convert("RGB")
        repairs.append("grayscale_to_rgb")
    if target is not None:
        image = image.resize(target, Image.Resampling.LANCZOS)
        repairs.append("resized")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=options.jpeg_quality)
    return out.getvalue(), image.width, image.height, image.mode, repairs


@dataclass(frozen=True)
class ImageRow:
    key: str
    image: bytes
    label: int
    synset: str
    width: int
    height: int
    mode: str
    repairs: tuple[str, ...]
    source_bytes: int


class ImageChecker:
    """Turns an input file into a record or a quarantine entry (shared by the pipeline and the benchmark)."""

    def __init__(self, source: str, options: ImageNetConfig, classes: tuple[str, ...]):
        self.options = options
        self.labels = {wnid: i + options.label_offset for i, wnid in enumerate(classes)}
        self.fs, root = storage.url_to_fs(source)
        self.root = root.rstrip("/")

    def __call__(self, file: InputFile) -> ImageRow | Rejected:
        try:
            check_entry(file, self.options.max_image_bytes)
            if file.wnid is None:
                raise Quarantine("no_label", "not inside a class folder" if file.split == "train"
                                 else "not in the val label file")
            data = read_file(self.fs, f"{self.root}/{file.key}", self.options.max_image_bytes)
            image, width, height, mode, repairs = check_image(data, self.options)
        except Quarantine as q:
            return Rejected(file.key, 0, q.reason, q.detail, "")
        return ImageRow(file.key, image, self.labels[file.wnid], file.wnid, width, height, mode, tuple(repairs),
                        len(data))


def rows_to_block(rows: list[ImageRow]) -> Block:
    images = np.empty(len(rows), object)
    images[:] = [r.image for r in rows]
    return {
        "key": np.array([r.key.encode() for r in rows], np.bytes_), "image": images,
        "label": np.array([r.label for r in rows], np.int64),
        "synset": np.array([r.synset.encode() for r in rows], np.bytes_),
        "height": np.array([r.height for r in rows], np.int64), "width": np.array([r.width for r in rows], np.int64),
        "channels": np.array([3 if r.mode == "RGB" else 1 for r in rows], np.int64),
        "colorspace": np.array([_KEPT_MODES[r.mode].encode() for r in rows], np.bytes_),
        "format": np.array([b"JPEG"] * len(rows), np.bytes_),
        "filename": np.array([posixpath.basename(r.key).encode() for r in rows], np.bytes_),
        "repairs": np.array([",".join(r.repairs).encode() for r in rows], np.bytes_)}


def row_stats(rows: list[ImageRow], part: str) -> dict:
    """Counts summed into the manifest's `extra`."""
    repairs = collections.Counter(fix for r in rows for fix in r.repairs)
    return {"class_counts": {part: dict(collections.Counter(r.synset for r in rows))},
            "repairs": dict(repairs), "grayscale": sum(r.mode == "L" for r in rows),
            "image_bytes": {"source": sum(r.source_bytes for r in rows), "stored": sum(len(r.image) for r in rows)}}


def part_name(layout: ShardLayout, dest: int) -> str:
    split, group, _ = layout.describe(dest)
    return split if group is None else f"{split}/{group}"


class ProcessImages(WorkerDoFn):
    """A task (one shard's next images) -> one piece; quarantined files and counts aside."""

    def __init__(self, source: str, data: DataConfig, layout: ShardLayout, classes: tuple[str, ...]):
        super().__init__()
        self.source, self.data, self.layout, self.classes = source, data, layout, classes

    def setup(self):
        super().setup()
        configure_pillow(self.data.imagenet)
        self.check = ImageChecker(self.source, self.data.imagenet, self.classes)

    def process(self, task):
        dest, index, files = task
        rows = []
        for file in files:
            outcome = self.check(file)
            if isinstance(outcome, Rejected):
                yield beam.pvalue.TaggedOutput("rejected", [outcome])
            else:
                rows.append(outcome)
        progress.report(parts=len(files), bytes=sum(f.size for f in files), rows=len(files))
        if rows:
            yield beam.pvalue.TaggedOutput("stats", row_stats(rows, part_name(self.layout, dest)))
            yield from write_pieces(self.data.output, SCHEMA, (dest, index), {dest: [rows_to_block(rows)]})


class ImageNetToShards(beam.PTransform):
    """An ILSVRC-layout folder -> `<output>` with shards, indexes, `classes.txt`, `rejected/`, `manifest.json`."""

    def __init__(self, source: str, data: DataConfig, extra: dict | None = None):
        super().__init__()
        self.source, self.data, self.extra = source, data, extra or {}

    def expand(self, pbegin):
        data, options = self.data, self.data.imagenet
        plan = plan_input(self.source, options)
        layout = layout_for(data)
        listed = (pbegin
                  | "Folders" >> beam.Create(plan.folders)
                  | "SpreadFolders" >> beam.Reshuffle()
                  | "ListFolders" >> beam.ParDo(ListFolder(self.source, plan.val_labels)).with_outputs(
                      "inputs", main="files"))
        tasks = (listed.files
                 | "AssignShards" >> beam.ParDo(AssignShards(layout, data.seed, plan.val_is_eval))
                 | "GroupByShard" >> beam.GroupByKey()
                 | "PlanTasks" >> beam.FlatMapTuple(
                     lambda dest, batches: plan_tasks(dest, batches, options.images_per_task))
                 | "SpreadTasks" >> beam.Reshuffle())
        processed = tasks | "ProcessImages" >> beam.ParDo(
            ProcessImages(self.source, data, layout, plan.classes)).with_outputs("rejected", "stats", main="pieces")
        extra = {**self.extra, "classes": list(plan.classes), "label_offset": options.label_offset,
                 "num_outputs": len(plan.classes) + options.label_offset,
                 "eval_source": "val" if plan.val_is_eval else "train", "repairs": {}, "grayscale": 0}
        parameters = {"input": self.source, **data.recorded()}
        return {"pieces": processed.pieces, "rejected": processed.rejected, "inputs": listed.inputs,
                "stats": processed.stats} | WriteDataset(
            output=data.output, layout=layout, schema=SCHEMA, fmt=data.format, block_rows=options.images_per_task,
            parameters=parameters, extra=extra, files={"classes.txt": "".join(c + "\n" for c in plan.classes)},
            indexes=True)


def _generate(raw: str, synth) -> tuple[str, dict]:
    from pipelines.synth_imagenet import generate_imagenet

    sidecar = generate_imagenet(raw, synth.classes, synth.per_class, val_per_class=synth.val_per_class,
                                seed=synth.seed, min_size=synth.min_size, max_size=synth.max_size,
                                faults=synth.faults, synsets=synth.synsets, val_layout=synth.val_layout)
    return raw, sidecar


def dataset_checks(manifest) -> DatasetChecks:
    """Labels within the model's outputs; keys are relative paths, assigned by their keyed hash (val/ files to
    the eval split when it is the input's val/ folder)."""
    outputs, seed = manifest.extra["num_outputs"], manifest.settings.seed
    val_is_eval = manifest.extra.get("eval_source") == "val"

    def key_hashes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = np.strings.startswith(keys, b"train/") | np.strings.startswith(keys, b"val/")
        return np.array([string_hash(k, seed) for k in keys.tolist()], np.uint64), valid

    def destinations(keys: np.ndarray, hashes: np.ndarray, layout: ShardLayout) -> np.ndarray:
        return file_destinations(layout, hashes, np.strings.startswith(keys, b"val/"), val_is_eval)

    return DatasetChecks(values=(
        ValueCheck("label", lambda v: (v >= 0) & (v < outputs), f"labels in [0, {outputs})"),
    ), key_hashes=key_hashes, destinations=destinations)


def describe_synth(sidecar: dict, out: str) -> str:
    expected = sidecar["expected"]
    repairs = sum(len(sidecar["fault_paths"][k]) for k in ("png", "cmyk", "png16"))
    return (f"wrote {sidecar['files']['train']} train and {sidecar['files']['val']} val files of {sidecar['classes']} "
            f"classes to {out} (+{len(sidecar['empty_classes'])} empty class folder); the pipeline must quarantine "
            f"{sum(expected['quarantined'].values())} and repair {repairs}")


def describe(manifest) -> list[str]:
    extra = manifest.extra
    repairs = ", ".join(f"{k}: {v}" for k, v in sorted(extra.get("repairs", {}).items())) or "none"
    return [f"{len(extra.get('classes', []))} classes; repaired: {repairs}; "
            f"1-channel (grayscale): {extra.get('grayscale', 0)}"]


PIPELINE = DatasetPipeline(transform=lambda source, data, extra: ImageNetToShards(source, data, extra),
                           generate=_generate, describe_synth=describe_synth, describe=describe,
                           checks=dataset_checks)
