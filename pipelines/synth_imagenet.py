"""Generated ImageNet-format data: ILSVRC folders of procedural images, with bad inputs in known numbers.

    train/<wnid>/<wnid>_<i>.JPEG          `per_class` files per class (bad inputs included)
    val/ILSVRC2012_val_<i:08d>.JPEG       flat, labels in LOC_val_solution.csv (Kaggle layout), or
    val/<wnid>/ILSVRC2012_val_<i:08d>.JPEG  with val_layout="folders"
    synth.json                            every count a test needs (the sidecar)

Each class has its own statistics: an object shape, an object hue, a background
hue and a stripe texture (orientation, frequency). An image draws one or two
jittered instances of its class's object over its class's background, plus
distractor objects of other classes, and pixel noise; classes share shapes
and overlap in hue, so a small CNN learns them well but not perfectly. Sides
are drawn from [min_size, max_size] independently (varied aspect ratios).

Bad inputs, `faults` of each, replace ordinary train images at keyed-random
places: a zero-byte file, a text file, a truncated JPEG, a JPEG corrupted
mid-stream (a stray SOF marker inside the entropy-coded data), a PNG, a CMYK
JPEG, a 16-bit grayscale PNG and a grayscale JPEG, all named `.JPEG`; plus one
empty class folder (an extra wnid). Deterministic by seed.
"""

from __future__ import annotations

import colorsys
import io
import json

import numpy as np
from PIL import Image, ImageDraw

from codistill import storage
from codistill.dataset import join

SHAPES = ("ellipse", "square", "triangle", "cross", "ring", "diamond")
FAULTS = ("zero_byte", "text", "truncated", "corrupt", "png", "cmyk", "png16", "grayscale")
# What the pipeline must make of each fault: quarantine reason, or the repairs of the kept image.
EXPECTED = {"zero_byte": ("empty", ()), "text": ("not_an_image", ()), "truncated": ("truncated", ()),
            "corrupt": ("corrupt", ()), "png": (None, ("png_to_jpeg",)), "cmyk": (None, ("cmyk_to_rgb",)),
            "png16": (None, ("png_to_jpeg", "16bit_to_8bit")), "grayscale": (None, ())}
GRAYSCALE_FAULTS = ("png16", "grayscale")  # stored as 1-channel images when grayscale is kept


def read_synsets(url: str) -> list[str]:
    """The wnid of each line: its first word (a plain list, or Kaggle's `LOC_synset_mapping.txt` with names)."""
    with storage.open(url, "r") as f:
        return [line.split()[0] for line in f if line.strip()]


def choose_wnids(count: int, rng: np.random.Generator, synsets: list[str] | None) -> list[str]:
    """`count` sorted wnids: spread over the synset list, or plausible made-up `n0xxxxxxx` ids."""
    if synsets is not None:
        if count > len(synsets):
            raise ValueError(f"asked for {count} classes, the synset list has {len(synsets)}")
        return sorted(synsets[i] for i in np.unique(np.linspace(0, len(synsets) - 1, count).round().astype(int)))
    digits = rng.choice(9_000_000, size=count, replace=False) + 1_000_000
    return sorted(f"n0{d}" for d in digits)


def _hue_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255


class ClassStyle:
    """The statistics of one class."""

    def __init__(self, rng: np.random.Generator, index: int, shape_order: np.ndarray):
        self.shape = SHAPES[shape_order[index % len(SHAPES)]]
        self.hue = rng.random()
        self.background_hue = rng.random()
        self.angle = rng.uniform(0, np.pi)
        self.frequency = rng.uniform(2, 9)  # stripes per image side


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "ellipse":
        draw.ellipse([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill)
        draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def render(styles: list[ClassStyle], label: int, rng: np.random.Generator, min_size: int,
           max_size: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One RGB image of class `label`, and the box of its first object."""
    style = styles[label]
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    side = max(width, height)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * style.frequency * (x * np.cos(style.angle) + y * np.sin(style.angle)) / side + phase)
    background = _hue_rgb(style.background_hue + rng.normal(0, 0.05), rng.uniform(0.2, 0.6), rng.uniform(0.4, 0.9))
    pixels = background * (0.8 + 0.2 * stripes[..., None])
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 3)):  # distractors: smaller objects of other classes
        other = styles[int(rng.integers(len(styles)))]
        r = rng.uniform(0.08, 0.16) * min(width, height)
        colour = tuple(int(c) for c in _hue_rgb(other.hue, 0.8, 0.9))
        _draw_object(draw, other.shape, rng.uniform(0, width), rng.uniform(0, height), r, colour)
    box = None
    for _ in range(rng.integers(1, 3)):
        r = rng.uniform(0.15, 0.32) * min(width, height)
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        colour = _hue_rgb(style.hue + rng.normal(0, 0.07), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
        _draw_object(draw, style.shape, cx, cy, r, tuple(int(c) for c in colour))
        box = box or (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(4, 18), (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), box


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def fault_bytes(kind: str, image: Image.Image, quality: int) -> bytes:
    """The file that stands in for an ordinary image."""
    if kind == "zero_byte":
        return b""
    if kind == "text":
        return b"<html><body>404 Not Found: this is not an image</body></html>\n"
    if kind == "png":
        return _encode(image, "PNG")
    if kind == "cmyk":
        return _encode(image.convert("CMYK"), quality=quality)
    if kind == "grayscale":
        return _encode(image.convert("L"), quality=quality)
    if kind == "png16":
        gray = np.asarray(image.convert("L"), np.uint16) * 257  # full 16-bit range
        return _encode(Image.fromarray(gray), "PNG")
    data = _encode(image, quality=quality)
    scan = data.index(b"\xff\xda")  # start of scan: the entropy-coded data follows
    if kind == "truncated":
        return data[:scan + (len(data) - scan) * 6 // 10]
    if kind == "corrupt":  # a stray start-of-frame marker inside the scan: libjpeg stops with an error
        middle = scan + (len(data) - scan) // 2
        return data[:middle] + b"\xff\xc0\x00\x11" + data[middle:]
    raise ValueError(f"unknown fault {kind!r}")


def generate_imagenet(out: str, classes: int, per_class: int, *, val_per_class: int = 10, seed: int = 0,
                      min_size: int = 64, max_size: int = 160, faults: int = 1, synsets: str | None = None,
                      val_layout: str = "flat") -> dict:
    """Write the data set under `out` (local path or fsspec URL); returns (and writes) the sidecar."""
    if val_layout not in ("flat", "folders"):
        raise ValueError(f"val_layout must be 'flat' or 'folders', got {val_layout!r}")
    rng = np.random.default_rng([seed, 0])
    wnids = choose_wnids(classes + (1 if faults else 0), rng, read_synsets(synsets) if synsets else None)
    empty = [wnids.pop(int(rng.integers(len(wnids))))] if faults else []
    shape_order = rng.permutation(len(SHAPES))
    styles = [ClassStyle(np.random.default_rng([seed, 1, c]), c, shape_order) for c in range(classes)]
    slots = rng.choice(classes * per_class, size=len(FAULTS) * faults, replace=False)
    fault_at = {int(slot): FAULTS[i % len(FAULTS)] for i, slot in enumerate(slots)}

    fs, root = storage.url_to_fs(out)
    root = root.rstrip("/")
    for wnid in empty:
        storage.make_dirs(fs, f"{root}/train/{wnid}")
    fault_paths = {kind: [] for kind in FAULTS}
    for c, wnid in enumerate(wnids):
        storage.make_dirs(fs, f"{root}/train/{wnid}")
        for i in range(per_class):
            image_rng = np.random.default_rng([seed, 2, c, i])
            image, _ = render(styles, c, image_rng, min_size, max_size)
            quality = int(image_rng.integers(80, 96))
            relative = f"train/{wnid}/{wnid}_{i}.JPEG"
            kind = fault_at.get(c * per_class + i)
            if kind:
                fault_paths[kind].append(relative)
            fs.pipe_file(f"{root}/{relative}", fault_bytes(kind, image, quality) if kind
                         else _encode(image, quality=quality))

    val_rows = []
    if val_per_class:
        val_labels = np.random.default_rng([seed, 3]).permutation(np.repeat(np.arange(classes), val_per_class))
        for n, c in enumerate(val_labels.tolist(), start=1):
            image_rng = np.random.default_rng([seed, 4, n])
            image, box = render(styles, c, image_rng, min_size, max_size)
            name = f"ILSVRC2012_val_{n:08d}"
            folder = "val" if val_layout == "flat" else f"val/{wnids[c]}"
            storage.make_dirs(fs, f"{root}/{folder}")
            fs.pipe_file(f"{root}/{folder}/{name}.JPEG", _encode(image, quality=int(image_rng.integers(80, 96))))
            val_rows.append(f"{name},{wnids[c]} {' '.join(str(v) for v in box)} ")
        if val_layout == "flat":  # Kaggle's file is not in file-name order either
            order = np.random.default_rng([seed, 5]).permutation(len(val_rows))
            fs.pipe_file(f"{root}/LOC_val_solution.csv",
                         ("ImageId,PredictionString\n" + "".join(val_rows[i] + "\n" for i in order)).encode())

    quarantined, repairs = {}, {}
    for kind in FAULTS:
        reason, fixes = EXPECTED[kind]
        if reason:
            quarantined[reason] = quarantined.get(reason, 0) + faults
        for fix in fixes:
            repairs[fix] = repairs.get(fix, 0) + faults
    sidecar = {
        "generator": "codistill.synth_imagenet", "seed": seed, "classes": classes, "per_class": per_class,
        "val_per_class": val_per_class, "val_layout": val_layout, "min_size": min_size, "max_size": max_size,
        "faults": faults, "synsets": synsets, "wnids": wnids, "empty_classes": empty,
        "all_wnids": sorted(wnids + empty),
        "class_styles": {w: {"shape": s.shape, "hue": round(s.hue, 4)} for w, s in zip(wnids, styles)},
        "files": {"train": classes * per_class, "val": classes * val_per_class},
        "fault_paths": fault_paths,
        "expected": {"quarantined": quarantined, "repairs": repairs,
                     "grayscale": sum(len(fault_paths[k]) for k in GRAYSCALE_FAULTS),
                     "written": {"train": classes * per_class - sum(quarantined.values()),
                                 "val": classes * val_per_class}},
    }
    with storage.open(join(out, "synth.json"), "w") as f:
        json.dump(sidecar, f, indent=1, sort_keys=True)
    return sidecar
