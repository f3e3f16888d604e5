"""Decoding a JPEG at the scale its resize needs, against decoding every pixel.

    python benchmarks/decode.py --data /tmp/cifar10/train [--count 1000] [--large 40]

Every caller that resizes an image to a model's input (load_image in training and both bulk
engines, the API, the protocols) passes that size to images.decode_image as `fit`, and a JPEG
with at least twice that left at 1/2, 1/4 or 1/8 of its size is decoded at that scale by libjpeg.
This measures what that gives and what it changes, on one thread, for photos made as
benchmarks/bulk.py makes them (CIFAR images scaled up with grain, JPEG quality 90): `--count`
at 1024x768 and `--large` at 4032x3024 (a 12-megapixel phone photo), each for a 32x32 model
(the bundled one) and a 224x224 one (the ImageNet backbones), and for two textures no photo has
(white noise and one-pixel stripes), the worst cases for the difference. Reported: CPU ms an
image to decode and resize, both ways; how far the resized pixels are apart; and, at 32x32, how
often the bundled model's best label is the same both ways, and the largest difference in a
probability. Writes benchmarks/results/decode.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import cv2
import numpy as np

from bulk import make_photo, photo_sources
from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
FITS = [(32, 32), (224, 224)]


def photos(cifar: Path, count: int, size: tuple[int, int]) -> list[bytes]:
    """`count` JPEG photos of size (height, width), made as benchmarks/bulk.py makes them."""
    rng = np.random.default_rng(0)
    return [make_photo(source, size, rng) for source in photo_sources(cifar, count)]


def textures(size: tuple[int, int]) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    stripes = np.zeros((*size, 3), np.uint8)
    stripes[:, ::2] = 255
    return {
        name: cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        for name, image in [("white noise", noise), ("1-pixel stripes", stripes)]
    }


def both_ways(datas: list[bytes], fit: tuple[int, int]) -> dict:
    """Each image decoded scaled and whole, each resized to `fit`: CPU time and pixels."""
    from imagerec.images import decode_image, image_size, jpeg_scale, resize_image

    def run(scaled: bool) -> tuple[float, np.ndarray]:
        start = time.thread_time()
        out = [resize_image(decode_image(d, fit=fit if scaled else None), fit) for d in datas]
        return (time.thread_time() - start) / len(datas), np.stack(out)

    run(True), run(False)  # first calls' allocations aside
    scaled_s, scaled = run(True)
    whole_s, whole = run(False)
    width, height = image_size(datas[0], "jpeg")
    difference = np.abs(scaled.astype(int) - whole.astype(int))
    return {
        "size": f"{width}x{height}",
        "scale": jpeg_scale(width, height, fit),
        "scaled_ms": scaled_s * 1e3,
        "whole_ms": whole_s * 1e3,
        "mean": float(difference.mean()),
        "p99": float(np.percentile(difference, 99)),
        "max": int(difference.max()),
        "scaled": scaled,
        "whole": whole,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of CIFAR-10 JPEGs")
    parser.add_argument("--count", type=int, default=1000, help="1024x768 photos")
    parser.add_argument("--large", type=int, default=40, help="4032x3024 photos")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cifar10")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/decode.md")
    args = parser.parse_args()

    from imagerec.images import hold_decode_buffers
    from imagerec.predictor import Predictor

    cv2.setNumThreads(1)  # one thread, as each of the bulk engines' threads decodes
    hold_decode_buffers()  # as the bulk engines do
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    predictor = Predictor.from_path(args.model, engine="auto")
    sets = [
        (f"{args.count} photos", photos(args.data, args.count, (768, 1024))),
        (f"{args.large} phone photos", photos(args.data, args.large, (3024, 4032))),
    ]
    for size in [(768, 1024), (3024, 4032)]:
        for name, data in textures(size).items():
            sets.append((name, [data] * (20 if size[0] < 1000 else 3)))
    rows = []
    for name, datas in sets:
        for fit in FITS:
            result = both_ways(datas, fit)
            agree = " | "  # the two columns left empty
            if fit == predictor.input_size and "photos" in name:
                a = predictor.predict_arrays(result["scaled"])
                b = predictor.predict_arrays(result["whole"])
                same = int((a.argmax(1) == b.argmax(1)).sum())
                agree = f"{same:,} / {len(datas):,} | {np.abs(a - b).max():.3f}"
            print(name, fit, {k: v for k, v in result.items() if k not in ("scaled", "whole")})
            rows.append(
                f"| {name} ({result['size']}) | {fit[0]}x{fit[1]} | 1/{result['scale']} "
                f"| {result['scaled_ms']:.2f} | {result['whole_ms']:.2f} "
                f"| {result['whole_ms'] / result['scaled_ms']:.2f}x "
                f"| {result['mean']:.3f} / {result['p99']:.0f} / {result['max']} "
                f"| {agree} |"
            )
    command = "python benchmarks/decode.py --data /tmp/cifar10/train"
    if (args.count, args.large) != (1000, 40):
        command += f" --count {args.count} --large {args.large}"
    lines = [
        "# Decoding a JPEG at the scale its resize needs",
        "",
        f"Command: `{command}`",
        f"Run at {started} UTC; every figure below is from this run.",
        "",
        f"- CPU: {cpu_description()}, one thread (OpenCV's own threads off)",
        f"- {platform.platform()}, Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__}, NumPy {np.__version__}",
        "",
        "Each image decoded and resized to the model's input size on one thread, scaled "
        "(`decode_image(data, fit=size)`, as every caller now decodes) and whole (every pixel "
        "decoded, then the same INTER_AREA resize). Difference: the resized pixels of the two, "
        "in levels of 255 (mean / 99th percentile / largest). Same label and largest "
        "probability difference: the bundled model on the two, where its input size is the "
        "row's. The textures are each one image decoded again and again.",
        "",
        "| images | resized to | decoded at | scaled ms | whole ms | faster | difference "
        "(mean / p99 / max) | same label | largest probability difference |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
