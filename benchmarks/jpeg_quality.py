"""How much the recipe's accuracy depends on JPEG quality: write
benchmarks/results/jpeg_quality.md.

    python benchmarks/jpeg_quality.py --data /tmp/cifar10/train --qualities 50 30

The shared CIFAR-10 images are JPEG q75 and no lossless copy is at hand, so the cost of that
first compression cannot be measured directly. This measures the next best thing: the shared
images compressed once more at each --qualities (OpenCV's encoder, 4:2:0 chroma like the shared
files), the recipe trained on each copy (--epochs, default 10, seed 0, the stratified
45,000/5,000 split: the same images held out, since the file names are kept), against the same
run on the images as they are. How far accuracy falls per step of compression says how much the
first one is likely to have cost. Runs whose metrics.json exists in --work are reused unless
--fresh is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "jpeg_quality.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the extracted shared images")
    parser.add_argument("--qualities", type=int, nargs="+", default=[50, 30])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imagerec-bench-jpeg"))
    parser.add_argument("--fresh", action="store_true", help="rerun runs that already exist")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = [("as shared (q75)", None, train(args, args.data, "shared"))]
    for quality in args.qualities:
        folder = args.work / f"q{quality}" / "train"
        stats = recompress(args.data, folder, quality)
        rows.append((f"again at q{quality}", stats, train(args, folder, f"q{quality}")))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report(args, rows))
    print(f"wrote {args.results}")
    return 0


def recompress(source: Path, folder: Path, quality: int) -> dict:
    """Every image of `source` encoded again at `quality` into `folder` (same names); the mean
    PSNR against the source pixels and the mean file size."""
    files = sorted(source.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no <class>/*.jpg files under {source}")
    psnr, sizes = [], []
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise SystemExit(f"could not encode {path}")
        target = folder / path.parent.name / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encoded.tobytes())
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        error = np.mean((decoded.astype(np.float64) - image) ** 2)
        psnr.append(10 * np.log10(255**2 / max(error, 1e-10)))
        sizes.append(len(encoded))
    return {"psnr_db": float(np.mean(psnr)), "bytes": float(np.mean(sizes))}


def train(args, data: Path, name: str) -> dict:
    out = args.work / f"{name}-seed0-e{args.epochs}"
    if (out / "metrics.json").exists() and not args.fresh:
        print(f"reusing {out}", flush=True)
    else:
        command = [sys.executable, "-m", "imagerec.cli", "train", "--data", str(data)]
        command += ["--out", str(out), "--epochs", str(args.epochs), "--seed", "0"]
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads((out / "metrics.json").read_text())


def report(args, rows) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in rows[0][2]["versions"].items())
    base = rows[0][2]
    shared_bytes = np.mean([p.stat().st_size for p in sorted(args.data.glob("*/*.jpg"))])
    lines = [
        "# Accuracy against JPEG quality",
        "",
        f"Command: `python {shlex.join(['benchmarks/jpeg_quality.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {cpu_description()}; {platform.platform()}; {versions}.",
        "",
        f"Each run: `imagerec train` defaults, {args.epochs} epochs, seed 0, the stratified "
        "45,000/5,000 split, on the shared JPEG (q75, 4:2:0 chroma) images as they are or "
        "encoded once more at a lower quality by OpenCV. PSNR: the re-encoded pixels against "
        "the shared ones. Seed noise at 10 epochs: about ± 0.2 points "
        "(benchmarks/results/ablate_cifar10_seeds.md).",
        "",
        "| images | PSNR against shared (dB) | bytes per image | val acc | flip TTA "
        "| against shared (val acc / flip TTA) |",
        "|---|---|---|---|---|---|",
    ]
    for label, stats, m in rows:
        psnr = "" if stats is None else f"{stats['psnr_db']:.1f}"
        size = shared_bytes if stats is None else stats["bytes"]
        delta = ""
        if stats is not None:
            delta = (
                f"{100 * (m['val_accuracy'] - base['val_accuracy']):+.2f} / "
                f"{100 * (m['val_accuracy_tta'] - base['val_accuracy_tta']):+.2f} points"
            )
        lines.append(
            f"| {label} | {psnr} | {size:.0f} | {m['val_accuracy']:.4f} | "
            f"{m['val_accuracy_tta']:.4f} | {delta} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
