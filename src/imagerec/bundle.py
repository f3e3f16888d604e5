"""The bundle: a model folder on disk, the contract between training and serving.

models/NAME/
    model.keras        Keras model, uint8-valued RGB pixels in, class probabilities out
    model.onnx, model-int8.onnx   (optional, `imagerec export`) the same model for ONNX Runtime
    labels.json        class names, index order
    preprocess.json    input size, colour order, mean/std, resize method, test-time augmentation
    metrics.json       validation accuracy, per-class accuracy, epochs, wall time, versions
    training.png, confusion.png   (optional) curves and confusion matrix
    MANIFEST.sha256    sha256 of every file above, in `sha256sum` format

A bundle is written to a temporary sibling folder and renamed into place, so an interrupted
save never leaves half a bundle and never destroys the previous one. Loading verifies the
manifest first and refuses a tampered or incomplete bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagerec.errors import BundleError

MANIFEST = "MANIFEST.sha256"
REQUIRED_FILES = ("model.keras", "labels.json", "preprocess.json", "metrics.json")
TTA_MODES = ("none", "flip")


@dataclass
class Preprocess:
    """How raw pixels reach the model. Normalisation itself lives inside the saved model."""

    input_size: tuple[int, int]  # (height, width)
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    color: str = "RGB"
    resize: str = "area-when-shrinking, bilinear-when-enlarging"
    tta: str = "none"

    def __post_init__(self):
        self.input_size = (int(self.input_size[0]), int(self.input_size[1]))
        if self.tta not in TTA_MODES:
            raise BundleError(f"preprocess.json: tta must be one of {TTA_MODES}, not {self.tta!r}")

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except (TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"preprocess.json is not valid: {exc}") from None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data


@dataclass
class Bundle:
    path: Path
    model: Any  # keras.Model, or None until load_keras_model (the ONNX engines need none)
    labels: list[str]
    preprocess: Preprocess
    metrics: dict
    version: str

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def load(cls, path: str | os.PathLike, keras_model: bool = True) -> Bundle:
        """Verify the manifest, read the metadata, then (unless `keras_model` is False) load the
        Keras model with safe_mode on. Without it, TensorFlow is not imported."""
        path = Path(path)
        version = verify_bundle(path)
        labels = _read_json(path / "labels.json")
        preprocess = Preprocess.from_dict(_read_json(path / "preprocess.json"))
        metrics = _read_json(path / "metrics.json")
        if not isinstance(labels, list) or len(labels) < 2:
            raise BundleError(f"{path}/labels.json must list at least two class names")
        bundle = cls(path, None, labels, preprocess, metrics, version)
        if keras_model:
            bundle.load_keras_model()
        return bundle

    def load_keras_model(self) -> Any:
        """The Keras model, loaded (once) with safe_mode on."""
        if self.model is not None:
            return self.model
        import keras  # deferred: importing TensorFlow takes seconds

        try:
            model = keras.models.load_model(
                self.path / "model.keras", compile=False, safe_mode=True
            )
        except Exception as exc:  # Keras raises many types for a bad archive
            raise BundleError(f"{self.path}/model.keras could not be loaded: {exc}") from None
        outputs = model.output_shape[-1]
        if outputs != len(self.labels):
            raise BundleError(
                f"{self.path}: the model has {outputs} outputs but {len(self.labels)} labels"
            )
        self.model = model
        return model

    def has_file(self, name: str) -> bool:
        """Whether the bundle holds `name` (the manifest was verified when it was loaded)."""
        return (self.path / name).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} could not be read: {exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundle(path: str | os.PathLike) -> str:
    """Check every file against MANIFEST.sha256; return the bundle version (manifest digest)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no model bundle at {path} (expected a folder with {MANIFEST})")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a complete bundle: {MANIFEST} is missing")
    text = manifest_path.read_text()
    listed = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise BundleError(f"{manifest_path} is malformed near {line[:80]!r}")
        listed[name] = digest
    missing = [name for name in REQUIRED_FILES if name not in listed]
    if missing:
        raise BundleError(f"{path} is incomplete: the manifest does not list {', '.join(missing)}")
    for name, digest in listed.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path} is incomplete: {name} is missing")
        if sha256_file(file) != digest:
            raise BundleError(
                f"{path}/{name} does not match {MANIFEST}: the bundle was modified or "
                "truncated after it was written; retrain or restore it"
            )
    return manifest_version(text)


def manifest_version(text: str) -> str:
    """The bundle version: 12 hex digits of the manifest's sha256."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_bundle(
    out: str | os.PathLike,
    model: Any,
    labels: list[str],
    preprocess: Preprocess,
    metrics: dict,
    artifacts: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete bundle to `out`, atomically replacing any bundle already there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {out.parent}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise BundleError(f"cannot write to {out.parent}: permission denied")
    _remove_stale_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    existed = (out / MANIFEST).exists()
    try:
        tmp.mkdir()
        model.save(tmp / "model.keras")
        files = {
            "labels.json": json.dumps(list(labels), indent=1),
            "preprocess.json": json.dumps(preprocess.to_dict(), indent=1),
        }
        for name, text in files.items():
            (tmp / name).write_text(text + "\n")
        _seal_into_place(tmp, out, metrics, artifacts or {})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _not_written(out, exc, existed) from None
        raise
    return out


def _not_written(out: Path, exc: OSError, existed: bool) -> BundleError:
    """A write that failed (a full disk, most often), said plainly: what is left is whole."""
    left = "the bundle already there is unchanged" if existed else "nothing was left behind"
    return BundleError(f"the bundle {out} could not be written: {exc.strerror or exc}; {left}")


def add_to_bundle(path: str | os.PathLike, files: dict[str, bytes], metrics: dict) -> str:
    """Add (or replace) `files` in a verified bundle and replace its metrics.json, atomically as
    write_bundle does: the bundle is copied, changed and renamed into place. Returns the new
    version."""
    path = Path(path)
    verify_bundle(path)
    if MANIFEST in files or any(name in REQUIRED_FILES for name in files):
        raise BundleError(f"add_to_bundle adds files; it does not replace {', '.join(files)}")
    _remove_stale_leftovers(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        shutil.copytree(path, tmp, ignore=shutil.ignore_patterns(MANIFEST, "metrics.json"))
        _seal_into_place(tmp, path, metrics, files)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _not_written(path, exc, existed=True) from None
        raise
    return verify_bundle(path)


def _seal_into_place(tmp: Path, out: Path, metrics: dict, files: dict[str, bytes]) -> None:
    """Write metrics.json and `files` into `tmp`, then its manifest; sync; rename it to `out`."""
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    names = sorted(p.name for p in tmp.iterdir())
    manifest = "".join(f"{sha256_file(tmp / n)}  {n}\n" for n in names)
    (tmp / MANIFEST).write_text(manifest)
    _fsync_tree(tmp)
    _swap_into_place(tmp, out)


def _remove_stale_leftovers(out: Path) -> None:
    """Temporary folders of writers that died (their pid is gone) would otherwise stay forever."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if not kind.endswith((".tmp", ".old")) or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)
