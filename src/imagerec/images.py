"""Untrusted bytes in, RGB uint8 array out: the one decode path for training and serving.

Formats are judged by their magic bytes, never by a file name or a declared content type. The
pixel count is read from the header and checked before any pixel is decoded, so a small file
that claims a huge canvas (a decompression bomb) costs nothing. A caller that will shrink the
image to a known size says so (`fit`), and a large JPEG is then decoded at a fraction of its size
in the first place (libjpeg's scaled IDCT), for a half to a quarter of the CPU on a photo.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from imagerec.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

DEFAULT_MAX_PIXELS = int(os.environ.get("IMAGEREC_MAX_PIXELS", 40_000_000))
# OpenCV reads its own ceiling once, at import; ours is checked earlier, from the header.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(max(DEFAULT_MAX_PIXELS, 1 << 20)))

import cv2  # noqa: E402  (must follow the environment variable above)

MEDIA_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_JPEG_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV 4.11+
_JPEG_FLAGS = cv2.IMREAD_COLOR if _JPEG_RGB is None else _JPEG_RGB
# libjpeg decodes at 1/2, 1/4 or 1/8 scale when OpenCV's flags carry one of these bits.
_JPEG_SCALE_FLAGS = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
# JPEG start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def sniff_format(data: bytes) -> str:
    """Name the image format from its magic bytes, or raise UnsupportedMediaType."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if not data:
        raise InvalidImage("the image is empty (0 bytes)", code="empty_image")
    raise UnsupportedMediaType(
        "not a supported image: expected JPEG, PNG, WebP or BMP content "
        "(the type is judged by the file's bytes, not its name)"
    )


def image_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the header alone, without decoding pixels."""
    width, height, _ = _header(data, fmt)
    return width, height


def _header(data: bytes, fmt: str) -> tuple[int, int, int]:
    """(width, height, offset where the pixel data starts; 0 outside JPEG) from the header."""
    try:
        if fmt == "jpeg":
            return _jpeg_layout(data)
        if fmt == "png":
            return (*struct.unpack(">II", data[16:24]), 0)
        if fmt == "bmp":
            (header_size,) = struct.unpack("<I", data[14:18])
            if header_size == 12:  # OS/2 BITMAPCOREHEADER
                return (*struct.unpack("<HH", data[18:22]), 0)
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height), 0
        return (*_webp_size(data), 0)
    except struct.error:
        raise InvalidImage(f"the {fmt.upper()} header is truncated") from None


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L":
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise InvalidImage("unknown WebP chunk layout")


def _jpeg_layout(data: bytes) -> tuple[int, int, int]:
    """(width, height, offset of the first scan) from a walk over the JPEG's marker segments."""
    i, n, size = 2, len(data), None
    while i < n:
        if data[i] != 0xFF:
            raise InvalidImage("corrupt JPEG: bad marker structure")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue  # markers without a length
        (length,) = struct.unpack(">H", data[i : i + 2])
        if marker in _JPEG_SOF and size is None:
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                break
            return (*size, i + length)
        i += length
    if size is None:
        raise InvalidImage("corrupt JPEG: no frame header found")
    raise InvalidImage("truncated JPEG: no image data after the header", code="truncated_image")


def _check_complete(data: bytes, fmt: str, scan: int) -> None:
    """Reject truncated files that a decoder would otherwise half-decode without complaint.

    `scan` is where a JPEG's entropy-coded data starts (from `_header`)."""
    # Entropy-coded data never holds FF D9 (FF is stuffed), so the first one after the scan
    # starts is the end of the image; bytes after it (phone trailers) are allowed.
    if fmt == "jpeg" and data.find(b"\xff\xd9", scan) < 0:
        raise InvalidImage(
            "truncated JPEG: the end-of-image marker is missing", code="truncated_image"
        )
    if fmt == "png" and _PNG_IEND not in data[-64:]:
        raise InvalidImage("truncated PNG: the IEND chunk is missing", code="truncated_image")
    if fmt == "webp":
        (riff_size,) = struct.unpack("<I", data[4:8])
        if len(data) < riff_size + 8:
            raise InvalidImage(
                "truncated WebP: shorter than its RIFF header says", code="truncated_image"
            )


def jpeg_scale(width: int, height: int, fit: tuple[int, int] | None) -> int:
    """The decode scale (1, 2, 4 or 8) for a width x height JPEG that will be resized to `fit`
    (height, width): the smallest fraction that still leaves twice `fit` each way, however the
    image turns out to be oriented, so that the resize after it still shrinks at least twofold
    (Pillow's "reducing gap" of 2 for its JPEG draft mode)."""
    if not fit:
        return 1
    need, short = 2 * max(fit), min(width, height)
    for scale in (8, 4, 2):
        if short // scale >= need:  # libjpeg rounds the scaled size up; floor is the safe side
            return scale
    return 1


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode untrusted image bytes to an (H, W, 3) RGB uint8 array.

    Grayscale becomes three equal channels, 16-bit is scaled to 8-bit, alpha is composited
    onto white (as a browser shows it), and JPEG EXIF orientation is applied.

    `fit` (height, width) is what the caller will resize the image to. A JPEG at least twice
    that size either way round is then decoded at 1/2, 1/4 or 1/8 of its width and height
    (`jpeg_scale`): libjpeg computes the smaller image from each 8x8 block's frequencies (at 1/8,
    the block's mean), so the resize that follows sees nearly the pixels that shrinking the
    whole image would give (mostly within a level or two of 255; benchmarks/results/decode.md)
    for half the CPU or less on a photo. The result is then smaller than the image and at least
    twice `fit` each way. The pixel limit applies to the image's full size.
    """
    data = bytes(data)
    fmt = sniff_format(data)
    width, height, scan = _header(data, fmt)
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}",
            code="too_many_pixels",
        )
    _check_complete(data, fmt, scan)
    buffer = np.frombuffer(data, dtype=np.uint8)
    # JPEG never carries alpha: decoded straight to RGB where OpenCV can (4.11+), EXIF
    # orientation applied. The others keep alpha and 16-bit depth so that both can be handled
    # below.
    flags = _JPEG_FLAGS if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    if fmt == "jpeg" and (scale := jpeg_scale(width, height, fit)) > 1:
        flags |= _JPEG_SCALE_FLAGS[scale]  # with the colour bit: a colour decode at that scale
    try:
        image = cv2.imdecode(buffer, flags)
    except cv2.error as exc:
        raise InvalidImage(f"the {fmt.upper()} image could not be decoded: {exc.err}") from None
    if image is None:
        raise InvalidImage(f"the {fmt.upper()} image is corrupt and could not be decoded")
    if fmt == "jpeg" and _JPEG_RGB is not None:
        return image
    return _to_rgb8(image)


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    elif image.dtype != np.uint8:
        raise InvalidImage(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        gray, alpha = image[:, :, 0], image[:, :, 1]
        image = np.dstack([gray, gray, gray, alpha])
        channels = 4
    if channels == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        white = 255.0 * (1.0 - alpha)
        bgr = (image[:, :, :3].astype(np.float32) * alpha + white).round().astype(np.uint8)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB array to (height, width): INTER_AREA when shrinking, bilinear otherwise."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] > height or image.shape[1] > width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def load_image(
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read and decode an image file, optionally resized to (height, width) (and then decoded
    no larger than it needs to be: see decode_image's `fit`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImage(f"cannot read {path}: {exc.strerror}") from None
    image = decode_image(data, max_pixels, fit=size)
    return resize_image(image, size) if size else image


_decode_buffers_held = False


def hold_decode_buffers(mmap_mb: int = 32, trim_mb: int = 64) -> bool:
    """Have the C library's malloc keep freed decode buffers for the next image (glibc).

    Decoding a photo whole takes megabytes of buffers (4.6 MB for a 1024x768 JPEG), freed once
    it is resized. By default glibc hands a heap's free top back to the kernel as soon as it
    exceeds twice the largest block seen, so each image faults its buffers' pages in again:
    about 1,100 page faults a 1024x768 JPEG, 40% of its decode CPU on the machine measured (7.1
    ms against 4.3; benchmarks/results/bulk.md as of commit b14bd2f, when every photo was decoded
    whole). A JPEG decoded scaled (decode_image's `fit`) needs far less, but images decoded
    whole remain: photos for a model of 224x224, other formats. Blocks up to `mmap_mb` (32 MB
    is glibc's ceiling: about a 10-megapixel image) now come from the heap, and up to `trim_mb`
    free at its top stays there, a bound on what a thread's heap keeps beyond what it uses.
    Process-wide and for good; for processes that decode many images (bulk runs). True if it
    took effect; False where the C library has no mallopt (not glibc), which changes nothing
    but the speed."""
    global _decode_buffers_held
    if _decode_buffers_held:
        return True
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # Setting either turns glibc's adjusting of both off, so both are set, the mmap one first.
    held = bool(mallopt(m_mmap_threshold, mmap_mb << 20)) and bool(
        mallopt(m_trim_threshold, trim_mb << 20)
    )
    _decode_buffers_held = held
    return held


def encode_png(image: np.ndarray) -> bytes:
    """Encode an RGB uint8 array as PNG bytes (fixtures, tests and the web page's samples)."""
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InvalidImage("could not encode PNG")
    return buffer.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 array as JPEG bytes."""
    ok, buffer = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise InvalidImage("could not encode JPEG")
    return buffer.tobytes()
