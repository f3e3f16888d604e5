"""What each part of the CIFAR-10 recipe pays: train without it, and write
benchmarks/results/ablate_cifar10.md.

    python benchmarks/ablate_cifar10.py --data /tmp/cifar10/train

Every variant is the default recipe with one part removed or replaced, trained at the same
short length (--epochs, default 10) and seeds (--seeds, default 0) on the stratified
45,000/5,000 split, each run in its own process through `imagerec.train.train`. With one seed, a
difference smaller than the seed spread in benchmarks/results/train_cifar10.md is not a finding.
Runs whose metrics.json exists in --work are reused unless --fresh is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from imagerec.train import TrainConfig
from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ablate_cifar10.md"

# name: (what changes, TrainConfig overrides, model change)
VARIANTS = {
    "recipe": ("nothing: the default recipe", {}, None),
    "no-whitening": (
        "the 2x2 whitening layer is trained from Keras' default initialisation, not set from "
        "the data and frozen",
        {},
        "trainable-whitening",
    ),
    "no-label-smoothing": ("label smoothing 0 instead of 0.2", {"label_smoothing": 0.0}, None),
    "no-translate": ("no random 2-pixel translation", {"translate": 0}, None),
    "no-lookahead": (
        "no lookahead: the last weights, not the slow average",
        {"lookahead": False},
        None,
    ),
    "residual-adds": (
        "Page's residual add in each conv group instead of identity-initialised convs",
        {},
        "add",
    ),
    "no-shortcut": ("neither residual adds nor identity-initialised convs", {}, "none"),
    "gelu": ("GELU instead of ReLU everywhere (airbench94's activation)", {}, "gelu"),
    "wide": (
        "conv groups 128/384/384 wide instead of 64/256/256 (airbench95's widths)",
        {"widths": (128, 384, 384)},
        None,
    ),
    "float32": (
        "float32 compute instead of bfloat16 on the CPU's AMX units",
        {"precision": "float32"},
        None,
    ),
    "float32-gelu": (
        "float32 compute and GELU: airbench94's arithmetic and activation together",
        {"precision": "float32"},
        "gelu",
    ),
}


# Every variant at the ablation's length; "wide" is measured at its own (--epochs 18).
DEFAULT_VARIANTS = [name for name in VARIANTS if name != "wide"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar10", help="'cifar10' or the shared image folder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/imagerec-bench-ablate"))
    parser.add_argument("--fresh", action="store_true", help="rerun runs that already exist")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # with --one
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return train_variant(args)

    runs = []  # (variant, seed, metrics)
    for name in args.variants:
        for seed in args.seeds:
            out = args.work / f"{name}-seed{seed}-e{args.epochs}"
            if (out / "metrics.json").exists() and not args.fresh:
                print(f"reusing {out}", flush=True)
            else:
                command = [sys.executable, __file__, "--one", name, "--out", str(out)]
                command += ["--data", args.data, "--epochs", str(args.epochs), "--seed", str(seed)]
                print("$", shlex.join(command), flush=True)
                subprocess.run(command, check=True)
            runs.append((name, seed, json.loads((out / "metrics.json").read_text())))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report(args, runs))
    print(f"wrote {args.results}")
    return 0


def train_variant(args) -> int:
    """One variant, in this process: change the model as the variant says, then train."""
    from imagerec.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _, overrides, model_change = VARIANTS[args.one]
    if model_change:
        change_model(model_change)
    config = replace(TrainConfig(epochs=args.epochs, seed=args.seed), **overrides)
    started = time.perf_counter()
    train(args.data, args.out, config)
    print(f"{args.one}: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def change_model(change: str) -> None:
    """Replace the model functions that imagerec.train looks up when it builds the model."""
    from imagerec import models

    build = models.resnet_small

    def with_shortcut(*args, **kwargs):
        return build(*args, **kwargs, shortcut=change)

    def with_gelu(*args, **kwargs):
        return build(*args, **kwargs, activation="gelu")

    def trainable_whitening(model, images, mean, std):
        model.get_layer("whiten").trainable = True  # set before compiling, so it trains

    if change in models.SHORTCUTS:
        models.resnet_small = with_shortcut
    if change == "gelu":
        models.resnet_small = with_gelu
    if change == "trainable-whitening":
        models.init_whitening = trainable_whitening


def report(args, runs) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in runs[0][2]["versions"].items())
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# What each part of the CIFAR-10 recipe pays",
        "",
        f"Command: `python {shlex.join(['benchmarks/ablate_cifar10.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {cpu_description()}; {platform.platform()}; {versions}.",
        "",
        f"Each run: `imagerec train` defaults with one change, {args.epochs} epochs, seed(s) "
        f"{seeds}, the stratified 45,000/5,000 split of the shared JPEG (q75) images. The seed "
        "spread (below with several seeds; benchmarks/results/train_cifar10.md at 30 epochs) "
        "is the scale of noise for a single run.",
        "",
        "| variant | change | runs | mean epoch (s) | val acc | flip TTA "
        "| against the recipe (val acc / flip TTA) |",
        "|---|---|---|---|---|---|---|",
    ]
    means = {}  # variant: (val acc, flip TTA, epoch seconds, runs), each a mean over its seeds
    for name in args.variants:
        metrics = [m for variant, _, m in runs if variant == name]
        means[name] = (
            statistics.mean(m["val_accuracy"] for m in metrics),
            statistics.mean(m["val_accuracy_tta"] for m in metrics),
            statistics.mean(statistics.mean(m["epoch_times_s"]) for m in metrics),
            len(metrics),
        )
    base = means.get("recipe")
    for name, (plain, tta, epoch, count) in means.items():
        delta = ""
        if base is not None and name != "recipe":
            delta = f"{100 * (plain - base[0]):+.2f} / {100 * (tta - base[1]):+.2f} points"
        lines.append(
            f"| {name} | {VARIANTS[name][0]} | {count} | {epoch:.1f} | {plain:.4f} | {tta:.4f} "
            f"| {delta} |"
        )
    if len(args.seeds) > 1:
        lines += ["", "| variant | seed | val acc | flip TTA |", "|---|---|---|---|"]
        for name, seed, m in runs:
            lines.append(
                f"| {name} | {seed} | {m['val_accuracy']:.4f} | {m['val_accuracy_tta']:.4f} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
