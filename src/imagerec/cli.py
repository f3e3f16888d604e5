"""The `imagerec` command. Each subcommand parses its flags and calls the library; only this
module prints. Library errors become one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from imagerec.config import Settings
from imagerec.errors import ImagerecError
from imagerec.pretrained import BACKBONES
from imagerec.tfimport import import_tensorflow

log = logging.getLogger("imagerec")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ info and warnings
        logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # a line per conversion step
        # An optimisation tf2onnx cannot apply is skipped, and logged with its traceback.
        logging.getLogger("tf2onnx.optimizer").setLevel(logging.ERROR)
    try:
        if args.tensorflow:
            import_tensorflow()
        return args.handler(args) or 0
    except ImagerecError as exc:
        print(f"imagerec: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imagerec: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagerec", description="Train image classifiers and serve them over HTTP."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # Commands that always run a Keras model import TensorFlow first; the others import it only
    # if the engine they pick is TensorFlow's.
    parser.set_defaults(tensorflow=False)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model and write a bundle")
    train.add_argument(
        "--data",
        required=True,
        help="'cifar10', a cifar-10-python tarball or folder, or an "
        "image folder (root/<class>/*.jpg, or root/train and root/val)",
    )
    train.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    train.add_argument(
        "--arch",
        default=None,
        help="resnet-small (the default, for small images such as CIFAR's) or an "
        f"ImageNet-pretrained backbone for photos: {', '.join(BACKBONES)}",
    )
    train.add_argument(
        "--weights",
        default=None,
        metavar="imagenet|none|PATH",
        help="the backbone's starting weights: imagenet (the default; downloaded once into "
        "the Keras cache, IMAGEREC_WEIGHTS_URL for a mirror), none (random) or a weight file",
    )
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument(
        "--widths",
        type=_widths,
        default=None,
        metavar="W1,W2,...",
        help="resnet-small's conv group widths (default 64,256,256)",
    )
    train.add_argument(
        "--val-split",
        type=float,
        default=None,
        help="fraction held out for validation (default 0.1; 0 trains on all)",
    )
    train.add_argument("--seed", type=int, default=0, help="weights, augmentation, shuffling")
    train.add_argument(
        "--split-seed", type=int, default=0, help="which images the validation split holds"
    )
    train.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square input size for image folders (default 32 for resnet-small, 224 for the "
        "backbones)",
    )
    train.add_argument("--cache-dir", type=Path, default=None)
    train.add_argument(
        "--tta",
        choices=["none", "flip"],
        default=None,
        help="test-time augmentation stored in the bundle (default flip)",
    )
    # TensorFlow is imported once the weights are at hand (cmd_train): fail fast without them.
    train.set_defaults(handler=cmd_train)

    keras_import = commands.add_parser(
        "import-keras",
        help="write Keras' pretrained 1000-class ImageNet classifier as a bundle",
    )
    keras_import.add_argument("name", choices=list(BACKBONES), help="the backbone")
    keras_import.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    keras_import.set_defaults(handler=cmd_import_keras)

    export = commands.add_parser(
        "export", help="add ONNX models (float32, and int8 with --int8) to a bundle"
    )
    export.add_argument("bundle", type=Path)
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument(
        "--int8", action="store_true", help="also a statically quantised int8 model (needs --data)"
    )
    export.add_argument(
        "--data",
        default=None,
        help="the training data (as for train): calibration images, and the validation split "
        "that each engine's accuracy is measured on",
    )
    export.add_argument(
        "--int8-only",
        action="store_true",
        help="add only model-int8.onnx (the float32 ONNX model is made as its input, then left "
        "out): a smaller bundle",
    )
    export.add_argument("--cache-dir", type=Path, default=None)
    export.set_defaults(handler=cmd_export, tensorflow=True)

    evaluate = commands.add_parser("evaluate", help="accuracy of a bundle on a labelled dataset")
    evaluate.add_argument("bundle", type=Path)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument(
        "--confusion",
        type=Path,
        default=None,
        help="where to write the confusion matrix (default confusion-eval.png)",
    )
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.add_argument("--cache-dir", type=Path, default=None)
    _add_engine_argument(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = commands.add_parser("predict", help="top-k labels for image files")
    predict.add_argument(
        "paths",
        nargs="+",
        metavar="[BUNDLE] IMAGE",
        help="an optional bundle folder, then image files",
    )
    predict.add_argument("-k", "--top-k", type=int, default=3)
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    _add_engine_argument(predict)
    predict.set_defaults(handler=cmd_predict)

    classify = commands.add_parser(
        "classify",
        help="label every image of folders, globs or path lists into a table (resumable)",
    )
    classify.add_argument("bundle", type=Path, metavar="BUNDLE")
    classify.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder (walked recursively), a glob pattern, an image, or a text file listing "
        "image paths one a line (-: such a list on standard input)",
    )
    classify.add_argument(
        "--out",
        required=True,
        type=Path,
        help="results.parquet (a folder of parts), results.csv or results.jsonl; run again to "
        "resume",
    )
    classify.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: stream in this process (default); ray: Ray Data, on RAY_ADDRESS's cluster "
        "or a local one",
    )
    classify.add_argument("-k", "--top-k", type=int, default=None)
    classify.add_argument("--batch-size", type=int, default=None, metavar="N")
    classify.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="threads that each read, decode and classify a batch: local engine, in all "
        "(default: one a core; more where reading waits on a network file system); ray "
        "engine, in each actor (default: the CPUs of the smallest node)",
    )
    classify.add_argument(
        "--commit-every",
        type=int,
        default=None,
        metavar="N",
        help="images a commit holds (default 8192, or 10 s of work)",
    )
    classify.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="ray engine: actors in the pool (default: the cluster's CPUs over --threads)",
    )
    classify.add_argument(
        "--model-engine",
        choices=["auto", "tensorflow", "onnx", "onnx-int8"],
        default=None,
        help="the engine that runs the model (default IMAGEREC_ENGINE, else auto)",
    )
    classify.set_defaults(handler=cmd_classify)

    serve = commands.add_parser("serve", help="serve a bundle, or a repository of them, over HTTP")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="one bundle folder")
    source.add_argument(
        "--models",
        type=Path,
        default=None,
        metavar="DIR",
        help="a model repository: DIR/NAME/ a bundle, or DIR/NAME/<n>/ numbered versions",
    )
    serve.add_argument("--default-model", default=None, metavar="NAME")
    serve.add_argument(
        "--version-policy",
        default=None,
        metavar="POLICY",
        help="latest (default), latest:N, all or specific:1,3",
    )
    serve.add_argument(
        "--model-control",
        choices=["none", "poll", "explicit"],
        default=None,
        help="poll the repository (the default with --models), load once (none), or load and "
        "unload through Triton's repository API (explicit)",
    )
    serve.add_argument("--poll-interval", type=float, default=None, metavar="SECONDS")
    serve.add_argument("--max-versions", type=int, default=None, metavar="N")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve gRPC (Open Inference Protocol v2 and TF Serving's PredictionService) "
        "on this port, e.g. 8001; 0 (the default) leaves it off",
    )
    serve.add_argument(
        "--front",
        choices=["granian", "waitress"],
        default=None,
        help="the HTTP server (default IMAGEREC_FRONT, else granian)",
    )
    _add_engine_argument(serve)
    serve.set_defaults(handler=cmd_serve)
    return parser


def _add_engine_argument(command: argparse.ArgumentParser) -> None:
    from imagerec.engines import ENGINES

    command.add_argument(
        "--engine",
        choices=["auto", *ENGINES],
        default=None,
        help="the engine that runs the model (default IMAGEREC_ENGINE, else auto: the fastest "
        "the bundle holds within 0.2 point of TensorFlow's accuracy)",
    )


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        message = f"{text!r} is not a comma-separated list of integers"
        raise argparse.ArgumentTypeError(message) from None


def cmd_train(args) -> int:
    from imagerec.train import TrainConfig, starting_weights, train

    settings = Settings.from_env(cache_dir=args.cache_dir)
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "val_split": args.val_split,
        "image_size": args.image_size,
        "tta": args.tta,
        "widths": args.widths,
        "weights": args.weights,
    }
    config = TrainConfig.for_arch(
        args.arch, seed=args.seed, split_seed=args.split_seed, **overrides
    )
    weights = starting_weights(config, settings)
    import_tensorflow()
    result = train(args.data, args.out, config, settings.cache_dir, settings, weights)
    metrics = result.metrics
    print(f"wrote {result.path}")
    if metrics.get("val_accuracy") is not None:
        print(
            f"validation accuracy {metrics['val_accuracy']:.4f} "
            f"({metrics['val_accuracy_tta']:.4f} with flip TTA) on {metrics['val_count']} images"
        )
    elif metrics.get("train_accuracy") is not None:
        print(
            f"no validation split; on {metrics['train_eval_count']} of the training images: "
            f"{metrics['train_accuracy']:.4f} ({metrics['train_accuracy_tta']:.4f} with flip TTA)"
        )
    print(f"{metrics['epochs']} epochs in {metrics['wall_time_s']:.0f} s")
    return 0


def cmd_import_keras(args) -> int:
    from imagerec.pretrained import import_keras

    settings = Settings.from_env()
    path = import_keras(args.name, args.out, settings.weights_url, settings.download_timeout_s)
    print(f"wrote {path}: Keras' {args.name} ImageNet classifier, 1000 labels")
    return 0


def cmd_export(args) -> int:
    from imagerec.bundle import Bundle
    from imagerec.export import export_bundle, images_for_export

    if (args.int8 or args.int8_only) and args.data is None:
        raise ImagerecError(
            "--int8 needs --data: the training images to calibrate on", code="usage"
        )
    settings = Settings.from_env(cache_dir=args.cache_dir)
    calibration = evaluation = None
    if args.data is not None:
        bundle = Bundle.load(args.bundle, keras_model=False)
        calibration, evaluation = images_for_export(bundle, args.data, settings.cache_dir)
    record = export_bundle(args.bundle, args.int8, calibration, evaluation, args.int8_only)
    print(f"wrote {', '.join(r['file'] for n, r in record.items() if n != 'tensorflow')}")
    for name, entry in record.items():
        if "accuracy" in entry:
            where = entry["evaluated_on"]
            print(
                f"  {name:<11} accuracy {entry['accuracy']:.4f}, top-1 agreement with tensorflow "
                f"{entry['agreement_with_tensorflow']:.4f} ({where['images']} images: "
                f"{where['source']})"
            )
    if evaluation is None:
        print("  no accuracy recorded (no --data): `auto` will keep to tensorflow")
    return 0


def cmd_evaluate(args) -> int:
    from imagerec.evaluate import evaluate_bundle

    settings = Settings.from_env(cache_dir=args.cache_dir, engine=args.engine)
    confusion = args.confusion or Path("confusion-eval.png")
    report = evaluate_bundle(
        args.bundle, args.data, confusion, cache_dir=settings.cache_dir, engine=settings.engine
    )
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"accuracy {report['accuracy']:.4f} on {report['count']} images "
        f"(model {report['model']}, engine {report['engine']}, tta {report['tta']})"
    )
    width = max(len(name) for name in report["per_class"])
    for name, accuracy in report["per_class"].items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    print(f"confusion matrix: {confusion}")
    return 0


def cmd_predict(args) -> int:
    from imagerec.images import load_image
    from imagerec.predictor import Predictor

    paths = [Path(p) for p in args.paths]
    settings = Settings.from_env(engine=args.engine)
    if paths[0].is_dir():
        bundle_path, images = paths[0], paths[1:]
    else:
        bundle_path, images = settings.model, paths
    if not images:
        raise ImagerecError("name at least one image file", code="usage")
    predictor = Predictor.from_path(bundle_path, engine=settings.engine)
    if not 1 <= args.top_k <= len(predictor.labels):
        raise ImagerecError(f"--top-k must be between 1 and {len(predictor.labels)}")
    output, failures = [], 0
    for path in images:
        try:
            prediction = predictor.classify([load_image(path, predictor.input_size)], args.top_k)[0]
        except ImagerecError as exc:
            failures += 1
            output.append(
                {"filename": str(path), "error": {"code": exc.code, "message": exc.message}}
            )
            continue
        output.append(
            {
                "filename": str(path),
                "label": prediction.label,
                "score": prediction.score,
                "top_k": [{"label": label, "score": score} for label, score in prediction.top_k],
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "model": {"name": predictor.name, "version": predictor.version},
                    "results": output,
                },
                indent=1,
            )
        )
    else:
        for item in output:
            if "error" in item:
                print(f"{item['filename']}: error: {item['error']['message']}", file=sys.stderr)
                continue
            ranked = ", ".join(f"{t['label']} {t['score']:.3f}" for t in item["top_k"])
            print(f"{item['filename']}: {ranked}")
    return 1 if failures else 0


def cmd_classify(args) -> int:
    import signal

    from imagerec.bulk import Terminated, classify, raise_terminated

    settings = Settings.from_env(
        engine=args.model_engine,
        top_k=args.top_k,
        classify_batch=args.batch_size,
        classify_threads=args.threads,
        commit_rows=args.commit_every,
        ray_actors=args.ray_actors,
    )
    on_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        result = classify(
            args.bundle,
            args.sources,
            args.out,
            engine=args.engine,
            model_engine=settings.engine,
            top_k=settings.top_k,
            batch_size=settings.classify_batch,
            threads=settings.classify_threads,
            commit_rows=settings.commit_rows,
            max_pixels=settings.max_pixels,
            ray_actors=settings.ray_actors,
        )
    except KeyboardInterrupt as stop:
        how = "stopped (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(
            f"imagerec: {how}; the rows written to {args.out} stay there, and the same "
            "command resumes after them",
            file=sys.stderr,
        )
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
    errors = ", ".join(f"{n} {code}" for code, n in sorted(result.error_codes.items()))
    print(
        f"wrote {result.written:,} rows to {result.out} in {result.seconds:.1f} s "
        f"({result.images_per_s:,.0f} images/s; model {result.model}, engine {result.engine})"
    )
    if result.skipped:
        print(f"{result.skipped:,} images were already there and were skipped")
    if result.errors:
        print(
            f"{result.errors:,} files could not be read or decoded ({errors}): see the error column"
        )
    return 0


def cmd_serve(args) -> int:
    from imagerec.server import serve

    settings = Settings.from_env(
        model=args.model,
        models=args.models,
        default_model=args.default_model,
        version_policy=args.version_policy,
        model_control=args.model_control,
        poll_interval_s=args.poll_interval,
        max_versions=args.max_versions,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        threads=args.threads,
        engine=args.engine,
        front=args.front,
    )
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
