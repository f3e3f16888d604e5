"""Where a training step's time goes: writes benchmarks/results/profile_train.md.

    python benchmarks/profile_train.py [--steps 15]

The model, optimizer, loss, augmentation and precision are the default recipe's, built by the
same functions `imagerec train` calls. The images are random uint8 arrays of CIFAR-10's shape:
a step costs the same whatever the pixels. Measured, each after a warm-up:
- the input pipeline alone, one augmented batch at a time in one thread;
- a training step fed one batch already in memory, so no pipeline at all;
- the same with Keras' own batch norm instead of the fused kernel, for comparison;
- a training step as `imagerec train` runs it, the pipeline feeding it through Keras;
- the model's arithmetic against this machine's matrix-multiply rate;
- a TensorFlow profile of the fed steps, time by operation type.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "profile_train.md"
BUNDLE = ROOT / "models" / "cifar10"
TOP_OPS = 12  # operation types listed one by one in the profile table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from imagerec import data as datasets
    from imagerec.train import (
        TrainConfig,
        _dtype_policy,
        _lookahead,
        augmented_batches,
        batch_dataset,
        compiled_model,
        use_bfloat16,
    )

    config = TrainConfig()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (45_000, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, len(x))
    mean, std = datasets.channel_stats(x)
    precision = "mixed_bfloat16" if use_bfloat16(config.precision) else "float32"
    steps_per_epoch = int(np.ceil(len(x) / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    keras.utils.set_random_seed(0)
    with _dtype_policy(precision):
        model = compiled_model(config, 10, (32, 32), x[:5000], mean, std, total_steps)
        keras_norm = compiled_model(
            config, 10, (32, 32), x[:5000], mean, std, total_steps, fused_norm=False
        )

    generator = augmented_batches(x, y, config, 10)
    pipeline_s = median_seconds(lambda: next(generator), repeats=args.steps)
    batches = batch_dataset(x, y, config, 10)

    one = next(generator)
    fixed = tf.data.Dataset.from_tensors(one).repeat()
    keras_norm_s = fit_step_seconds(keras_norm, fixed, args.steps, [])
    del keras_norm
    alone_s = fit_step_seconds(model, fixed, args.steps, [])
    # Lookahead acts on the last 70% of a run's steps; here on every fifth step, as it does there.
    fed_s = fit_step_seconds(model, batches, args.steps, [_lookahead(10**9, start_step=0)])

    forward = forward_flops(model)
    train_flops = 3 * forward  # forward, then gradients for inputs and for weights
    matmul = {dtype: matmul_rate(tf, dtype) for dtype in ("bfloat16", "float32")}
    by_kind, op_total, profiled_s = profile_kinds(tf, model, batches, args.steps)

    real = real_run_step(steps_for=50_000, batch=config.batch_size)
    lines = [
        "# Where a training step's time goes",
        "",
        f"Command: `python {shlex.join(['benchmarks/profile_train.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {cpu_description()}; {platform.platform()}; tensorflow {tf.__version__}, "
        f"keras {keras.__version__}, numpy {np.__version__}.",
        "",
        f"The default recipe's step: {config.arch}, batch {config.batch_size}, {precision} "
        "compute, random uint8 images of CIFAR-10's shape. Times are per step of "
        f"{config.batch_size} images, each the median of {args.steps} steps after a warm-up.",
        "",
        "| what | ms per step | images/s |",
        "|---|---|---|",
        row("input pipeline alone (augment + cast, one thread)", pipeline_s, config.batch_size),
        row("training step on one batch in memory (no pipeline)", alone_s, config.batch_size),
        row("the same, Keras' own batch norm instead", keras_norm_s, config.batch_size),
        row("training step fed by the pipeline, with lookahead", fed_s, config.batch_size),
    ]
    if real:
        lines.append(row(f"the bundled model's final run ({real[1]})", real[0], config.batch_size))
    overlap = (fed_s - alone_s) / fed_s
    lines += [
        "",
        f"The pipeline costs {pipeline_s * 1000:.0f} ms of one core per batch, and a fed step "
        f"takes {overlap:.0%} longer than a step with no pipeline at all: it runs beside the "
        "model (a tf.data thread prepares the next batches during a step), not in front of it, "
        "but it takes its share of the two cores.",
        "",
        f"Training batch norm through TensorFlow's fused kernel (`FusedBatchNormalization`) "
        f"instead of Keras' own layer saves {1 - alone_s / keras_norm_s:.0%} of a step.",
        "",
        "## Arithmetic against the machine",
        "",
        f"One image costs {forward / 1e9:.3f} GFLOP forward (convolutions and the classifier, "
        f"counted from the layer shapes), about {train_flops / 1e9:.2f} GFLOP to train on "
        "(forward, then gradients for the inputs and for the weights).",
        "",
        f"- Training, step alone: {train_flops * config.batch_size / alone_s / 1e9:.0f} GFLOP/s; "
        f"fed: {train_flops * config.batch_size / fed_s / 1e9:.0f} GFLOP/s.",
        f"- A 4096x4096 matrix multiply on this machine: {matmul['bfloat16'] / 1e9:.0f} GFLOP/s "
        f"in bfloat16, {matmul['float32'] / 1e9:.0f} GFLOP/s in float32.",
        f"- One epoch of 50,000 images is {train_flops * 50_000 / 1e12:.1f} TFLOP; at the "
        f"bfloat16 matrix-multiply rate it would take "
        f"{train_flops * 50_000 / matmul['bfloat16']:.0f} s.",
        "",
        "## By operation type",
        "",
        f"TensorFlow's profiler over {args.steps} fed steps: self time of the model's "
        f"operations, the input pipeline excluded. The profiler slows a step to "
        f"{profiled_s / args.steps * 1000:.0f} ms and the operations' self times add up to "
        f"{op_total / args.steps * 1000:.0f} ms per step, so read the shares, not the "
        "milliseconds.",
        "",
        "| operation type | share | ms per step |",
        "|---|---|---|",
    ]
    ranked = sorted(by_kind.items(), key=lambda item: -item[1])
    rest = sum(seconds for _, seconds in ranked[TOP_OPS:])
    for kind, seconds in [*ranked[:TOP_OPS], (f"the other {len(ranked) - TOP_OPS} types", rest)]:
        lines.append(f"| {kind} | {seconds / op_total:.0%} | {seconds / args.steps * 1000:.0f} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")
    return 0


def row(label: str, seconds: float, batch: int) -> str:
    return f"| {label} | {seconds * 1000:.0f} | {batch / seconds:.0f} |"


def median_seconds(call, repeats: int) -> float:
    """Median seconds of `call` after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def fit_step_seconds(model, data, steps: int, callbacks: list) -> float:
    """Median seconds per training step of `model.fit`, after a warm-up epoch."""
    import keras

    times = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0, callbacks=callbacks)
    times.clear()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[*callbacks, StepTimer()])
    return float(np.median(times))


def forward_flops(model) -> int:
    """Multiply-adds x 2 of the convolutions and dense layers for one image."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            total += 2 * kh * kw * cin * cout * height * width
        elif isinstance(layer, keras.layers.Dense):
            cin, cout = layer.kernel.shape
            total += 2 * cin * cout
    return total


def matmul_rate(tf, dtype: str, n: int = 4096, repeats: int = 5) -> float:
    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    seconds = median_seconds(lambda: tf.linalg.matmul(a, a).numpy(), repeats)
    return 2 * n**3 / seconds


def profile_kinds(tf, model, batches, steps: int) -> tuple[dict[str, float], float, float]:
    """Seconds of op self time by op type over `steps` fed steps (TensorFlow's profiler), their
    sum, and the wall time of those steps under the profiler."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        started = time.perf_counter()
        model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
        profiled_s = time.perf_counter() - started
        tf.profiler.experimental.stop()
        planes = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        raw, ok = plugin.xspace_to_tools_data(planes, "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"TensorFlow's profiler gave no op statistics: {raw[:200]!r}")
    table = json.loads(raw)[0]
    columns = [column["id"] for column in table["cols"]]
    kinds: dict[str, float] = defaultdict(float)
    for entry in table["rows"]:
        values = dict(zip(columns, (cell.get("v") for cell in entry["c"]), strict=True))
        op_type = values["type"]
        if op_type in ("IDLE", "Dataset", "PyFunc") or values["operation"].startswith("Iterator"):
            continue  # waiting, and the input pipeline (its generator runs as a PyFunc)
        kinds[op_type] += values["total_self_time"] / 1e6
    return dict(kinds), sum(kinds.values()), profiled_s


def real_run_step(steps_for: int, batch: int) -> tuple[float, str] | None:
    """Mean seconds per step of the bundled model's own training run, from its metrics."""
    try:
        metrics = json.loads((BUNDLE / "metrics.json").read_text())
    except OSError:
        return None
    epoch_times = metrics.get("epoch_times_s") or []
    if not epoch_times:
        return None
    steps = int(np.ceil(steps_for / batch))
    return float(np.mean(epoch_times)) / steps, f"mean epoch {np.mean(epoch_times):.0f} s"


if __name__ == "__main__":
    sys.exit(main())
