"""Accuracy of the exported engines on images the model never saw: each engine of a bundle
trained with a validation split held out, scored on exactly that split.

    imagerec train --data DATA --out /tmp/held-out            # the default recipe, 10% held out
    python benchmarks/export_accuracy.py --model /tmp/held-out --data DATA

The bundle is copied and exported again (`imagerec export --int8`) with the current export code,
so the figures are the current quantiser's. Writes benchmarks/results/export_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bundle with val_split > 0")
    parser.add_argument("--data", required=True, help="the data it was trained on")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_accuracy.md"
    )
    args = parser.parse_args()

    from imagerec.bundle import Bundle
    from imagerec.export import CALIBRATION_IMAGES, export_bundle, images_for_export

    source = Bundle.load(args.model, keras_model=False)
    config = source.metrics.get("config", {})
    if not config.get("val_split"):
        print("the bundle held nothing out: its scores would be on seen images", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="imagerec-export-") as work:
        copy = Path(work) / args.model.name
        shutil.copytree(args.model, copy)
        calibration, evaluation = images_for_export(source, args.data, args.cache_dir)
        started = time.perf_counter()
        record = export_bundle(copy, int8=True, calibration=calibration, evaluation=evaluation)
        seconds = time.perf_counter() - started
        sizes = {
            p.name: p.stat().st_size for p in copy.iterdir() if p.suffix in (".onnx", ".keras")
        }

    reference = record["tensorflow"]["accuracy"]
    where = record["tensorflow"]["evaluated_on"]
    lines = [
        "# Exported engines on held-out images",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {cpu_description()}.",
        "",
        f"Bundle: {args.model} ({source.metrics.get('arch')}, {source.metrics.get('epochs')} "
        f"epochs, seed {config.get('seed')}, val_split {config.get('val_split')}, split seed "
        f"{config.get('split_seed')}), exported again in {seconds:.0f} s: float32 ONNX and int8 "
        f"calibrated on {record['onnx-int8']['calibration_images']} training images "
        f"(CALIBRATION_IMAGES = {CALIBRATION_IMAGES}). Scored on {where['images']} images of "
        f"{where['source']}, never trained on, with test-time augmentation {where['tta']}.",
        "",
        "| engine | file | MB | accuracy | against tensorflow | top-1 agreement |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in record.items():
        lines.append(
            f"| {name} | {entry['file']} | {sizes[entry['file']] / 1e6:.1f} "
            f"| {entry['accuracy']:.2%} | {(entry['accuracy'] - reference) * 100:+.2f} points "
            f"| {entry['agreement_with_tensorflow']:.2%} |"
        )
    int8 = record["onnx-int8"]
    lines += [
        "",
        "## Against the targets",
        "",
        f"- int8 accuracy {(int8['accuracy'] - reference) * 100:+.2f} points against float32 "
        "(target: within 0.2 point)",
        f"- int8 top-1 agreement {int8['agreement_with_tensorflow']:.2%} (target: at least 99%)",
        "",
        "```json",
        json.dumps(record, indent=1, sort_keys=True),
        "```",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
