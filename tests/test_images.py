"""images.py: the one decode path. Magic bytes, header sizes, limits, truncation, conversions."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

import imagerec.images as images
from imagerec.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from imagerec.images import (
    decode_image,
    encode_jpeg,
    encode_png,
    image_size,
    load_image,
    resize_image,
    sniff_format,
)


def encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, image, params or [])
    assert ok
    return buffer.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def handmade_png(width: int, height: int, color_type: int, rows: bytes, depth: int = 8) -> bytes:
    """A PNG built byte by byte, for layouts cv2.imencode cannot write or headers that lie."""
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def photo() -> np.ndarray:
    """A 23x37 BGR image with structure in every channel."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)


# Formats are judged by their bytes


@pytest.mark.parametrize(
    "content",
    [b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", b"GIF89a\x01\x00\x01\x00\x80\x00\x00", b"hello"],
    ids=["pdf", "gif", "text"],
)
def test_non_image_formats_are_unsupported_media(content):
    with pytest.raises(UnsupportedMediaType) as caught:
        decode_image(content)
    assert caught.value.status == 415
    assert caught.value.code == "unsupported_media_type"


def test_empty_input_is_a_bad_request():
    with pytest.raises(InvalidImage) as caught:
        decode_image(b"")
    assert caught.value.status == 400 and caught.value.code == "empty_image"


def test_a_jpeg_is_recognised_whatever_it_is_called(tmp_path, photo):
    path = tmp_path / "picture.png"
    path.write_bytes(encode(".jpg", photo))
    assert sniff_format(path.read_bytes()) == "jpeg"
    assert load_image(path).shape == (23, 37, 3)


# Sizes come from the header alone


@pytest.mark.parametrize(
    ("ext", "params", "fmt", "chunk"),
    [
        (".jpg", [], "jpeg", None),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "jpeg", None),
        (".png", [], "png", None),
        (".bmp", [], "bmp", None),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], "webp", b"VP8 "),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], "webp", b"VP8L"),
    ],
    ids=["jpeg", "jpeg-progressive", "png", "bmp", "webp-lossy", "webp-lossless"],
)
def test_header_size_for_each_format(ext, params, fmt, chunk, photo):
    content = encode(ext, photo, params)
    assert sniff_format(content) == fmt
    if chunk is not None:
        assert content[12:16] == chunk
    assert image_size(content, fmt) == (37, 23)
    assert decode_image(content).shape == (23, 37, 3)


def test_header_size_for_an_extended_webp():
    # VP8X layout: "RIFF" size "WEBP" "VP8X" chunk size, flags, 24-bit width-1 and height-1.
    header = b"RIFF" + struct.pack("<I", 30) + b"WEBP" + b"VP8X" + struct.pack("<I", 10)
    header += b"\x10\x00\x00\x00" + (4999).to_bytes(3, "little") + (299).to_bytes(3, "little")
    assert image_size(header, "webp") == (5000, 300)


def test_header_size_for_a_top_down_bmp(photo):
    content = bytearray(encode(".bmp", photo))
    content[22:26] = struct.pack("<i", -23)  # negative height means rows stored top-down
    assert image_size(bytes(content), "bmp") == (37, 23)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp"])
def test_a_header_cut_short_is_invalid(ext, photo):
    with pytest.raises(InvalidImage):
        decode_image(encode(ext, photo)[:12])


# The pixel limit is checked before any pixel is decoded


def test_a_tiny_file_claiming_a_huge_canvas_is_refused_before_decoding(monkeypatch):
    bomb = handmade_png(100_000, 100_000, 0, b"\x00" * 101)
    assert len(bomb) < 200

    def must_not_decode(*args):
        raise AssertionError("cv2.imdecode ran on an oversized image")

    monkeypatch.setattr(images.cv2, "imdecode", must_not_decode)
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(bomb)
    assert caught.value.status == 413 and caught.value.code == "too_many_pixels"
    assert "100000x100000" in caught.value.message


def test_the_pixel_limit_is_configurable(photo):
    content = encode(".png", photo)
    assert decode_image(content, max_pixels=23 * 37).shape == (23, 37, 3)
    with pytest.raises(PayloadTooLarge):
        decode_image(content, max_pixels=23 * 37 - 1)


def test_a_header_with_zero_size_is_invalid():
    with pytest.raises(InvalidImage, match="empty size"):
        decode_image(handmade_png(0, 10, 0, b""))


# Truncated files are refused rather than half decoded


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_truncated_images_are_refused(ext, photo):
    content = encode(ext, photo)
    with pytest.raises(InvalidImage) as caught:
        decode_image(content[: len(content) * 3 // 4])
    assert caught.value.code == "truncated_image"


def test_garbage_after_a_valid_jpeg_header_is_invalid(photo):
    content = encode(".jpg", photo)
    with pytest.raises(InvalidImage):
        decode_image(content[:200] + b"\x00" * 300 + b"\xff\xd9")


# Every image comes out RGB uint8


def test_colours_come_out_in_rgb_order():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert (decode_image(encode_png(red)) == [255, 0, 0]).all()
    decoded = decode_image(encode_jpeg(red, quality=95)).astype(int)
    assert (decoded[..., 0] > 240).all() and (decoded[..., 1:] < 15).all()


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    for content in (encode(".png", gray), encode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 100])):
        decoded = decode_image(content)
        assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8
        assert (decoded[..., 0] == decoded[..., 1]).all() and (
            decoded[..., 1] == decoded[..., 2]
        ).all()
    np.testing.assert_array_equal(decode_image(encode(".png", gray))[..., 0], gray)


def test_alpha_is_composited_onto_white():
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[0, 0] = [0, 0, 255, 255]  # opaque red
    bgra[0, 1] = [0, 0, 0, 0]  # fully transparent
    bgra[1, 0] = [0, 0, 0, 128]  # half-transparent black
    bgra[1, 1] = [255, 0, 0, 255]  # opaque blue
    decoded = decode_image(encode(".png", bgra))
    assert decoded.dtype == np.uint8
    assert decoded[0, 0].tolist() == [255, 0, 0]
    assert decoded[0, 1].tolist() == [255, 255, 255]
    assert decoded[1, 0].tolist() == [127, 127, 127]
    assert decoded[1, 1].tolist() == [0, 0, 255]


def test_gray_with_alpha_is_composited_onto_white():
    # One row of two pixels (filter byte 0): gray 0 opaque, gray 0 transparent.
    content = handmade_png(2, 1, 4, b"\x00" + bytes([0, 255, 0, 0]))
    assert decode_image(content).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_16_bit_images_are_scaled_to_8_bit():
    bgr16 = np.zeros((4, 4, 3), np.uint16)
    bgr16[..., 0] = 65535  # blue at full scale
    bgr16[..., 1] = 257 * 100  # green at 100 of 255
    decoded = decode_image(encode(".png", bgr16))
    assert decoded.dtype == np.uint8
    assert decoded[0, 0].tolist() == [0, 100, 255]

    gray16 = np.full((4, 4), 257 * 50, np.uint16)
    assert (decode_image(encode(".png", gray16)) == 50).all()


def test_16_bit_with_alpha_is_scaled_and_composited():
    bgra16 = np.zeros((2, 2, 4), np.uint16)
    bgra16[..., 2] = 65535  # red
    bgra16[0, :, 3] = 65535  # top row opaque, bottom row transparent
    decoded = decode_image(encode(".png", bgra16))
    assert decoded[0].tolist() == [[255, 0, 0]] * 2
    assert decoded[1].tolist() == [[255, 255, 255]] * 2


# Resizing


def test_shrinking_averages_pixels_instead_of_sampling_them():
    board = (np.indices((96, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.dstack([board] * 3)
    small = resize_image(image, (32, 32))
    assert small.shape == (32, 32, 3)
    np.testing.assert_array_equal(small, cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA))
    # Point sampling a one-pixel checkerboard would alias to solid black or white.
    assert small.min() > 90 and small.max() < 165


def test_enlarging_is_bilinear_and_size_is_height_then_width(photo):
    image = photo[:, :, ::-1].copy()
    large = resize_image(image, (46, 50))
    assert large.shape == (46, 50, 3)
    np.testing.assert_array_equal(
        large, cv2.resize(image, (50, 46), interpolation=cv2.INTER_LINEAR)
    )


def test_resizing_to_the_same_size_changes_nothing(photo):
    assert resize_image(photo, (23, 37)) is photo


def test_load_image_resizes_and_reports_unreadable_files(tmp_path, photo):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(".png", photo))
    assert load_image(path, (10, 12)).shape == (10, 12, 3)
    with pytest.raises(InvalidImage, match="cannot read"):
        load_image(tmp_path / "missing.png")


def test_bytes_after_the_jpeg_end_marker_are_accepted(photo):
    """Some cameras append data after the image; the image itself is complete."""
    data = cv2.imencode(".jpg", photo)[1].tobytes()
    with_trailer = data + b"\x00\x01trailer written by a phone camera" * 4
    assert np.array_equal(decode_image(with_trailer), decode_image(data))
    cut = data[: len(data) - 40] + b"\x00\x01trailer"
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(cut)


def exif_oriented_jpeg(
    orientation: int, height: int = 20, width: int = 40
) -> tuple[bytes, np.ndarray]:
    """A 20x40 JPEG (or height x width), left half red, with an EXIF orientation tag; and its
    RGB pixels as stored (JPEG blurs the colours at the edge between the halves)."""
    bgr = np.zeros((height, width, 3), np.uint8)
    bgr[:, : width // 2] = (0, 0, 255)
    data = encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    entry = struct.pack(">HHII", 274, 3, 1, orientation << 16)  # Orientation, SHORT, 1 value
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + entry + struct.pack(">I", 0)
    app1 = b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\x00\x00" + tiff
    return data[:2] + app1 + data[2:], bgr[:, :, ::-1]


@pytest.mark.parametrize("rgb_flag", [True, False], ids=["IMREAD_COLOR_RGB", "older OpenCV"])
def test_jpeg_exif_orientation_and_rgb_order_with_and_without_the_rgb_flag(monkeypatch, rgb_flag):
    if rgb_flag and images._JPEG_RGB is None:
        pytest.skip("this OpenCV has no IMREAD_COLOR_RGB")
    if not rgb_flag:  # the path for OpenCV before 4.11
        monkeypatch.setattr(images, "_JPEG_RGB", None)
        monkeypatch.setattr(images, "_JPEG_FLAGS", cv2.IMREAD_COLOR)
    data, stored = exif_oriented_jpeg(6)  # 6: rotate 90 degrees clockwise to display
    image = decode_image(data)
    assert image.shape == (40, 20, 3)
    # the red half (stored on the left) ends up on top, and red is channel 0
    assert image[:18, :, 0].min() > 200 and image[:18, :, 2].max() < 60
    assert image[22:].max() < 60
    upright = decode_image(exif_oriented_jpeg(1)[0])  # 1: stored as displayed
    assert upright.shape == (20, 40, 3)
    assert np.abs(upright[:, :16].astype(int) - stored[:, :16]).max() <= 8
    assert np.abs(upright[:, 24:].astype(int) - stored[:, 24:]).max() <= 8


FAULTS_PER_DECODE = """
import resource, sys
import imagerec.images as images

def faults_per_decode(path):
    # (224, 224): decoded whole, as for a model of that input size (no scaled decode of a
    # 1024x768 JPEG leaves twice that)
    images.load_image(path, (224, 224))  # the first call's own allocations aside
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        images.load_image(path, (224, 224))
    return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 10

as_it_comes = faults_per_decode(sys.argv[1])
held = images.hold_decode_buffers()
print(as_it_comes, faults_per_decode(sys.argv[1]) if held else "not held")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults counted on Linux")
def test_held_decode_buffers_spare_a_photo_its_page_faults(tmp_path):
    """A fresh process, as a bulk run is: decoding the same photo again costs its buffers' page
    faults each time with malloc as it comes, and next to none once the buffers are held."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (768, 1024, 3), np.uint8)
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90]))
    answer = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_DECODE, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if answer[1:] == ["not", "held"]:
        pytest.skip("this C library has no mallopt (not glibc)")
    as_it_comes, held = float(answer[0]), float(answer[1])
    # The decoded image alone is 2.4 MB, about 580 pages of 4 kB.
    assert as_it_comes > 500, answer
    assert held < as_it_comes / 10, answer


# A large JPEG that will be shrunk is decoded at a fraction of its size


def textured_photo(height: int, width: int) -> np.ndarray:
    """BGR pixels with edges and fine detail: blocks of colour over noise."""
    rng = np.random.default_rng(1)
    blocks = cv2.resize(
        rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (width, height), cv2.INTER_NEAREST
    )
    noise = rng.integers(-40, 41, (height, width, 3))
    return np.clip(blocks.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "size, fit, scale",
    [
        ((768, 1024), (32, 32), 8),  # a photo for a CIFAR-sized model: 128x96 is 2x 32 and more
        ((768, 1024), (224, 224), 1),  # 384 is not twice 224: decoded whole
        ((3024, 4032), (224, 224), 4),  # a phone photo for a 224 model: 756 >= 448
        ((120, 1000), (32, 32), 1),  # a strip: its short side decides
        ((500, 400), (64, 32), 2),  # a fit that is not square: its long side decides
        ((64, 64), (32, 32), 1),  # 64 is not more than twice 32 at scale 2
    ],
)
def test_jpeg_scale_leaves_twice_the_fit_either_way_round(size, fit, scale):
    height, width = size
    assert images.jpeg_scale(width, height, fit) == scale
    assert images.jpeg_scale(width, height, None) == 1


@pytest.mark.parametrize("rgb_flag", [True, False], ids=["IMREAD_COLOR_RGB", "older OpenCV"])
def test_a_large_jpeg_is_decoded_scaled_and_resizes_to_nearly_the_same_pixels(
    monkeypatch, rgb_flag
):
    if rgb_flag and images._JPEG_RGB is None:
        pytest.skip("this OpenCV has no IMREAD_COLOR_RGB")
    if not rgb_flag:
        monkeypatch.setattr(images, "_JPEG_RGB", None)
        monkeypatch.setattr(images, "_JPEG_FLAGS", cv2.IMREAD_COLOR)
    data = encode(".jpg", textured_photo(768, 1024), [cv2.IMWRITE_JPEG_QUALITY, 90])
    whole = decode_image(data)
    scaled = decode_image(data, fit=(32, 32))
    assert whole.shape == (768, 1024, 3)
    assert scaled.shape == (96, 128, 3)  # an eighth each way
    shrunk_whole = resize_image(whole, (32, 32))
    shrunk_scaled = resize_image(scaled, (32, 32))
    difference = np.abs(shrunk_scaled.astype(int) - shrunk_whole.astype(int))
    # The same colours in the same places (not swapped channels, not shifted), within a few
    # levels where blocks meet, within one level of 255 on average.
    assert difference.mean() < 1.0, difference.mean()
    assert difference.max() <= 12, difference.max()


def test_scaled_decoding_keeps_the_exif_orientation():
    data, _ = exif_oriented_jpeg(6, 160, 320)  # stored 160 high, displayed 320 high
    image = decode_image(data, fit=(16, 16))  # 160 // 4 = 40 >= 2 x 16: a quarter each way
    assert image.shape == (80, 40, 3)
    # the red half (stored on the left) ends up on top, and red is channel 0
    assert image[:36, :, 0].min() > 200 and image[:36, :, 2].max() < 60
    assert image[44:].max() < 60


def test_formats_other_than_jpeg_are_decoded_whole_whatever_the_fit():
    pixels = textured_photo(300, 400)
    for ext in (".png", ".webp", ".bmp"):
        assert decode_image(encode(ext, pixels), fit=(32, 32)).shape == (300, 400, 3)


def test_load_image_decodes_scaled_to_the_same_result_as_decode_then_resize(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(".jpg", textured_photo(768, 1024), [cv2.IMWRITE_JPEG_QUALITY, 90]))
    loaded = load_image(path, (32, 32))
    assert loaded.shape == (32, 32, 3)
    assert np.array_equal(
        loaded, resize_image(decode_image(path.read_bytes(), fit=(32, 32)), (32, 32))
    )
