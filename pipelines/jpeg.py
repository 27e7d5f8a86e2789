"""JPEG byte streams: where one ends, its EXIF segment, and a strict check of its scans.

Pillow hides libjpeg's warnings: a scan that ends early ("premature end of
data segment", the rest of the picture filled grey), a header that promises
more pixels than the scan holds, or bytes left over after the last block all
decode without an error. `check_scans` decodes with simplejpeg (libjpeg-turbo)
in strict mode, where each such warning is an error: the scans must hold
exactly the blocks the header declares (`decode_strict`).
"""

from __future__ import annotations

import re

import numpy as np
import simplejpeg

# In entropy-coded data a 0xFF byte is stuffed (FF 00) or starts a restart marker (FF D0-D7); anything else
# (after optional FF fill bytes) is the next marker.
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RSTn: markers without a length
_SOS, _EOI = 0xDA, 0xD9
_COLORSPACES = {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}  # Pillow's mode of a JPEG -> libjpeg's output space


class ScanError(ValueError):
    """libjpeg found the scan data damaged (`truncated`: the stream stops before its end)."""

    def __init__(self, message: str, truncated: bool):
        super().__init__(message)
        self.truncated = truncated


def _segments(data: bytes):
    """(marker, start, end) of each marker segment from SOI on; entropy-coded data after an SOS is part of
    that SOS's span. Stops after EOI, or where the stream stops making sense."""
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _EOI:
            yield marker, pos, pos + 2
            return
        if marker in _STANDALONE:
            yield marker, pos, pos + 2
            pos += 2
            continue
        if pos + 4 > len(data):
            return
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _SOS:
            found = _MARKER_AFTER_SCAN.search(data, end)
            if found is None:
                return
            end = found.start()
        yield marker, pos, end
        pos = end


def stream_end(data: bytes) -> int | None:
    """Offset just past the EOI marker that ends the JPEG stream starting at data[0] (None: no EOI).

    Bytes after it (junk, an appended file, the further pictures of an MPO file) are no part of the picture."""
    if not data.startswith(b"\xff\xd8"):
        return None
    return next((end for marker, _, end in _segments(data) if marker == _EOI), None)


EXIF = (0xE1, b"Exif\0\0")  # APP1 Exif: orientation, camera data, a thumbnail
MPF = (0xE2, b"MPF\0")  # APP2 multi-picture index: where an MPO file's further pictures start


def without_segments(data: bytes, *kinds: tuple[int, bytes]) -> bytes:
    """The stream without its APPn segments of the given (marker, payload prefix) kinds: lossless (the
    compressed pixels are untouched)."""
    drop = [(start, end) for marker, start, end in _segments(data)
            if any(marker == m and data[start + 4:start + 4 + len(prefix)] == prefix for m, prefix in kinds)]
    if not drop:
        return data
    kept, pos = [], 0
    for start, end in drop:
        kept.append(data[pos:start])
        pos = end
    return b"".join(kept) + data[pos:]


def decode_strict(data: bytes, mode: str, size: tuple[int, int] = (1, 1)) -> np.ndarray | None:
    """The pixels at the smallest DCT scale (1, 1/2, 1/4, 1/8) that covers `size` (libjpeg still reads every
    coded block at 1/8), decoded with libjpeg's warnings as errors; uint8 (H, W) or (H, W, C).

    Raises ScanError. None for modes libjpeg-turbo has no output space for (left to Pillow's decode)."""
    colorspace = _COLORSPACES.get(mode)
    if colorspace is None:
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace, min_width=size[0], min_height=size[1])
    except ValueError as e:
        message = str(e)
        raise ScanError(message, "premature end of jpeg file" in message.lower()) from None
    return pixels[:, :, 0] if colorspace == "GRAY" else pixels
