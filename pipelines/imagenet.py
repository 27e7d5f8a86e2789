"""ImageNet (ILSVRC-2012) -> disjoint per-group shards, one image per record, each picture once.

Input (`pipelines.imagenet_input`): extracted ILSVRC folders, the archives as
downloaded (`ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar`, the devkit:
read in place, never extracted), or Kaggle's layout; local or any fsspec URL.

Labels: the 0-based line of the wnid in `imagenet.synsets` (the standard
1000-class list), else in Kaggle's `LOC_synset_mapping.txt`, else the index
among the sorted train class names (`extra["classes_from"]` says which), plus
`label_offset`. Class folders must be named as wnids (`n` + 8 digits) unless
`any_class_names`; dot-folders and `__MACOSX`, `lost+found` are skipped
(`extra["skipped"]`). A class missing from the list stops the pipeline before
any work with a message naming it.

Eval split: with `eval_source: auto` (default), the input's val split is the
shared eval split when there is one and every train image goes to a train
group; without it, a keyed-hash `data.eval_fraction` of train is the eval split.

Streaming: the driver lists only the class folders (or the train archive's
class tars); workers list each folder or tar (path, size, type; a tar by its
headers), each key's keyed hash picks its shard, only listings are grouped by
shard, and each task then reads, checks and writes ~`images_per_task` images
of one shard, in key-hash order (so no shard is sorted by class). Then exact
duplicates are found over the whole data set (`pipelines.imagenet_dedup`) and
dropped from the tasks' pieces before the sink writes the shards.

Every file is decided by its content, never its name:
* kept byte for byte: RGB and grayscale JPEGs (grayscale ones stay 1-channel
  unless `grayscale: rgb`), less any bytes after the JPEG's end-of-image
  marker (`trailing_bytes_removed`; an MPO file keeps its first picture) and
  less an EXIF segment that sets an orientation (`exif_orientation_removed`):
  the stored pixel grid is the picture, as the reference ImageNet loaders
  read it, and no reader can turn it;
* repaired (re-encoded as RGB or grayscale JPEG at `jpeg_quality`, recorded in
  the record's `repairs` and counted in `manifest.extra["repairs"]`): any other
  format (`png_to_jpeg`, ...), CMYK/YCCK JPEGs (`cmyk_to_rgb`, `ycck_to_rgb`),
  16-bit images (`16bit_to_8bit`), other modes (`rgba_to_rgb`, `p_to_rgb`, ...),
  and `resized` when `resize_shorter` shrinks it (never enlarged);
* quarantined (`rejected/<key>.jsonl`: path, reason, detail, never the bytes):
  `empty`, `not_an_image`, `truncated`, `corrupt` (libjpeg's corruption
  warnings are errors: a scan that ends early or has bytes left over, as
  under a header bigger than the scan; other formats: a full Pillow decode
  with LOAD_TRUNCATED_IMAGES off), `too_large` (more than `max_image_bytes`,
  from the listing, before reading), `decompression_bomb` (more than
  `max_image_pixels`, from the header), `symlink`, `not_a_regular_file`
  (FIFOs, devices, nested folders, hard links in a tar), `no_label` (a file
  outside a class folder, a flat val file missing from the labels),
  `bad_file_name` (not UTF-8, control characters, or an archive path that
  climbs out), `unreadable`, and the duplicates' `duplicate`,
  `duplicate_of_eval`, `conflicting_labels`.

Records (`SCHEMA`): TFRecord Examples with the TensorFlow ImageNet converters'
features, or WebDataset samples `<key>.jpg`, `<key>.cls`, `<key>.json`.
"""

from __future__ import annotations

import collections
import hashlib
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
from codistill.shards import Block, Feature, Schema
from pipelines import jpeg, progress
from pipelines.imagenet_dedup import DUPLICATE_REASONS, FindDuplicates, copy_priority
from pipelines.imagenet_input import InputFile, ListInput, plan_input, read_input
from pipelines.run import DatasetChecks, DatasetPipeline, ValueCheck
from pipelines.sharding import ShardLayout, string_hash
from pipelines.sinks import Piece, Rejected, WriteDataset, layout_for, read_piece, write_pieces
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


# --- shards and tasks -------------------------------------------------------------------------------


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
        raise Quarantine("bad_file_name", "the name is not printable UTF-8 or not a plain path (shown with "
                         "\\x escapes)")
    if file.kind == "symlink":
        raise Quarantine("symlink", "symbolic links are not followed")
    if file.kind != "file":
        raise Quarantine("not_a_regular_file", f"a {file.kind}, not a regular file")
    if file.size > max_bytes:
        raise Quarantine("too_large", f"{file.size} bytes, more than data.imagenet.max_image_bytes={max_bytes}")


def read_file(fs, base: str, file: InputFile, max_bytes: int) -> bytes:
    """The file's bytes: a file may have grown after it was listed, an archive may have been cut short."""
    try:
        data = read_input(fs, base, file, max_bytes)
    except OSError as e:
        raise Quarantine("unreadable", f"{type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise Quarantine("too_large", f"more than data.imagenet.max_image_bytes={max_bytes} bytes (grew after listing)")
    if file.archive is not None and len(data) != file.size:
        raise Quarantine("truncated", f"{file.archive} holds {len(data)} of the {file.size} bytes its header declares")
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


def _orientation(image: Image.Image) -> int | None:
    if "exif" not in image.info:
        return None
    try:
        return image.getexif().get(0x0112)
    except Exception:  # Pillow raises many kinds on a damaged EXIF block: it may hold any orientation
        return -1


def _check_jpeg(data: bytes, image: Image.Image, size: tuple[int, int]) -> tuple[bytes, list[str], np.ndarray | None]:
    """libjpeg's strict decode (at the smallest scale covering `size`), then the stream alone: bytes after its
    end-of-image marker cut (an MPO file's further pictures with the index that points to them), an EXIF
    orientation removed. Returns (bytes to keep, repairs, pixels or None)."""
    try:
        pixels = jpeg.decode_strict(data, image.mode, size)
    except jpeg.ScanError as e:
        raise Quarantine("truncated" if e.truncated else "corrupt", f"libjpeg: {e}") from None
    end = jpeg.stream_end(data)
    if end is None:
        raise Quarantine("corrupt", "no end-of-image marker after the scans")
    repairs = []
    if end < len(data):
        data = jpeg.without_segments(data[:end], jpeg.MPF)
        repairs.append("trailing_bytes_removed")
    if _orientation(image) not in (None, 1):
        data = jpeg.without_segments(data, jpeg.EXIF)
        repairs.append("exif_orientation_removed")
    return data, repairs, pixels


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
    if image.format not in _JPEG_FORMATS:
        _decode(image, target)
        repairs = [f"{image.format.lower()}_to_jpeg"]
    else:  # libjpeg decodes it once, strictly: at 1/8 to check it, or at the size a repair of RGB or gray needs
        from_pixels = not keep and mode in _KEPT_MODES
        data, repairs, pixels = _check_jpeg(data, image, (target or (width, height)) if from_pixels else (1, 1))
        if keep:
            return data, width, height, mode, repairs
        repairs = []  # re-encoded: what followed the picture, and EXIF, are not carried anyway
        if from_pixels:
            image = Image.fromarray(pixels, mode)
        else:
            _decode(image, target)  # CMYK/YCCK: Pillow knows Adobe's inverted CMYK
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
                raise Quarantine("no_label", "not inside a class folder (or class tar)" if file.split == "train"
                                 else "not in the val labels")
            data = read_file(self.fs, self.root, file, self.options.max_image_bytes)
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


def image_facts(rows: list[ImageRow], seed: int, val_is_eval: bool) -> Block:
    """What deduplication and the manifest's counts need of each row written (`pipelines.imagenet_dedup`)."""
    keys = [r.key for r in rows]
    return {"key": np.array([k.encode() for k in keys], np.bytes_),
            "digest": np.array([hashlib.sha256(r.image).digest() for r in rows], "S32"),
            "prio": copy_priority(np.array([string_hash(k, seed) for k in keys], np.uint64)),
            "val": np.array([val_is_eval and k.startswith("val/") for k in keys], bool),
            "label": np.array([r.label for r in rows], np.int64),
            "synset": np.array([r.synset.encode() for r in rows], np.bytes_),
            "gray": np.array([r.mode == "L" for r in rows], bool),
            "repairs": np.array([",".join(r.repairs).encode() for r in rows], np.bytes_),
            "source_bytes": np.array([r.source_bytes for r in rows], np.int64),
            "stored_bytes": np.array([len(r.image) for r in rows], np.int64)}


def facts_stats(facts: Block, part: str) -> dict:
    """Counts summed into the manifest's `extra`."""
    repairs = collections.Counter(fix for r in facts["repairs"].tolist() if r for fix in r.decode().split(","))
    return {"class_counts": {part: dict(collections.Counter(s.decode() for s in facts["synset"].tolist()))},
            "repairs": dict(repairs), "grayscale": int(facts["gray"].sum()),
            "image_bytes": {"source": int(facts["source_bytes"].sum()), "stored": int(facts["stored_bytes"].sum())}}


def part_name(layout: ShardLayout, dest: int) -> str:
    split, group, _ = layout.describe(dest)
    return split if group is None else f"{split}/{group}"


@dataclass(frozen=True)
class WrittenTask:
    piece: Piece  # the task's rows, in one piece file of its shard
    facts: Block  # image_facts of the same rows, in the same order


class ProcessImages(WorkerDoFn):
    """A task (one shard's next images) -> ((destination, task index), WrittenTask); quarantined files aside."""

    def __init__(self, root: str, data: DataConfig, classes: tuple[str, ...], val_is_eval: bool):
        super().__init__()
        self.root, self.data, self.classes, self.val_is_eval = root, data, classes, val_is_eval

    def setup(self):
        super().setup()
        configure_pillow(self.data.imagenet)
        self.check = ImageChecker(self.root, self.data.imagenet, self.classes)

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
            (_, piece), = write_pieces(self.data.output, SCHEMA, (dest, index), {dest: [rows_to_block(rows)]})
            yield (dest, index), WrittenTask(piece, image_facts(rows, self.data.seed, self.val_is_eval))


class DropDuplicates(WorkerDoFn):
    """A task's piece and the rows deduplication drops from it -> (destination, piece without them); the
    counts of what stays aside. A piece that loses rows is written anew beside the old (so a retry finds the
    old one; the sink removes every piece at the end)."""

    def __init__(self, output: str, layout: ShardLayout):
        super().__init__()
        self.output, self.layout = output, layout

    def process(self, element):
        (dest, index), joined = element
        (task,) = joined["task"]
        dropped = sorted({row for rows in joined["drops"] for row in rows})
        keep = np.ones(task.piece.rows, bool)
        keep[dropped] = False
        piece = task.piece
        if dropped and keep.any():
            block = {name: column[keep] for name, column in read_piece(piece, SCHEMA).items()}
            (_, piece), = write_pieces(self.output, SCHEMA, (dest, index, "dedup"), {dest: [block]})
        if keep.any():
            yield dest, piece
            facts = {name: column[keep] for name, column in task.facts.items()}
            yield beam.pvalue.TaggedOutput("stats", facts_stats(facts, part_name(self.layout, dest)))


class ImageNetToShards(beam.PTransform):
    """ImageNet as downloaded, extracted or from Kaggle -> `<output>` with shards, indexes, `classes.txt`,
    `rejected/`, `manifest.json`."""

    def __init__(self, source: str, data: DataConfig, extra: dict | None = None):
        super().__init__()
        self.source, self.data, self.extra = source, data, extra or {}

    def expand(self, pbegin):
        data, options = self.data, self.data.imagenet
        plan = plan_input(self.source, options)
        layout = layout_for(data)
        listed = (pbegin
                  | "Listings" >> beam.Create(plan.listings)
                  | "SpreadListings" >> beam.Reshuffle()
                  | "List" >> beam.ParDo(ListInput(plan.root, plan.val_labels)).with_outputs("inputs", main="files"))
        tasks = (listed.files
                 | "AssignShards" >> beam.ParDo(AssignShards(layout, data.seed, plan.val_is_eval))
                 | "GroupByShard" >> beam.GroupByKey()
                 | "PlanTasks" >> beam.FlatMapTuple(
                     lambda dest, batches: plan_tasks(dest, batches, options.images_per_task))
                 | "SpreadTasks" >> beam.Reshuffle())
        written = tasks | "ProcessImages" >> beam.ParDo(
            ProcessImages(plan.root, data, plan.classes, plan.val_is_eval)).with_outputs("rejected", main="tasks")
        duplicates = (written.tasks
                      | "Facts" >> beam.MapTuple(lambda task, result: (task, result.facts))
                      | "FindDuplicates" >> FindDuplicates(options.dedup_buckets))
        kept = ({"task": written.tasks, "drops": duplicates.drops}
                | "JoinDrops" >> beam.CoGroupByKey()
                | "DropDuplicates" >> beam.ParDo(DropDuplicates(data.output, layout)).with_outputs(
                    "stats", main="pieces"))
        extra = {**self.extra, **plan.facts, "classes": list(plan.classes), "label_offset": options.label_offset,
                 "num_outputs": len(plan.classes) + options.label_offset,
                 "eval_source": "val" if plan.val_is_eval else "train", "repairs": {}, "grayscale": 0,
                 "duplicates": dict.fromkeys(DUPLICATE_REASONS, 0)}
        parameters = {"input": self.source, **data.recorded()}
        rejected = (written.rejected, duplicates.rejected) | "AllRejected" >> beam.Flatten()
        stats = (kept.stats, duplicates.stats) | "AllStats" >> beam.Flatten()
        return {"pieces": kept.pieces, "rejected": rejected, "inputs": listed.inputs, "stats": stats} | WriteDataset(
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
    the eval split when it is the input's val split); no image's bytes stored twice."""
    outputs, seed = manifest.extra["num_outputs"], manifest.settings.seed
    val_is_eval = manifest.extra.get("eval_source") == "val"

    def key_hashes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = np.strings.startswith(keys, b"train/") | np.strings.startswith(keys, b"val/")
        return np.array([string_hash(k, seed) for k in keys.tolist()], np.uint64), valid

    def destinations(keys: np.ndarray, hashes: np.ndarray, layout: ShardLayout) -> np.ndarray:
        return file_destinations(layout, hashes, np.strings.startswith(keys, b"val/"), val_is_eval)

    return DatasetChecks(values=(
        ValueCheck("label", lambda v: (v >= 0) & (v < outputs), f"labels in [0, {outputs})"),
    ), key_hashes=key_hashes, destinations=destinations, distinct=("image",))


def describe_synth(sidecar: dict, out: str) -> str:
    expected = sidecar["expected"]
    repairs = sum(len(sidecar["fault_paths"][k]) for k in ("png", "cmyk", "png16"))
    return (f"wrote {sidecar['files']['train']} train and {sidecar['files']['val']} val files of {sidecar['classes']} "
            f"classes to {out} (+{len(sidecar['empty_classes'])} empty class folder); the pipeline must quarantine "
            f"{sum(expected['quarantined'].values())} and repair {repairs}")


def describe(manifest) -> list[str]:
    extra = manifest.extra
    repairs = ", ".join(f"{k}: {v}" for k, v in sorted(extra.get("repairs", {}).items())) or "none"
    duplicates = ", ".join(f"{k}: {v}" for k, v in sorted(extra.get("duplicates", {}).items()) if v) or "none"
    return [f"{len(extra.get('classes', []))} classes ({extra.get('classes_from', 'sorted train folders')}); "
            f"repaired: {repairs}; 1-channel (grayscale): {extra.get('grayscale', 0)}; duplicates dropped: "
            f"{duplicates}"]


PIPELINE = DatasetPipeline(transform=lambda source, data, extra: ImageNetToShards(source, data, extra),
                           generate=_generate, describe_synth=describe_synth, describe=describe,
                           checks=dataset_checks)
