"""Datasets to arrays or streams: CIFAR-10 python batches and image folders, resizing, splitting.

Knows nothing of models. Two shapes come out:

- `ImageSet`: every image decoded into one (N, H, W, 3) uint8 RGB array, for data that fits
  in memory. A decoded image folder is cached on disk, keyed by its content, so the second
  load skips decoding.
- `StreamingImageSet`: paths and labels only, decoded per element by a tf.data pipeline, for a
  folder whose arrays would not fit in `memory_limit_bytes`.

Image files go through `imagerec.images.load_image`, the same decode path as serving. CIFAR
batches are pickles, read with an unpickler that can build numpy arrays and nothing else.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm import tqdm

from imagerec.errors import DatasetError, ImagerecError, InvalidInput
from imagerec.images import IMAGE_SUFFIXES, image_size, load_image, resize_image, sniff_format

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_SIZE = (32, 32)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_SPLITS = {
    "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
    "test": ("test_batch",),
}
CIFAR_META = "batches.meta"
# Bump when the cached array layout or the decode path changes, so old caches are not reused.
CACHE_FORMAT = 2  # 2: large JPEGs decoded scaled (images.decode_image fit)
MEMORY_LIMIT_BYTES = 2 << 30
DEFAULT_FOLDER_SIZE = (32, 32)
# A CIFAR batch is 30 MiB; anything far larger is not a CIFAR member and is not read into memory.
_MAX_MEMBER_BYTES = 256 << 20
_WARN_LIST = 10


@dataclass
class ImageSet:
    """Decoded images in memory."""

    x: np.ndarray  # (N, H, W, 3) uint8 RGB
    y: np.ndarray  # (N,) int32 class indices
    class_names: list[str]
    fingerprint: str  # sha256 over pixels, labels and class names

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[1]), int(self.x.shape[2])


@dataclass
class StreamingImageSet:
    """Image files decoded on demand, for a folder too large to hold in memory."""

    paths: list[Path]
    y: np.ndarray
    class_names: list[str]
    fingerprint: str
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.y)

    def to_tf_dataset(self, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
        """Batches of (uint8 (B, H, W, 3), int32 (B,)), decoded per element through images.py.

        An image that fails to decode is logged and dropped, so one bad file never stops a run.
        """
        import tensorflow as tf  # deferred: importing TensorFlow takes seconds

        height, width = self.image_size
        size = (height, width)
        # fsencode keeps non-ASCII (and non-UTF-8) file names intact through tf.string.
        paths = [os.fsencode(p) for p in self.paths]
        labels = np.asarray(self.y, dtype=np.int32)
        blank = np.zeros((height, width, 3), np.uint8)

        def decode(path: bytes, label: np.int32) -> tuple[np.ndarray, np.int32]:
            try:
                return load_image(os.fsdecode(path), size), np.int32(label)
            except ImagerecError as exc:
                log.warning("skipping unreadable image %s: %s", os.fsdecode(path), exc.message)
                return blank, np.int32(-1)

        def decode_tf(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            image, label = tf.numpy_function(
                decode, [path, label], [tf.uint8, tf.int32], stateful=False
            )
            image.set_shape((height, width, 3))
            label.set_shape(())
            return image, label

        dataset = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels))
        if shuffle:
            # The buffer holds paths, not pixels, so a full shuffle stays cheap.
            dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.map(decode_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.filter(lambda image, label: label >= 0)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def sample_arrays(self, n: int, seed: int) -> np.ndarray:
        """Decode up to n randomly chosen images (for mean/std) as (k, H, W, 3) uint8."""
        rng = np.random.default_rng(seed)
        count = min(int(n), len(self.paths))
        picked = np.sort(rng.choice(len(self.paths), size=count, replace=False))
        x, ok, _ = _decode_files([self.paths[i] for i in picked], self.image_size, "sampling")
        if not ok.any():
            raise DatasetError("none of the sampled images could be decoded")
        return x[ok] if not ok.all() else x


Dataset = TypeVar("Dataset", ImageSet, StreamingImageSet)


# Downloading


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch url to dest (via dest.part, renamed when complete) and verify its md5."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create {dest.parent}: {exc.strerror}") from None
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s to %s", url, dest)
    done = False
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with _progress(total, dest.name, unit="B") as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except (OSError, ValueError, HTTPException) as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", None) or exc
            raise DatasetError(f"could not download {url}: {reason}") from None
        if digest.hexdigest() != md5.lower():
            raise DatasetError(
                f"the download from {url} is corrupt: its md5 is {digest.hexdigest()}, "
                f"expected {md5}; nothing was kept, try again"
            )
        os.replace(part, dest)
        done = True
    finally:
        if not done:
            part.unlink(missing_ok=True)
    return dest


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _fetch_cifar10(cache_dir: Path | None, url: str, md5: str) -> bytes:
    """The tarball's bytes, downloaded into cache_dir unless a verified copy is already there."""
    cache_dir = _cache_root(cache_dir)
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "cifar-10-python.tar.gz"
    dest = cache_dir / name
    if dest.is_file():
        data = dest.read_bytes()
        if _md5_bytes(data) == md5.lower():
            return data
        log.warning("%s does not match its md5 %s; downloading it again", dest, md5)
        dest.unlink(missing_ok=True)
    download(url, dest, md5)
    # The bytes that get unpickled are the ones verified here, not a later re-read.
    data = dest.read_bytes()
    if _md5_bytes(data) != md5.lower():
        raise DatasetError(f"{dest} changed after it was downloaded; delete it and try again")
    return data


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from imagerec.config import Settings

    return Settings.from_env().cache_dir


# CIFAR-10 python batches


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1", errors)


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, whatever module holds it


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists and numpy arrays; refuses every other global (no code execution)."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a dataset pickle may only hold arrays"
            ) from None


def _unpickle(data: bytes, where: str) -> Any:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError,
            AttributeError, IndexError, KeyError) as exc:  # fmt: skip
        raise DatasetError(f"{where} is not a valid CIFAR-10 batch: {exc}") from None


def _get(batch: dict, key: str) -> Any:
    return batch.get(key.encode(), batch.get(key))


def _read_tar_members(tar: tarfile.TarFile, wanted: set[str], where: str) -> dict[str, bytes]:
    """Read the wanted members into memory; nothing is extracted to disk."""
    found: dict[str, bytes] = {}
    for member in tar:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or member.name.startswith("\\"):
            raise DatasetError(f"{where} holds a member with an unsafe path: {member.name!r}")
        if path.name not in wanted or len(path.parts) > 2:
            continue
        if not member.isfile():
            raise DatasetError(f"{where}: {member.name} is a link or special file, not a batch")
        if member.size > _MAX_MEMBER_BYTES:
            raise DatasetError(f"{where}: {member.name} is {member.size:,} bytes, too large")
        handle = tar.extractfile(member)
        if handle is not None:
            found[path.name] = handle.read()
    return found


def _read_cifar_tarball(source: Path | bytes, names: Iterable[str], where: str) -> dict[str, bytes]:
    wanted = {CIFAR_META, *names}
    try:
        opened = {"fileobj": io.BytesIO(source)} if isinstance(source, bytes) else {"name": source}
        with tarfile.open(mode="r:*", **opened) as tar:
            found = _read_tar_members(tar, wanted, where)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(f"{where} is not a readable CIFAR-10 tarball: {exc}") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise DatasetError(
            f"{where} is not a CIFAR-10 python archive: {', '.join(missing)} missing "
            f"(expected {CIFAR_FOLDER}/ with {CIFAR_META} and the data batches)"
        )
    return found


def _cifar_folder(path: Path) -> Path | None:
    """The cifar-10-batches-py folder at or inside path, or None."""
    if (path / CIFAR_META).is_file():
        return path
    if (path / CIFAR_FOLDER / CIFAR_META).is_file():
        return path / CIFAR_FOLDER
    return None


def _read_cifar_folder(path: Path, names: Iterable[str]) -> dict[str, bytes]:
    folder = _cifar_folder(path)
    if folder is None:
        raise DatasetError(f"{path} is not a CIFAR-10 folder: no {CIFAR_META} in it")
    found = {}
    for name in (CIFAR_META, *names):
        try:
            found[name] = (folder / name).read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read {folder / name}: {exc.strerror}") from None
    return found


def _cifar_imageset(files: dict[str, bytes], names: tuple[str, ...], where: str) -> ImageSet:
    meta = _unpickle(files[CIFAR_META], f"{where}: {CIFAR_META}")
    raw_names = _get(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(raw_names, list) or len(raw_names) < 2:
        raise DatasetError(f"{where}: {CIFAR_META} does not list the class names")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names]
    batches = []
    for name in names:
        batch = _unpickle(files[name], f"{where}: {name}")
        data = _get(batch, "data") if isinstance(batch, dict) else None
        labels = _get(batch, "labels") if isinstance(batch, dict) else None
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or (data.shape[1] != 3 * 32 * 32)
        ):
            raise DatasetError(f"{where}: {name} has no (N, 3072) uint8 'data' array")
        labels = np.asarray(labels) if isinstance(labels, list | np.ndarray) else None
        if (
            labels is None
            or labels.shape != (len(data),)
            or (len(labels) and not np.issubdtype(labels.dtype, np.integer))
        ):
            raise DatasetError(f"{where}: {name} has no integer 'labels' matching its data")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DatasetError(f"{where}: {name} has labels outside 0..{len(class_names) - 1}")
        batches.append((data, labels))
    total = sum(len(d) for d, _ in batches)
    x = np.empty((total, 32, 32, 3), np.uint8)
    y = np.empty(total, np.int32)
    start = 0
    for data, labels in batches:
        # Each row is 1024 red, 1024 green, 1024 blue values, each plane 32x32 row-major.
        x[start : start + len(data)] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y[start : start + len(data)] = labels
        start += len(data)
    if total == 0:
        raise DatasetError(f"{where} holds no images")
    return ImageSet(x, y, class_names, fingerprint_arrays(x, y, class_names))


def _is_cifar_name(source: object) -> bool:
    return source is None or (isinstance(source, str) and source.strip().lower() == "cifar10")


def load_cifar10(
    source: str | Path | None = None,
    split: str = "train",
    cache_dir: Path | None = None,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
) -> ImageSet:
    """CIFAR-10 from the web (cached, md5-verified), a cifar-10-python.tar.gz, or its folder."""
    if split not in CIFAR_SPLITS:
        raise InvalidInput(f"split must be one of {sorted(CIFAR_SPLITS)}, not {split!r}")
    names = CIFAR_SPLITS[split]
    if _is_cifar_name(source):
        where = url
        files = _read_cifar_tarball(_fetch_cifar10(cache_dir, url, md5), names, where)
    else:
        path = Path(source).expanduser()
        where = str(path)
        if not path.exists():
            raise DatasetError(f"no CIFAR-10 data at {path}: the path does not exist")
        if path.is_dir():
            files = _read_cifar_folder(path, names)
        else:
            files = _read_cifar_tarball(path, names, where)
    dataset = _cifar_imageset(files, names, where)
    log.info("loaded CIFAR-10 %s split: %d images from %s", split, len(dataset), where)
    return dataset


# Image folders


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _progress(total: int | None, desc: str, unit: str = "img") -> tqdm:
    # disable=None turns the bar off when stderr is not a terminal (logs, CI).
    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr, disable=None
    )


def _decode_files(
    paths: list[Path], size: tuple[int, int], desc: str
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decode into one preallocated array with a thread pool; returns (x, ok mask, errors)."""
    n = len(paths)
    x = np.empty((n, size[0], size[1], 3), np.uint8)
    ok = np.zeros(n, bool)
    errors: dict[int, str] = {}

    def work(start: int) -> int:
        stop = min(start + 256, n)
        for i in range(start, stop):
            try:
                x[i] = load_image(paths[i], size)
                ok[i] = True
            except ImagerecError as exc:
                errors[i] = exc.message
        return stop - start

    with ThreadPoolExecutor(_workers()) as pool, _progress(n, desc) as bar:
        for count in pool.map(work, range(0, n, 256)):
            bar.update(count)
    return x, ok, errors


def _warn_skipped(root: Path, skipped: list[str], total: int) -> None:
    if not skipped:
        return
    shown = ", ".join(skipped[:_WARN_LIST])
    more = f" and {len(skipped) - _WARN_LIST} more" if len(skipped) > _WARN_LIST else ""
    log.warning(
        "skipped %d of %d image files in %s that could not be decoded: %s%s",
        len(skipped), total, root, shown, more,
    )  # fmt: skip


def _scan_folder(
    root: Path, class_names: list[str] | None
) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths relative to root, labels); raises DatasetError on bad layouts."""
    if not root.exists():
        raise DatasetError(f"no dataset at {root}: the path does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of class folders")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if {"train", "val"} <= set(found):
        raise DatasetError(
            f"{root} has train/ and val/ folders: load it with load_dataset, not as classes"
        )
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DatasetError(
                f"{root} has classes the training data lacks: {', '.join(unknown[:_WARN_LIST])}"
            )
    index = {name: i for i, name in enumerate(class_names)}
    rels: list[str] = []
    labels: list[int] = []
    for name in found:
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, root)
            files.extend(
                os.path.join(rel_dir, f)
                for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
            )
        files.sort()
        rels.extend(files)
        labels.extend([index[name]] * len(files))
    if not rels:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        if not found:
            raise DatasetError(
                f"{root} has no class folders: expected {root}/<class>/<image> ({kinds})"
            )
        raise DatasetError(f"{root} holds no image files ({kinds}) in its class folders")
    return class_names, rels, labels


def _hash_files(root: Path, rels: list[str], header: dict, check: bool) -> tuple[str, list[int]]:
    """sha256 over the header, then every relative path and file's bytes; indices that fail
    a cheap header check when `check` is set (for streaming, where nothing is decoded yet)."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    bad: list[int] = []
    with _progress(len(rels), f"reading {root.name}") as bar:
        for i, rel in enumerate(rels):
            try:
                with open(root / rel, "rb") as handle:
                    data = handle.read()
            except OSError:
                data = b""
            digest.update(os.fsencode(rel) + f"\0{len(data)}\0".encode())
            digest.update(data)
            if check:
                try:
                    width, height = image_size(data, sniff_format(data))
                    if width <= 0 or height <= 0:
                        bad.append(i)
                except ImagerecError:
                    bad.append(i)
            bar.update(1)
    return digest.hexdigest(), bad


def _read_cache(path: Path, size: tuple[int, int], class_names: list[str]) -> ImageSet | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
            stored_names = [str(n) for n in archive["class_names"]]
            stored_fingerprint = str(archive["fingerprint"])
            skipped = [str(s) for s in archive["skipped"]]
        valid = (
            x.dtype == np.uint8
            and x.shape[1:] == (size[0], size[1], 3)
            and y.dtype == np.int32
            and y.shape == (len(x),)
            and stored_names == class_names
            and fingerprint_arrays(x, y, class_names) == stored_fingerprint
        )
        if not valid:
            raise ValueError("its contents do not match its fingerprint")
    except Exception as exc:  # a cut-short or corrupt cache is rebuilt, never fatal
        log.warning("the array cache %s is unreadable (%s); rebuilding it", path, exc)
        path.unlink(missing_ok=True)
        return None
    log.info("loaded %d decoded images from the cache %s", len(x), path)
    if skipped:
        log.warning(
            "%d image files were skipped as undecodable when this cache was built: %s%s",
            len(skipped), ", ".join(skipped[:_WARN_LIST]),
            " ..." if len(skipped) > _WARN_LIST else "",
        )  # fmt: skip
    return ImageSet(x, y, class_names, stored_fingerprint)


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a temporary file in the same folder, renamed into place."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning("could not write the array cache %s: %s", path, exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _check_size(image_size: tuple[int, int] | None) -> tuple[int, int]:
    if image_size is None:
        return DEFAULT_FOLDER_SIZE
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InvalidInput(f"image_size must be (height, width), not {image_size!r}") from None
    if height < 1 or width < 1:
        raise InvalidInput(f"image_size must be positive, not {image_size!r}")
    return height, width


def load_image_folder(
    root: Path,
    image_size: tuple[int, int],
    cache_dir: Path | None = None,
    memory_limit_bytes: int = MEMORY_LIMIT_BYTES,
    *,
    class_names: list[str] | None = None,
    min_classes: int = 2,
) -> ImageSet | StreamingImageSet:
    """An ImageNet-style folder (root/<class>/<image>) resized to image_size (height, width).

    Class names are the sorted folder names, or `class_names` (a val folder takes the train
    folder's). Files that fail to decode are skipped and reported in one warning.
    """
    root = Path(root).expanduser()
    size = _check_size(image_size)
    class_names, rels, label_list = _scan_folder(root, class_names)
    labels = np.asarray(label_list, np.int32)
    header = {"format": CACHE_FORMAT, "size": list(size), "classes": class_names}
    if len(rels) * size[0] * size[1] * 3 > memory_limit_bytes:
        return _streaming_set(root, rels, labels, class_names, size, header, min_classes)

    key, _ = _hash_files(root, rels, header, check=False)
    cache_file = _cache_root(cache_dir) / "arrays" / f"{key}.npz"
    cached = _read_cache(cache_file, size, class_names)
    if cached is not None:
        return cached

    x, ok, errors = _decode_files([root / r for r in rels], size, f"decoding {root.name}")
    skipped = [f"{rels[i]} ({errors[i]})" for i in sorted(errors)]
    _warn_skipped(root, skipped, len(rels))
    if not ok.all():
        x, labels = x[ok], labels[ok]
    _check_classes(root, labels, class_names, len(rels), min_classes)
    fingerprint = fingerprint_arrays(x, labels, class_names)
    _write_cache(
        cache_file,
        {
            "x": x,
            "y": labels,
            "class_names": np.array(class_names, dtype=str),
            "fingerprint": np.array(fingerprint),
            "skipped": np.array(skipped, dtype=str),
        },
    )
    log.info("decoded %d images in %d classes from %s", len(labels), len(class_names), root)
    return ImageSet(x, labels, class_names, fingerprint)


def _check_classes(
    root: Path, labels: np.ndarray, class_names: list[str], files: int, min_classes: int
) -> None:
    if len(labels) == 0:
        raise DatasetError(f"none of the {files} image files in {root} could be decoded")
    present = np.bincount(labels, minlength=len(class_names)) > 0
    if present.sum() < min_classes:
        raise DatasetError(
            f"{root} has images of {int(present.sum())} class(es) "
            f"({', '.join(n for n, p in zip(class_names, present, strict=True) if p)}); "
            f"a classifier needs at least {min_classes}"
        )
    empty = [name for name, p in zip(class_names, present, strict=True) if not p]
    if empty:
        log.warning("%s: no readable images for class(es) %s", root, ", ".join(empty))


def _streaming_set(
    root: Path,
    rels: list[str],
    labels: np.ndarray,
    class_names: list[str],
    size: tuple[int, int],
    header: dict,
    min_classes: int,
) -> StreamingImageSet:
    log.info(
        "%s: %d images at %dx%d exceed the memory limit; streaming them from disk",
        root, len(rels), size[0], size[1],
    )  # fmt: skip
    fingerprint, bad = _hash_files(root, rels, {**header, "streaming": True}, check=True)
    total = len(rels)
    if bad:
        _warn_skipped(root, [rels[i] for i in bad], len(rels))
        keep = np.ones(len(rels), bool)
        keep[bad] = False
        rels = [r for r, k in zip(rels, keep, strict=True) if k]
        labels = labels[keep]
    _check_classes(root, labels, class_names, total, min_classes)
    return StreamingImageSet([root / r for r in rels], labels, class_names, fingerprint, size)


# Datasets by name


def _is_cifar_spec(spec: str | Path) -> bool:
    if _is_cifar_name(spec):
        return True
    path = Path(spec).expanduser()
    return path.is_file() or (path.is_dir() and _cifar_folder(path) is not None)


def _resize_set(dataset: ImageSet, image_size: tuple[int, int] | None) -> ImageSet:
    if image_size is None:
        return dataset
    size = _check_size(image_size)
    if size == dataset.image_size:
        return dataset
    needed = len(dataset) * size[0] * size[1] * 3
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > physical // 2:
        raise DatasetError(
            f"resizing {len(dataset)} images to {size[0]}x{size[1]} needs {needed / 2**30:.1f} "
            f"GiB, more than half this machine's memory; choose a smaller image size"
        )
    x = np.empty((len(dataset), size[0], size[1], 3), np.uint8)

    def work(start: int) -> None:
        for i in range(start, min(start + 512, len(x))):
            x[i] = resize_image(dataset.x[i], size)

    with ThreadPoolExecutor(_workers()) as pool:
        list(pool.map(work, range(0, len(x), 512)))
    return ImageSet(
        x, dataset.y, dataset.class_names, fingerprint_arrays(x, dataset.y, dataset.class_names)
    )


def _missing(spec: str | Path) -> DatasetError:
    return DatasetError(
        f"no dataset at {spec}: expected 'cifar10', a cifar-10-python.tar.gz or its folder, "
        "or an image folder (root/<class>/<image>, or root/train and root/val)"
    )


def load_dataset(
    spec: str | Path, image_size: tuple[int, int] | None, cache_dir: Path | None = None
) -> tuple[ImageSet | StreamingImageSet, ImageSet | StreamingImageSet | None]:
    """(train, predefined validation set or None) for a `--data` value.

    CIFAR-10 gives its train split at 32x32 (resized when image_size differs); a folder with
    train/ and val/ gives both; a plain class folder gives everything. image_size None means
    32x32 for image folders.
    """
    if _is_cifar_spec(spec):
        train = load_cifar10(None if _is_cifar_name(spec) else spec, "train", cache_dir)
        return _resize_set(train, image_size), None
    root = Path(spec).expanduser()
    if not root.exists():
        raise _missing(spec)
    if (root / "train").is_dir():
        train = load_image_folder(root / "train", image_size, cache_dir)
        if not (root / "val").is_dir():
            log.info("%s has train/ but no val/; validation will be split from train", root)
            return train, None
        val = load_image_folder(
            root / "val", image_size, cache_dir, class_names=train.class_names, min_classes=1
        )
        return train, val
    return load_image_folder(root, image_size, cache_dir), None


def load_eval_dataset(
    spec: str | Path, image_size: tuple[int, int] | None, cache_dir: Path | None = None
) -> ImageSet | StreamingImageSet:
    """The labelled set `imagerec evaluate --data` scores: CIFAR's test split, a folder's val/,
    or a plain class folder whole."""
    if _is_cifar_spec(spec):
        test = load_cifar10(None if _is_cifar_name(spec) else spec, "test", cache_dir)
        return _resize_set(test, image_size)
    root = Path(spec).expanduser()
    if not root.exists():
        raise _missing(spec)
    if (root / "val").is_dir():
        class_names = None
        if (root / "train").is_dir():
            # Index labels as training did, so class i means the same thing in both.
            class_names = sorted(
                d.name for d in (root / "train").iterdir()
                if d.is_dir() and not d.name.startswith(".")
            )  # fmt: skip
        return load_image_folder(
            root / "val", image_size, cache_dir, class_names=class_names or None, min_classes=1
        )
    return load_image_folder(root, image_size, cache_dir, min_classes=1)


# Splitting and statistics


def stratified_split(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, val) with each class split in proportion; the same seed gives the same split.

    Every class with at least two items puts at least one in validation and keeps at least one
    for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInput(f"the validation fraction must be in [0, 1), not {val_fraction}")
    if val_fraction == 0:
        return ds, None
    rng = np.random.default_rng(seed)
    y = np.asarray(ds.y)
    val_parts = []
    for label in range(len(ds.class_names)):
        members = np.flatnonzero(y == label)
        if len(members) < 2:
            continue
        count = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val_parts.append(rng.permutation(members)[:count])
    if not val_parts:
        log.warning(
            "no class has two items to split; training on all %d without validation", len(y)
        )
        return ds, None
    val_index = np.sort(np.concatenate(val_parts))
    is_val = np.zeros(len(y), bool)
    is_val[val_index] = True
    train_index = np.flatnonzero(~is_val)
    return _subset(ds, train_index, "train"), _subset(ds, val_index, "val")


def _subset(ds: Dataset, index: np.ndarray, role: str) -> Dataset:
    if isinstance(ds, ImageSet):
        x, y = ds.x[index], ds.y[index]
        return ImageSet(x, y, list(ds.class_names), fingerprint_arrays(x, y, ds.class_names))
    digest = hashlib.sha256(f"{ds.fingerprint}\0{role}\0".encode())
    digest.update(np.asarray(index, "<i8").tobytes())
    return StreamingImageSet(
        [ds.paths[i] for i in index], ds.y[index], list(ds.class_names), digest.hexdigest(),
        ds.image_size,
    )  # fmt: skip


def fingerprint_arrays(x: np.ndarray, y: np.ndarray, class_names: list[str]) -> str:
    """sha256 hex over shape, class names, labels and pixels (hashed in chunks, no copy)."""
    digest = hashlib.sha256(json.dumps({"shape": list(x.shape), "classes": class_names}).encode())
    digest.update(np.ascontiguousarray(y, "<i4").tobytes())
    step = max(1, (64 << 20) // max(1, x[0].nbytes if len(x) else 1))
    for start in range(0, len(x), step):
        digest.update(np.ascontiguousarray(x[start : start + step]).data)
    return digest.hexdigest()


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images, in 0..255 units.

    Accumulates in float64 one chunk at a time, merging chunk moments (Chan et al.), so it never
    makes a float copy of all of x and stays exact enough for millions of pixels.
    """
    if x.ndim < 2 or x.shape[-1] != 3 or x.size == 0:
        raise InvalidInput(f"channel_stats needs a non-empty (..., 3) array, not {x.shape}")
    per_row = x[0].size // 3
    # About 64k pixels a chunk keeps the float64 scratch inside the CPU cache.
    step = max(1, (1 << 16) // per_row)
    count, mean, m2 = 0, np.zeros(3), np.zeros(3)
    for start in range(0, len(x), step):
        chunk = x[start : start + step].reshape(-1, 3).astype(np.float64)
        n = len(chunk)
        chunk_mean = chunk.mean(axis=0)
        chunk -= chunk_mean
        chunk_m2 = np.einsum("ij,ij->j", chunk, chunk)
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * n / total)
        count = total
    return [float(v) for v in mean], [float(v) for v in np.sqrt(m2 / count)]
