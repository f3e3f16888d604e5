"""ImageNet-pretrained backbones from keras.applications, and their weight files.

The file names, URL paths and hashes below are those of Keras 3.15.1
(keras/src/applications/mobilenet_v2.py, mobilenet_v3.py, efficientnet_v2.py and
imagenet_utils.py). Keras' own downloader is not used: `fetch` is the one download path, so a
mirror or a test's local server can stand in for Keras' host (`IMAGEREC_WEIGHTS_URL`), the
download is all or nothing, and a failure names the file to place by hand. Files land where
Keras caches them (`$KERAS_HOME/models`, default `~/.keras/models`), so either finds the other's.
Nothing here imports Keras: the CLI can fail on a missing file before loading anything heavy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from imagerec.errors import ImagerecError, WeightsUnavailable

log = logging.getLogger(__name__)

KERAS_VERSION = "3.15.1"  # the Keras release the table below was read from
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/"  # Keras' host; every path is under it
_APPLICATIONS = "tensorflow/keras-applications/"
WEIGHTS_CHOICES = "imagenet, none or a weight file"


@dataclass(frozen=True)
class WeightFile:
    name: str  # the file name in the cache, as Keras names it
    path: str  # under the base URL
    hash: str | None  # as Keras publishes it; None: Keras publishes none for this file

    @property
    def algorithm(self) -> str:
        # Keras' get_file reads a 64-digit hash as sha256 and any other as md5 (all are md5
        # here); a file without a published hash is recorded by its sha256.
        return "md5" if self.hash and len(self.hash) == 32 else "sha256"

    def url(self, base_url: str) -> str:
        return base_url.rstrip("/") + "/" + self.path


@dataclass(frozen=True)
class Backbone:
    arch: str  # the --arch name
    constructor: str  # the keras.applications function
    default_size: int  # the input side its ImageNet weights were trained at
    notop: WeightFile  # the feature extractor, for fine-tuning
    top: WeightFile  # with its 1000-class ImageNet classifier, for import-keras
    imagenet_top1: float  # ImageNet top-1 accuracy that Keras' documentation reports
    top1_source: str  # where that figure is stated
    preprocessing_inside: bool  # the constructor's include_preprocessing puts it in the model


def _mobilenet_v2_file(size: int, top: bool) -> WeightFile:
    name = (
        f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}{'' if top else '_no_top'}.h5"
    )
    return WeightFile(name, f"{_APPLICATIONS}mobilenet_v2/{name}", None)


def _mobilenet_v3_file(model: str, top: bool, file_hash: str) -> WeightFile:
    name = f"weights_mobilenet_v3_{model}_224_1.0_float{'' if top else '_no_top_v2'}.h5"
    return WeightFile(name, f"{_APPLICATIONS}mobilenet_v3/{name}", file_hash)


_KERAS_TABLE = "https://keras.io/api/applications/ (the table of available models)"
_MOBILENET_V3_TABLE = "Keras' MobileNetV3 documentation (keras.applications.MobileNetV3Large)"

BACKBONES: dict[str, Backbone] = {
    "mobilenetv2": Backbone(
        "mobilenetv2",
        "MobileNetV2",
        224,
        _mobilenet_v2_file(224, top=False),
        _mobilenet_v2_file(224, top=True),
        0.713,
        _KERAS_TABLE,
        False,
    ),
    "mobilenetv3-large": Backbone(
        "mobilenetv3-large",
        "MobileNetV3Large",
        224,
        _mobilenet_v3_file("large", False, "07fb09a5933dd0c8eaafa16978110389"),
        _mobilenet_v3_file("large", True, "59e551e166be033d707958cf9e29a6a7"),
        0.756,
        _MOBILENET_V3_TABLE,
        True,
    ),
    "mobilenetv3-small": Backbone(
        "mobilenetv3-small",
        "MobileNetV3Small",
        224,
        _mobilenet_v3_file("small", False, "d3e8ec802a04aa4fc771ee12a9a9b836"),
        _mobilenet_v3_file("small", True, "8768d4c2e7dee89b9d02b2d03d65d862"),
        0.681,
        _MOBILENET_V3_TABLE,
        True,
    ),
    "efficientnetv2-b0": Backbone(
        "efficientnetv2-b0",
        "EfficientNetV2B0",
        224,
        WeightFile(
            "efficientnetv2-b0_notop.h5",
            f"{_APPLICATIONS}efficientnet_v2/efficientnetv2-b0_notop.h5",
            "893217f2bb855e2983157299931e43ff",
        ),
        WeightFile(
            "efficientnetv2-b0.h5",
            f"{_APPLICATIONS}efficientnet_v2/efficientnetv2-b0.h5",
            "21ecbf6da12460d5c40bb2f29ceb2188",
        ),
        0.787,
        _KERAS_TABLE,
        True,
    ),
}
# imagenet_utils.decode_predictions' class names: index -> [WordNet id, name].
IMAGENET_CLASS_INDEX = WeightFile(
    "imagenet_class_index.json",
    "download.tensorflow.org/data/imagenet_class_index.json",
    "c2c37ea517e94d9795004a39431a14cb",
)
# MobileNetV2's ImageNet weights come in these input sizes (Keras picks 224 for any other).
MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)


def backbone(arch: str) -> Backbone:
    try:
        return BACKBONES[arch]
    except KeyError:
        raise ImagerecError(
            f"unknown backbone {arch!r}; choose from {', '.join(BACKBONES)}", code="usage"
        ) from None


def notop_file(arch: str, size: int) -> WeightFile:
    """The feature-extractor weights for `arch` at input side `size`."""
    if arch == "mobilenetv2":
        return _mobilenet_v2_file(size if size in MOBILENET_V2_SIZES else 224, top=False)
    return backbone(arch).notop


def keras_cache_dir() -> Path:
    """Where Keras keeps application weights: $KERAS_HOME/models, default ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(home) / "models"


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Weights:
    """Where a model's starting weights come from, as metrics.json records it."""

    path: Path | None  # the file to load; None: random initialisation
    record: dict


TRAIN_WITHOUT = "; or train from random weights with --weights none"


def _instructions(url: str, dest: Path, otherwise: str) -> str:
    return (
        f"To use it offline, download {url} on a machine with a network and place it at "
        f"{dest} (the Keras cache: $KERAS_HOME/models, default ~/.keras/models), or point "
        f"IMAGEREC_WEIGHTS_URL at a mirror holding the same paths{otherwise}"
    )


def fetch(
    file: WeightFile,
    base_url: str = KERAS_WEIGHTS_URL,
    timeout_s: float = 10.0,
    otherwise: str = TRAIN_WITHOUT,
) -> Path:
    """The cached copy of `file`, downloaded first if the cache lacks it (or holds a copy whose
    hash is not the published one). The download goes to a temporary file beside its
    destination and is renamed into place only once its hash matches, so the cache never holds
    part of a file. Raises WeightsUnavailable, naming the URL, where to place the file and
    `otherwise`, the way round it."""
    cache = keras_cache_dir()
    dest = cache / file.name
    url = file.url(base_url)
    if dest.is_file():
        if file.hash is None or file_digest(dest, file.algorithm) == file.hash:
            log.debug("using the cached %s", dest)
            return dest
        log.warning("%s is not the published file (%s mismatch): downloading it again", dest,
                    file.algorithm)  # fmt: skip
    log.info("downloading %s to %s", url, dest)
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        raise WeightsUnavailable(
            f"could not download {file.name}: {url} answered {exc.code} {exc.reason}. "
            + _instructions(url, dest, otherwise)
        ) from None
    except (OSError, ValueError, HTTPException) as exc:  # URLError and timeouts are OSErrors
        reason = getattr(exc, "reason", None) or exc
        raise WeightsUnavailable(
            f"could not download {file.name} from {url}: {reason}. "
            + _instructions(url, dest, otherwise)
        ) from None
    with response:
        return _save(response, file, url, dest, otherwise)


def _save(response, file: WeightFile, url: str, dest: Path, otherwise: str) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{file.name}.")
    except OSError as exc:
        raise WeightsUnavailable(f"cannot write to {dest.parent}: {exc.strerror}") from None
    part = Path(name)
    digest = hashlib.new(file.algorithm, usedforsecurity=False)
    done = False
    try:
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            os.fdopen(descriptor, "wb") as handle,
            tqdm(total=total, desc=file.name, unit="B", unit_scale=True) as bar,
        ):
            try:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    handle.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            except (OSError, HTTPException) as exc:
                raise WeightsUnavailable(
                    f"the download of {url} broke off: {exc}; nothing was kept. "
                    + _instructions(url, dest, otherwise)
                ) from None
            handle.flush()
            os.fsync(handle.fileno())
        if file.hash is not None and digest.hexdigest() != file.hash:
            raise WeightsUnavailable(
                f"{url} is not the published {file.name}: its {file.algorithm} is "
                f"{digest.hexdigest()}, Keras {KERAS_VERSION} publishes {file.hash}; nothing "
                "was kept. " + _instructions(url, dest, otherwise)
            )
        if file.hash is None:
            log.warning(
                "Keras publishes no hash for %s; its %s is %s (recorded in the bundle)",
                file.name, file.algorithm, digest.hexdigest(),
            )  # fmt: skip
        os.chmod(part, 0o644)  # mkstemp's 0600 would hide the cache from other users
        os.replace(part, dest)
        done = True
    finally:
        if not done:
            part.unlink(missing_ok=True)
    return dest


def _record(file: WeightFile, base_url: str, path: Path) -> dict:
    return {
        "source": "imagenet",
        "url": file.url(base_url),
        "file": file.name,
        file.algorithm: file.hash or file_digest(path, file.algorithm),
        "hash_published_by_keras": file.hash is not None,
        "keras_table_version": KERAS_VERSION,
    }


def resolve_weights(
    arch: str, weights: str, size: int, base_url: str = KERAS_WEIGHTS_URL, timeout_s: float = 10.0
) -> Weights:
    """The starting weights for a backbone: 'imagenet' (fetched), 'none' or a weight file."""
    if weights == "none":
        return Weights(None, {"source": "none"})
    if weights == "imagenet":
        file = notop_file(arch, size)
        path = fetch(file, base_url, timeout_s)
        return Weights(path, _record(file, base_url, path))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ImagerecError(
            f"--weights {weights}: no such file (expected {WEIGHTS_CHOICES})", code="usage"
        )
    if path.suffix not in (".h5", ".hdf5", ".keras") and not path.name.endswith(".weights.h5"):
        raise ImagerecError(
            f"--weights {weights}: Keras loads weights from .h5 or .weights.h5 files", code="usage"
        )
    return Weights(
        path.resolve(),
        {"source": "file", "path": str(path.resolve()), "sha256": file_digest(path, "sha256")},
    )


def imagenet_labels(
    base_url: str = KERAS_WEIGHTS_URL, timeout_s: float = 10.0, otherwise: str = ""
) -> list[str]:
    """The 1000 ImageNet class names in index order, from Keras' class index file.

    Two names occur twice in it (crane the bird and the machine, maillot); those get their
    WordNet id appended so that every label names one class.
    """
    path = fetch(IMAGENET_CLASS_INDEX, base_url, timeout_s, otherwise)
    try:
        index = json.loads(path.read_text())
        pairs = [index[str(i)] for i in range(1000)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsUnavailable(f"{path} is not ImageNet's class index: {exc}") from None
    names = [name for _, name in pairs]
    return [f"{name} ({wnid})" if names.count(name) > 1 else name for (wnid, name) in pairs]


def import_keras(
    arch: str, out: str | os.PathLike, base_url: str = KERAS_WEIGHTS_URL, timeout_s: float = 10.0
) -> Path:
    """Write Keras' pretrained 1000-class ImageNet model for `arch` as a verified bundle at
    `out`: its weights and ImageNet's labels fetched as above, RGB 0..255 in at the backbone's
    default size (serving resizes any photo to it), its own scaling inside the model."""
    spec = backbone(arch)
    out = Path(out)
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not (out / "MANIFEST.sha256").is_file():
        raise ImagerecError(
            f"--out {out} exists and is not a model bundle; refusing to replace it",
            code="bad_output",
        )
    # Both files before TensorFlow is imported: a machine without them fails in seconds.
    weights = fetch(spec.top, base_url, timeout_s, otherwise="")
    labels = imagenet_labels(base_url, timeout_s)
    from imagerec.tfimport import import_tensorflow

    import_tensorflow()
    import keras

    from imagerec.bundle import Preprocess, write_bundle
    from imagerec.models import imagenet_classifier

    try:
        model = imagenet_classifier(arch, weights)
    except ValueError as exc:  # Keras' loader: a file of other layers or shapes
        raise WeightsUnavailable(
            f"{weights} does not fit Keras' {spec.constructor}: {exc}"
        ) from None
    metrics = {
        "arch": arch,
        "backbone": {
            "name": arch,
            "keras_application": spec.constructor,
            "input_size": [spec.default_size, spec.default_size],
            "weights": _record(spec.top, base_url, weights),
            "labels": {
                "url": IMAGENET_CLASS_INDEX.url(base_url),
                "md5": IMAGENET_CLASS_INDEX.hash,
            },
        },
        # Not measured here: the figure Keras' documentation reports for these weights.
        "imagenet_top1_reported": spec.imagenet_top1,
        "imagenet_top1_source": spec.top1_source,
        "val_accuracy": None,
        "val_count": 0,
        "versions": {"keras": keras.__version__},
    }
    size = (spec.default_size, spec.default_size)
    # Keras' published accuracy is of one view: no test-time mirror here.
    preprocess = Preprocess(input_size=size, tta="none")
    return write_bundle(out, model, labels, preprocess, metrics)
