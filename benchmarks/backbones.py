"""Each ImageNet backbone's size and speed here: writes benchmarks/results/backbones.md.

    python benchmarks/backbones.py [--rounds 3] [--repeats 20]

For every backbone `imagerec train --arch` and `imagerec import-keras` offer: its parameters,
the size of its weight file without the top (random values written in Keras' legacy .h5 layout,
the layout of the published file; no real file can be fetched here), and the time of a forward
pass of Keras' 1000-class ImageNet model at its default size, batch 1 and batch 32, through
one traced tf.function as the TensorFlow engine runs it. The weights are random: the time of a
forward pass does not depend on their values. Backbones are measured in interleaved rounds and
each figure is the median over all rounds; mobilenetv2 (the backbone imagerec had before) is the
baseline row that the ratios are taken against. The ImageNet accuracy is not measured here: it
is the figure Keras' documentation reports, with its source.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "backbones.md"
BASELINE = "mobilenetv2"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def weight_file_bytes(arch: str) -> int:
    """The size of the no-top weight file in Keras' legacy .h5 layout (random values)."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from imagerec.pretrained import BACKBONES

    spec = BACKBONES[arch]
    model = getattr(keras.applications, spec.constructor)(
        input_shape=(spec.default_size, spec.default_size, 3), include_top=False, weights=None
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / spec.notop.name
        with h5py.File(path, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, model)
        return path.stat().st_size


def forward_timer(arch: str):
    """(parameters, a function that times one forward pass of `batch` images in seconds)."""
    import tensorflow as tf

    from imagerec.models import imagenet_classifier
    from imagerec.pretrained import BACKBONES

    model = imagenet_classifier(arch, None)
    size = BACKBONES[arch].default_size

    @tf.function(reduce_retracing=True)
    def forward(images):
        return model(tf.cast(images, tf.float32), training=False)

    inputs = {
        batch: tf.constant(
            np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), np.uint8)
        )
        for batch in (1, 32)
    }
    for batch in inputs:  # trace and warm up
        forward(inputs[batch]).numpy()

    def timed(batch: int) -> float:
        started = time.perf_counter()
        forward(inputs[batch]).numpy()
        return time.perf_counter() - started

    return model.count_params(), timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=20, help="batch-1 passes per round")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from imagerec.pretrained import BACKBONES

    load_before = load_average()
    arches = [BASELINE, *(name for name in BACKBONES if name != BASELINE)]
    timers, params, file_bytes = {}, {}, {}
    for arch in arches:
        params[arch], timers[arch] = forward_timer(arch)
        file_bytes[arch] = weight_file_bytes(arch)
    single = {arch: [] for arch in arches}
    batched = {arch: [] for arch in arches}
    for round_index in range(args.rounds):
        for arch in arches:
            single[arch] += [timers[arch](1) for _ in range(args.repeats)]
            batched[arch] += [timers[arch](32) / 32 for _ in range(max(2, args.repeats // 5))]
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr)
    load_after = load_average()

    one = {arch: statistics.median(single[arch]) * 1000 for arch in arches}
    many = {arch: statistics.median(batched[arch]) * 1000 for arch in arches}
    rows = []
    for arch in arches:
        spec = BACKBONES[arch]
        cells = [
            arch,
            spec.constructor,
            f"{params[arch] / 1e6:.2f} M",
            f"{file_bytes[arch] / 2**20:.1f} MiB",
            f"{one[arch]:.1f}",
            f"{one[arch] / one[BASELINE]:.2f}",
            f"{many[arch]:.2f}",
            f"{many[arch] / many[BASELINE]:.2f}",
            f"{spec.imagenet_top1:.1%}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    sources = {}
    for arch in arches:
        sources.setdefault(BACKBONES[arch].top1_source, []).append(arch)
    cited = "; ".join(f"{', '.join(names)}: {source}" for source, names in sources.items())
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/backbones.py", *sys.argv[1:]]
    )
    text = f"""# The ImageNet backbones: size and speed on this machine

Command: `{command}`

Machine: {cpu_description()}; {platform.platform()}; tensorflow {tf.__version__}, keras \
{keras.__version__}, numpy {np.__version__}. Load average (1, 5, 15 min) {load_before} before
and {load_after} after: other work shared these cores, so absolute times carry noise and the
ratios, measured in the same interleaved rounds, are the figures to compare.

Forward pass of Keras' 1000-class ImageNet model at each backbone's default size (224x224),
float32, through one traced `tf.function`, random weights; median over {args.rounds} interleaved
rounds of {args.repeats} batch-1 passes and {max(2, args.repeats // 5)} batch-32 passes each.
"ms per image" at batch 32 is the batch's time divided by 32. Parameters are the whole 1000-class
model's; the weight file is the one without the top (what fine-tuning downloads), written here in
Keras' legacy .h5 layout with random values. The baseline row is {BASELINE}.

| backbone | keras.applications | parameters | weight file (no top) | ms per image, batch 1 \
| against {BASELINE} | ms per image, batch 32 | against {BASELINE} | ImageNet top-1 (Keras' docs) |
|---|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

ImageNet top-1: not measured here; as Keras' documentation reports it ({cited}).
"""
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
