"""JPEG bytes -> square uint8 HWC crops, with Pillow: random-resized crop + flip (train), center crop (eval).

Both paths first choose a box in the original image (from the JPEG header,
before any pixel is decoded), then ask libjpeg for the smallest DCT-scaled
decode (`Image.draft`: 1/2, 1/4, 1/8) that still covers the box at the output
size, and resize the box to `size` x `size` (bilinear, antialiased). At 64 px a
typical ImageNet photo then decodes at 1/8 scale: most of the decode is skipped.

* train: the standard random-resized crop (Szegedy et al. 2015, torchvision's
  algorithm): area fraction in `scale` (0.08-1), log-uniform aspect ratio in
  `ratio` (3/4-4/3), 10 tries, else a center crop of the whole image clamped to
  `ratio`; then a horizontal flip with probability 1/2. The randomness of one
  sample is drawn from (seed, epoch, key) alone, so it does not depend on
  ranks, workers or batch order.
* eval: resize the shorter side to size * 256/224, center crop size x size,
  done as one resize of the central square box of side shorter * 224/256.

Normalisation (mean/std) happens on the batch in torch (`normalize`).
"""

from __future__ import annotations

import functools
import io
import math
import random

import numpy as np
import torch
from PIL import Image

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE = 256 / 224
MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB statistics, in [0, 1] units
STD = (0.229, 0.224, 0.225)

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels of the original image


def random_resized_box(width: int, height: int, rng: random.Random, scale=SCALE, ratio=RATIO) -> Box:
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int) -> Box:
    side = min(width, height) / EVAL_RESIZE
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def crop(data: bytes, size: int, train: bool, rng: random.Random | None = None) -> np.ndarray:
    """One JPEG -> uint8 (size, size, 3). Raises OSError/SyntaxError/ValueError/DecompressionBombError on bad bytes."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        box = random_resized_box(width, height, rng) if train else center_box(width, height)
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        # The smallest reduced decode whose box is still at least `size` on both sides.
        image.draft("RGB", (math.ceil(width * size / box_w), math.ceil(height * size / box_h)))
        sx, sy = image.size[0] / width, image.size[1] / height
        if image.mode != "RGB":
            image = image.convert("RGB")  # grayscale JPEGs
        out = image.resize((size, size), Image.Resampling.BILINEAR,
                           box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
        pixels = np.asarray(out)
    if train and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels


def sample_rng(seed: int, epoch: int, key: bytes) -> random.Random:
    return random.Random(b"%d:%d:" % (seed, epoch) + key)  # seeded by SHA-512 of the bytes: stable across processes


def normalize(images: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised (N, 3, H, W) in `dtype`; NHWC in memory when `channels_last`."""
    x = images.permute(0, 3, 1, 2).to(dtype)  # a permuted NHWC tensor is already channels_last in memory
    mean, std = _mean_std(dtype, x.device)
    x.sub_(mean).div_(std)  # in place: `x` is the fresh copy made by the conversion from uint8
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@functools.cache
def _mean_std(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD in uint8 units, (1, 3, 1, 1) in `dtype` on `device`: made once, not at every batch."""
    return (torch.tensor(MEAN, dtype=dtype, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, dtype=dtype, device=device).view(1, 3, 1, 1) * 255)
