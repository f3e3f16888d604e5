"""Label whole archives into a table: `imagerec classify BUNDLE SOURCE... --out results.parquet`.

Two engines run the same decode (read_image: images.load_image) and the same Predictor:

- `local` streams in this process: sources are enumerated lazily, a pool of threads (one a core)
  each reads, decodes and classifies a batch in its own ONNX Runtime session, so one batch
  decodes while another is classified, a bounded window of batches ahead, and rows are committed
  every `commit_rows` images (or `commit_s` seconds). Memory stays bounded whatever the count:
  the window of batches, one uncommitted chunk of rows, and 8 bytes per image already done (a
  hash of its path, for resuming).
- `ray` (imagerec.bulk_ray) runs it on Ray Data: decode in a `map_batches` stage, classify in
  an actor pool that loads the bundle once per actor; the rows stream back and are committed
  here as the local engine's are.

Outputs commit atomically, so a run killed at any instant is resumed by the same command:
what is committed is skipped, what is not is done again, and no row is written twice. Each row
names the model that labelled it (`model`, `model_version`), and a run with another model than
the output's is refused rather than mixed in.

- `.parquet`: a folder of `part-NNNNNN.parquet` files, each written under a hidden temporary
  name, synced and renamed into place; pyarrow, pandas, Polars, DuckDB and Spark read the folder
  as one table.
- `.csv`, `.jsonl`: one file, appended. A hidden sidecar (`.NAME.progress`) records the length
  of the committed part; a resumed run cuts anything after it, and the finished run removes it.
"""

from __future__ import annotations

import codecs
import csv
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagerec.engines import usable_cores
from imagerec.errors import ImagerecError, InvalidImage, InvalidInput, PayloadTooLarge
from imagerec.images import IMAGE_SUFFIXES, load_image

log = logging.getLogger(__name__)

FORMATS = (".parquet", ".csv", ".jsonl")
COLUMNS = ("path", "label", "score", "top_k", "error", "model", "model_version")
PART_NAME = re.compile(r"^part-(\d{6,})\.parquet$")
SUMMARY_FILE = "_imagerec.json"  # in a Parquet folder: readers skip names starting with "_"
LOCK_FILE = "_imagerec.lock"  # in a Parquet folder, held by the run that writes it
STDIN = "-"  # the source that is a path list read from standard input
MAX_BATCH = 4096  # images a batch, at most
# Threads a run (or a Ray actor) at most: each holds an ONNX Runtime session and two batches,
# 6.6 MB a thread with the bundled model (500 threads peaked at 3.3 GB), and 256 reads at once
# already keep a network file system busy.
MAX_THREADS = 256
# Paths hashed per step when skipping what a resumed run has done.
_FILTER_CHUNK = 4096


@dataclass
class BulkResult:
    """What one run did: rows written now, how many of them are errors, rows already there."""

    out: Path
    written: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    model: str = ""
    engine: str = ""
    error_codes: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


# Sources ------------------------------------------------------------------------------------


def iter_sources(sources: Iterable[str | os.PathLike], quiet: bool = False) -> Iterator[str]:
    """Every image path the sources name, lazily, in a stable order, each image file once
    however many sources reach it (but for a path list's own lines).

    A folder is walked recursively in sorted order for files with an image suffix, into linked
    folders too (each folder once, so a link back up the tree ends); one that cannot be listed
    is skipped with a warning (none if `quiet`). A file with an image suffix is itself; any other
    file lists paths, one a line (blank lines and lines starting with # are skipped), and `-`
    is such a list read from standard input (`find ... | imagerec classify BUNDLE - ...`), its
    names as the file system's bytes, as is a pipe named as a file (the shell's
    `<(find ...)`); anything else is a glob pattern (`**` recurses)."""
    seen = _Seen()
    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if text == STDIN:
            yield from _path_lines(os.fsdecode(line) for line in sys.stdin.buffer)
        elif _is_piped_list(text):
            with open(text, "rb") as lines:
                yield from _path_lines(os.fsdecode(line) for line in lines)
        elif path.is_dir():
            yield from _walk(text, seen, quiet)
        elif path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if seen.first_naming(text):
                    yield text
            else:
                yield from _listed(path)
        elif os.path.exists(text):  # a device, or a pipe named as an image: an error row
            if seen.first_naming(text):
                yield text
        elif glob.has_magic(text):
            yield from _globbed(text, seen, quiet)
        else:
            raise InvalidInput(f"{text}: no such folder, file or glob pattern", code="no_source")


def _is_piped_list(source: str) -> bool:
    """Whether `source` is a pipe (a FIFO, or the shell's `<(...)`) to be read as a path list;
    one with an image's suffix is left to be an error row, as it is in a list."""
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) and os.path.splitext(source)[1].lower() not in IMAGE_SUFFIXES


def check_sources(sources: Iterable[str | os.PathLike], out: Path | None = None) -> None:
    """Raise InvalidInput, before any work starts, for a source that names nothing, a file
    given as a path list whose start is not text, or a source that is the output `out` itself:
    a results table read as a path list would have each of its own lines added to it as an
    unreadable path."""
    for source in sources:
        text = os.fspath(source)
        if not (text == STDIN or os.path.exists(text) or glob.has_magic(text)):
            raise InvalidInput(f"{text}: no such folder, file or glob pattern", code="no_source")
        if os.path.isfile(text) and os.path.splitext(text)[1].lower() not in IMAGE_SUFFIXES:
            _check_list_start(text)
        if out is not None and text != STDIN and _same_file(text, out):
            raise InvalidInput(
                f"{text} is the output (--out) as well: name the images to label as SOURCE, "
                "and another --out",
                code="usage",
            )


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing
        return False


class _Seen:
    """What one run's sources have reached so far, each as (device, inode): the folders walked,
    so that a folder reached again (through a link, or by another source) is not walked twice,
    and the image files named one by one (by a source or a glob)."""

    def __init__(self):
        self.folders: set[tuple[int, int]] = set()
        self.files: set[tuple[int, int]] = set()
        self.last_folder: tuple[str, tuple[int, int]] = ("", (0, 0))  # a glob's files in turn

    def first_walk(self, folder: str) -> bool:
        key = _file_id(folder)
        if key in self.folders:
            return False
        self.folders.add(key)
        return True

    def first_naming(self, file: str) -> bool:
        try:
            folder = os.path.dirname(os.path.abspath(file))
            if folder != self.last_folder[0]:
                self.last_folder = (folder, _file_id(folder))
            if self.last_folder[1] in self.folders:
                return False  # its folder's walk named it
            key = _file_id(file)
        except OSError:  # a dangling link, say: named, to become an error row
            return True
        if key in self.files:
            return False
        self.files.add(key)
        return True

    def walk_names(self, file: str) -> bool:
        """Whether a walk should name `file` (not if it was named one by one already)."""
        if not self.files:  # the usual case: a folder alone costs no stat a file
            return True
        try:
            return _file_id(file) not in self.files
        except OSError:
            return True


def _file_id(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _walk(root: str, seen: _Seen, quiet: bool) -> Iterator[str]:
    def unlisted(error: OSError) -> None:
        if not quiet:  # the images in it get no rows: say so rather than lose them silently
            log.warning("cannot list %s (%s): its images are left out", error.filename, error)

    for folder, subfolders, files in os.walk(root, onerror=unlisted, followlinks=True):
        try:
            first = seen.first_walk(folder)
        except OSError as error:
            unlisted(error)
            subfolders.clear()
            continue
        if not first:
            subfolders.clear()
            continue
        subfolders.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                file = os.path.join(folder, name)
                if seen.walk_names(file):
                    yield file


def _path_lines(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def _listed(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as lines:
            yield from _path_lines(lines)
    except UnicodeDecodeError:
        raise _not_a_list(path) from None


def _not_a_list(path: str | os.PathLike) -> InvalidInput:
    return InvalidInput(
        f"{path} is neither an image (by its suffix) nor a UTF-8 text file listing paths",
        code="no_source",
    )


def _check_list_start(path: str) -> None:
    """_not_a_list raised at once where the start of a file given as a path list is not UTF-8
    text (a model, an archive, a PDF named by mistake), before any output is made or Ray
    started; the rest of the file is checked as it is read."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(1 << 16)
    except OSError:
        return  # the run says what stops it when it reads the file
    try:  # incrementally: a character that the 64 KB cut in two is not an error
        codecs.getincrementaldecoder("utf-8")().decode(start)
    except UnicodeDecodeError:
        raise _not_a_list(path) from None
    if b"\0" in start:  # valid UTF-8, but no path holds one
        raise _not_a_list(path)


def _globbed(pattern: str, seen: _Seen, quiet: bool) -> Iterator[str]:
    # Shallowest first: where `**` reaches a file by more than one path (through a link), the
    # shortest is the one named.
    matches = sorted(glob.iglob(pattern, recursive=True), key=lambda m: (m.count(os.sep), m))
    for match in matches:
        if os.path.isdir(match):
            yield from _walk(match, seen, quiet)
        elif os.path.splitext(match)[1].lower() in IMAGE_SUFFIXES and seen.first_naming(match):
            yield match  # unless a walk named it: `dir/**` names a folder and its files both


def count_sources(sources: list[str], stop: threading.Event) -> int | None:
    """How many paths the sources name (None if stopped first, if standard input or a pipe is
    one of them: it can be read only once, or if a source cannot be read: the run itself stops
    on it with its message): the progress bar's total."""
    if any(source == STDIN or _is_piped_list(os.fspath(source)) for source in sources):
        return None
    count = 0
    try:
        for _ in iter_sources(sources, quiet=True):  # the run itself gives any warnings
            if stop.is_set():
                return None
            count += 1
    except (ImagerecError, OSError):
        return None
    return count


# Resuming -----------------------------------------------------------------------------------


def path_text(path: str) -> str:
    """A path as the output holds it: itself, or, where the name is not UTF-8 (Python holds its
    bytes as surrogates, and no output format can), those bytes as \\xNN escapes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return path


def path_hashes(paths: Iterable[str]) -> np.ndarray:
    """64-bit hashes of paths as the output holds them (path_text; blake2b): 8 bytes each to
    remember what is done."""
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(path_text(p).encode("utf-8"), digest_size=8).digest(), "little"
            )
            for p in paths
        ),
        dtype=np.uint64,
    )


def skip_done(paths: Iterable[str], done: np.ndarray) -> Iterator[str]:
    """`paths` without those whose hash is in the sorted array `done`."""
    if len(done) == 0:
        yield from paths
        return
    chunk: list[str] = []
    for path in paths:
        chunk.append(path)
        if len(chunk) == _FILTER_CHUNK:
            yield from _pending(chunk, done)
            chunk = []
    yield from _pending(chunk, done)


def _pending(chunk: list[str], done: np.ndarray) -> list[str]:
    if not chunk:
        return []
    hashes = path_hashes(chunk)
    at = np.minimum(np.searchsorted(done, hashes), len(done) - 1)
    seen = done[at] == hashes
    return [p for p, s in zip(chunk, seen, strict=True) if not s]


# Rows ---------------------------------------------------------------------------------------


class Rows:
    """Result rows, in the order their images were enumerated, held as columns: each batch adds
    its paths, the class indices and scores of its top k (an (n, k) array each, zeros on a row
    with an error) and its errors (None where the image was classified). The table's columns are
    built from these arrays at commit, with no Python object a row for Parquet."""

    def __init__(self, labels: Sequence[str] = (), k: int = 1):
        self.labels, self.k = list(labels), k
        self.path: list[str] = []
        self.error: list[dict | None] = []
        self._top: list[np.ndarray] = []
        self._score: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.path)

    def add(self, paths: list[str], top: np.ndarray, score: np.ndarray, errors: list) -> None:
        self.path.extend(map(path_text, paths))
        self.error.extend(
            None if e is None else {"code": e["code"], "message": path_text(e["message"])}
            for e in errors
        )
        self._top.append(top)
        self._score.append(score)

    def extend(self, other: Rows) -> None:
        self.path.extend(other.path)
        self.error.extend(other.error)
        self._top.extend(other._top)
        self._score.extend(other._score)

    def errors(self) -> int:
        return sum(e is not None for e in self.error)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top-k class indices, their scores, ok mask) for every row."""
        if not self._top:
            return np.zeros((0, self.k), np.int64), np.zeros((0, self.k)), np.zeros(0, bool)
        ok = np.fromiter((e is None for e in self.error), bool, len(self.error))
        return np.concatenate(self._top), np.concatenate(self._score), ok

    def records(self, model: dict) -> Iterator[dict]:
        """Each row as a dict of COLUMNS, `model` ({"name", "version"}) the one that labelled
        them."""
        top, score, ok = self.columns()
        made_by = {"model": model["name"], "model_version": model["version"]}
        for i, path in enumerate(self.path):
            if not ok[i]:
                yield dict(
                    path=path, label=None, score=None, top_k=None, error=self.error[i], **made_by
                )
                continue
            ranked = [
                {"label": self.labels[c], "score": float(s)}
                for c, s in zip(top[i], score[i], strict=True)
            ]
            first = ranked[0]
            yield dict(
                path=path,
                label=first["label"],
                score=first["score"],
                top_k=ranked,
                error=None,
                **made_by,
            )

    def to_arrow(self, model: dict):
        import pyarrow as pa

        schema = arrow_schema()
        top, score, ok = self.columns()
        names = _text_array(self.labels)
        pairs = pa.StructArray.from_arrays(
            [names.take(_number_array(top.ravel())), _number_array(score.ravel())],
            fields=list(schema.field("top_k").type.value_type),
        )
        offsets = _number_array(np.arange(0, top.size + 1, self.k, dtype=np.int32))
        codes = [None if e is None else e["code"] for e in self.error]
        messages = [None if e is None else e["message"] for e in self.error]
        columns = {
            "path": _text_array(self.path),
            "label": names.take(_number_array(top[:, 0], ok)),
            "score": _number_array(score[:, 0], ok),
            "top_k": pa.ListArray.from_arrays(offsets, pairs, mask=_bool_array(~ok)),
            "error": pa.StructArray.from_arrays(
                [_text_array(codes), _text_array(messages)],
                fields=list(schema.field("error").type),
                mask=_bool_array(ok),
            ),
            "model": _repeated_text(model["name"], len(self.path)),
            "model_version": _repeated_text(model["version"], len(self.path)),
        }
        return pa.table(columns, schema=schema)


# Arrow columns straight from their buffers. pa.array would do, but its first call imports
# pandas where it is installed (pyarrow's check for pandas objects), a third of a second of CPU
# at the first commit, longer than many a run's images take.


def _validity(valid: np.ndarray | None):
    """Arrow's validity bitmap for a mask of rows that hold a value (None: all of them)."""
    import pyarrow as pa

    return None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _number_array(values: np.ndarray, valid: np.ndarray | None = None):
    """An Arrow array of a 1-d numeric array's values, null where `valid` is False."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    kind = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(
        kind, len(values), [_validity(valid), pa.py_buffer(values)], null_count=-1
    )


def _bool_array(values: np.ndarray):
    """An Arrow boolean array of a mask (as `mask=` takes it)."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.bool_(), len(values), [None, _validity(values)])


def _text_array(values: Sequence[str | None]):
    """An Arrow string array of `values` (None a null), from their UTF-8 bytes."""
    import pyarrow as pa

    data = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    return pa.Array.from_buffers(
        pa.large_string(),
        len(data),
        [
            _validity(None if valid.all() else valid),
            pa.py_buffer(offsets),
            pa.py_buffer(b"".join(data)),
        ],
    ).cast(pa.string())


def _repeated_text(value: str, n: int):
    """An Arrow string array of `value` n times (Parquet keeps it once a part, in its
    dictionary)."""
    return _text_array([value]).take(_number_array(np.zeros(n, np.int32)))


def arrow_schema():
    """The table's schema: top_k a list of {label, score}, error null or {code, message}, and
    the model that labelled the row (its name and version)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("score", pa.float64()),
            ("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
            ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
            ("model", pa.string()),
            ("model_version", pa.string()),
        ]
    )


def ranked_rows(
    paths: list[str], probs: np.ndarray, ok: np.ndarray, errors: dict[int, dict], labels, k: int
) -> Rows:
    """Rows for one batch: `probs` holds a row for each path where `ok`, in order."""
    top, score = top_k_columns(probs, ok, k)
    rows = Rows(labels, k)
    rows.add(paths, top, score, [errors.get(i) for i in range(len(paths))])
    return rows


def top_k_columns(probs: np.ndarray, ok: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, scores) of each row's top k, best first, an (n, k) array each for the n
    rows of the mask `ok`; `probs` holds a row for each row where `ok`, zeros elsewhere."""
    top = np.zeros((len(ok), k), np.int64)
    score = np.zeros((len(ok), k), np.float64)
    if len(probs):
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top[ok] = order
        score[ok] = np.take_along_axis(probs, order, axis=1)
    return top, score


def checked_top_k(top_k: int, labels: list[str]) -> int:
    """`top_k`, or InvalidInput when it is not between 1 and the number of labels."""
    if not 1 <= top_k <= len(labels):
        raise InvalidInput(f"--top-k must be between 1 and {len(labels)}", code="usage")
    return top_k


def read_image(path: str, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """images.load_image for an archive, where any file may wear an image's name: a FIFO or a
    device is refused before it is opened (reading one would wait forever, or never end), and so
    is a file larger than any image of `max_pixels` can be (8 bytes a pixel, 16-bit RGBA, and a
    megabyte of metadata), so that no one file can take the memory of a run."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise InvalidImage(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidImage(f"{path} is not a regular file")
    most = 8 * max_pixels + (1 << 20)
    if info.st_size > most:
        raise PayloadTooLarge(
            f"{path} is {info.st_size:,} bytes, more than an image of at most {max_pixels:,} "
            f"pixels can be ({most:,})"
        )
    return load_image(path, size, max_pixels)


def decode_batch(
    paths: list[str], size: tuple[int, int], max_pixels: int
) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
    """(pixels of the readable images at `size`, ok mask, {index: error}) for `paths`.

    A file that cannot be read or decoded becomes an error with the code and message the rest of
    imagerec gives for it; nothing here stops the run."""
    pixels = np.empty((len(paths), size[0], size[1], 3), np.uint8)
    ok = np.zeros(len(paths), bool)
    errors: dict[int, dict] = {}
    n = 0
    for i, path in enumerate(paths):
        try:
            pixels[n] = read_image(path, size, max_pixels)
        except ImagerecError as exc:
            errors[i] = {"code": exc.code, "message": exc.message}
            continue
        except Exception as exc:  # a decoder failure of a kind images.py does not name
            log.warning("%s could not be decoded", path, exc_info=True)
            errors[i] = {"code": "invalid_image", "message": f"{path}: {exc}"}
            continue
        ok[i] = True
        n += 1
    return pixels[:n], ok, errors


# Sinks --------------------------------------------------------------------------------------


def output_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidInput(
            f"--out must end in {', '.join(FORMATS)} (the format), not {out.name!r}",
            code="usage",
        )
    return suffix


def open_sink(out: Path, model: dict):
    """The output `out` (its format by suffix), with what earlier runs committed to it."""
    fmt = output_format(out)
    return ParquetFolder(out, model) if fmt == ".parquet" else AppendedFile(out, fmt, model)


def _hold_lock(path: Path, out: Path):
    """`path` opened and locked for this run alone (flock: the kernel lets go when the process
    ends, however it ends), or InvalidInput if another run holds it. Two runs writing one output
    would number their parts alike, or append over each other."""
    import fcntl

    handle = open(path, "ab")  # noqa: SIM115 (held for the run: the sink closes it)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InvalidInput(
            f"{out} is being written by another imagerec classify run: wait for it to end, or "
            "choose another --out",
            code="busy",
        ) from None
    return handle


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a synced temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk, say: leave nothing half-written behind
        raise
    _fsync_folder(path.parent)


class Sink:
    """An output held by this run (its lock) until closed; `with` closes it however the run
    ends."""

    out: Path
    model: dict  # the model of this run: {"name", "version", ...}
    lock: io.BufferedWriter

    def _other_model(self, name: str | None, version: str | None) -> InvalidInput:
        """The refusal of an output that holds labels from another model than this run's."""
        return InvalidInput(
            f"{self.out} holds labels from model {name} version {version}, not "
            f"{self.model['name']} version {self.model['version']}: choose another --out",
            code="other_model",
        )

    def _take(self, lock_path: Path, read_earlier) -> None:
        """Lock the output before anything in it is touched, then `read_earlier()` what earlier
        runs left there; if that fails, let go again."""
        self.lock = _hold_lock(lock_path, self.out)
        try:
            read_earlier()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the output, for another run."""
        self.lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ParquetFolder(Sink):
    """`out` as a folder of Parquet parts; a part is in the table once renamed into place."""

    def __init__(self, out: Path, model: dict):
        if out.exists() and not out.is_dir():
            raise InvalidInput(
                f"{out} exists and is a file: a Parquet output here is a folder of parts; "
                "choose another --out",
                code="usage",
            )
        if out.is_dir() and not (out / SUMMARY_FILE).is_file():
            theirs = sorted(e.name for e in os.scandir(out) if e.name != LOCK_FILE)
            if theirs:  # another tool's dataset, say: parts added among its files would mix
                raise InvalidInput(
                    f"{out} is a folder that imagerec classify did not write (it holds "
                    f"{theirs[0]!r}{' and more' if len(theirs) > 1 else ''}): choose another --out",
                    code="usage",
                )
        self.out, self.model = out, model
        out.mkdir(parents=True, exist_ok=True)
        self._take(out / LOCK_FILE, self._read_earlier)

    def _read_earlier(self) -> None:
        for stale in self.out.glob(".part-*"):  # a run killed while writing a part
            stale.unlink(missing_ok=True)
        summary = self.out / SUMMARY_FILE
        if summary.is_file():
            earlier = _json_record(summary, "version")
            if earlier.get("version") != self.model["version"]:
                raise self._other_model(earlier.get("name"), earlier.get("version"))
        else:
            _write_durably(summary, json.dumps(self.model).encode())
        self.next_part = 1 + max((int(m[1]) for m in self._parts()), default=-1)

    def _parts(self) -> Iterator[re.Match]:
        for entry in os.scandir(self.out):
            match = PART_NAME.match(entry.name)
            if match:
                yield match

    def done(self) -> tuple[int, np.ndarray]:
        """(rows committed, sorted hashes of their paths)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        hashes = [np.zeros(0, np.uint64)]
        for match in self._parts():
            part = self.out / match[0]
            try:
                paths = pq.read_table(part, columns=["path"]).column("path").to_pylist()
            except pa.ArrowException as exc:  # not Parquet, cut short, or without a path column
                raise _damaged(part, str(exc).splitlines()[0], MOVE_PART) from None
            if not all(isinstance(p, str) for p in paths):
                raise _damaged(part, "its path column is not text", MOVE_PART)
            hashes.append(path_hashes(paths))
        done = np.concatenate(hashes)
        done.sort()
        return len(done), done

    def commit(self, rows: Rows) -> None:
        import pyarrow.parquet as pq

        name = f"part-{self.next_part:06d}.parquet"
        tmp = self.out / f".{name}.tmp"
        try:
            pq.write_table(rows.to_arrow(self.model), tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.out / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_folder(self.out)
        self.next_part += 1

    def adopt(self, files: list[Path]) -> list[Path]:
        """Rename finished Parquet files (written elsewhere in `out`) into place as parts."""
        parts = []
        for file in files:
            parts.append(self.out / f"part-{self.next_part:06d}.parquet")
            os.replace(file, parts[-1])
            self.next_part += 1
        _fsync_folder(self.out)
        return parts

    def finish(self) -> None:
        pass


class AppendedFile(Sink):
    """A CSV or JSON Lines file appended chunk by chunk; `.NAME.progress` holds the length of
    the committed part while a run is under way. Each row names the model that labelled it,
    which a later run checks."""

    def __init__(self, out: Path, fmt: str, model: dict):
        self.out, self.fmt, self.model = out, fmt, model
        if out.is_dir():
            raise InvalidInput(f"{out} is a folder; --out names the file to write", code="usage")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.progress = out.with_name(f".{out.name}.progress")
        self._take(out, self._read_earlier)  # the lock is the output itself, made if it is new

    def _read_earlier(self) -> None:
        self.recorded = self.progress.is_file()
        size = self.out.stat().st_size
        if self.recorded:
            self.committed = _json_record(self.progress, "bytes", MOVE_PROGRESS)["bytes"]
            if not isinstance(self.committed, int) or not 0 <= self.committed <= size:
                raise _damaged(
                    self.progress, f"it records {self.committed!r} bytes of {size}", MOVE_PROGRESS
                )
        else:  # none, or a finished run: everything in the file is committed
            self.committed = size

    def _record(self) -> None:
        _write_durably(self.progress, json.dumps({"bytes": self.committed}).encode())

    def done(self) -> tuple[int, np.ndarray]:
        paths = list(self._committed_paths())
        done = path_hashes(paths)
        done.sort()
        if not self.recorded:  # before the first byte is appended, so it can be taken back
            self._record()
            self.recorded = True
        return len(paths), done

    def _committed_paths(self) -> Iterator[str]:
        """The paths of the committed rows; InvalidInput if a row is from another model than
        this run's, or the file is not a table that classify wrote."""
        if self.committed == 0:
            return
        with open(self.out, "rb") as handle:
            data = handle.read(self.committed)
        if not data.endswith(b"\n"):
            # classify ends every row with one, and a run's own unfinished append lies past
            # its recorded length: this file was cut short, or saved, by something else.
            # Appending to it as it is would join the next row to its last one.
            raise InvalidInput(
                f"{self.out} ends without a line break, so its last row may be cut short: it "
                "was changed outside imagerec classify. Remove that row (or, if it is whole, "
                "end the file with a line break) to resume, or choose another --out",
                code="damaged_output",
            )
        text = io.TextIOWrapper(io.BytesIO(data), "utf-8", newline="")
        not_ours = InvalidInput(f"{self.out} is not a table that imagerec classify wrote")
        if self.fmt == ".jsonl":
            yield from self._checked(_json_rows(text, not_ours))
            return
        reader = csv.DictReader(text)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise not_ours
        yield from self._checked(_csv_rows(reader, not_ours))

    def _checked(self, rows: Iterable[dict]) -> Iterator[str]:
        """Each row's path, once its model is found to be this run's."""
        for row in rows:
            version = row.get("model_version")
            if version != self.model["version"]:
                if version is None:
                    raise InvalidInput(
                        f"{self.out} holds rows that do not name the model that labelled them "
                        "(no model_version): choose another --out",
                        code="other_model",
                    )
                raise self._other_model(row.get("model"), version)
            yield row["path"]

    def commit(self, rows: Rows) -> None:
        buffer = io.StringIO(newline="")
        if self.fmt == ".jsonl":
            for record in rows.records(self.model):
                buffer.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(buffer)
            if self.committed == 0:
                writer.writerow(COLUMNS)
            for record in rows.records(self.model):
                for name in ("top_k", "error"):
                    if record[name] is not None:
                        record[name] = json.dumps(record[name], ensure_ascii=False)
                writer.writerow(record[n] for n in COLUMNS)
        data = buffer.getvalue().encode("utf-8")
        with open(self.out, "ab") as handle:
            handle.truncate(self.committed)  # what a killed run appended past its last commit
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.committed += len(data)
        self._record()

    def finish(self) -> None:
        if self.committed == 0:  # nothing written: still an empty table, with its header
            self.commit(Rows())
        self.progress.unlink(missing_ok=True)
        _fsync_folder(self.out.parent)


MOVE_PART = "Move that part out of the folder to label its images again, or choose another --out"
MOVE_PROGRESS = "Move it aside to take the whole file as committed, or choose another --out"


def _json_record(path: Path, key: str, remedy: str = "Choose another --out") -> dict:
    """The JSON object in one of classify's own small files, which holds `key`."""
    try:
        record = json.loads(path.read_bytes())
    except ValueError:
        record = None
    if not isinstance(record, dict) or key not in record:
        why = f"it is not the JSON object with {key!r} that classify writes"
        raise _damaged(path, why, remedy)
    return record


def _damaged(path: Path, why: str, remedy: str = "Choose another --out") -> InvalidInput:
    """The refusal of an output file that was damaged or changed outside a run."""
    return InvalidInput(
        f"{path} cannot be read as classify wrote it ({why}): it was damaged or changed outside "
        f"imagerec classify. {remedy}",
        code="damaged_output",
    )


def _csv_rows(reader: csv.DictReader, not_ours: Exception) -> Iterator[dict]:
    """The rows of a CSV table, each with as many fields as its header, or `not_ours` raised."""
    for row in reader:
        if None in row or None in row.values():  # more fields than the header, or fewer
            raise not_ours
        yield row


def _json_rows(lines: Iterable[str], not_ours: Exception) -> Iterator[dict]:
    """The rows of JSON Lines, each an object with a path, or `not_ours` raised."""
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "path" not in row:
            raise not_ours
        yield row


def _file_system_errors_stop(classify_run):
    """classify_run, with an OSError (a full disk, an --out that cannot be made) turned into an
    ImagerecError that says what stopped the run; what was committed stays, and the same
    command resumes after it."""

    @functools.wraps(classify_run)
    def run(bundle, sources, out, **options):
        try:
            return classify_run(bundle, sources, out, **options)
        except OSError as exc:
            log.debug("classify stopped", exc_info=True)
            where = f"{exc.filename}: " if exc.filename else ""
            raise ImagerecError(
                f"classify stopped: {where}{exc.strerror or exc}. The rows committed to {out} "
                "stay there; once this is fixed, the same command resumes after them",
                code="io_error",
            ) from None

    return run


@_file_system_errors_stop
def classify(
    bundle: str | os.PathLike,
    sources: list[str],
    out: str | os.PathLike,
    *,
    engine: str = "local",
    model_engine: str = "auto",
    top_k: int = 3,
    batch_size: int = 64,
    threads: int = 0,
    commit_rows: int = 8192,
    max_pixels: int | None = None,
    progress: bool = True,
    ray_actors: int = 0,
) -> BulkResult:
    """Label every image the sources name into `out` with the bundle, on the `local` or `ray`
    engine; `model_engine` is the model's engine (auto, onnx-int8, ...). A file system error
    stops the run with an ImagerecError (code io_error) that names it."""
    out = Path(out)
    output_format(out)
    check_sources(sources, out)
    if not 1 <= batch_size <= MAX_BATCH:
        # A batch holds its decoded images, and 2 a thread are in flight: at a 224x224 model's
        # 150 KB an image, 100,000 a batch would ask for tens of GB.
        raise InvalidInput(f"--batch-size must be between 1 and {MAX_BATCH}", code="usage")
    if commit_rows < 1:
        raise InvalidInput("--commit-every must be at least 1", code="usage")
    if not 0 <= threads <= MAX_THREADS:
        raise InvalidInput(
            f"--threads must be between 1 and {MAX_THREADS} (or 0: one a core)", code="usage"
        )
    if ray_actors < 0:
        raise InvalidInput("--ray-actors must be at least 1 (or 0: the default)", code="usage")
    if engine == "ray":
        from imagerec.bulk_ray import classify_on_ray

        return classify_on_ray(
            bundle,
            sources,
            out,
            model_engine=model_engine,
            top_k=top_k,
            batch_size=batch_size,
            actors=ray_actors,
            threads=threads,
            commit_rows=commit_rows,
            max_pixels=max_pixels,
            progress=progress,
        )
    if engine != "local":
        raise InvalidInput(f"the engine must be local or ray, not {engine!r}", code="usage")
    from imagerec.predictor import Predictor

    threads = threads or usable_cores()
    # An ONNX Runtime session a thread, on its share of the cores.
    predictor = Predictor.from_path(
        bundle, max_batch=batch_size, engine=model_engine, workers=threads
    )
    return classify_local(
        predictor,
        sources,
        out,
        top_k=top_k,
        batch_size=batch_size,
        threads=threads,
        commit_rows=commit_rows,
        max_pixels=max_pixels,
        progress=progress,
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a container or service being stopped) during a run: taken as
    Ctrl-C is, so the batches that finished are committed before the command exits."""


def raise_terminated(signum, frame) -> None:
    raise Terminated


# The local engine -----------------------------------------------------------------------------


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def classify_local(
    predictor,
    sources: list[str],
    out: Path,
    *,
    top_k: int = 3,
    batch_size: int = 64,
    threads: int = 0,
    commit_rows: int = 8192,
    commit_s: float = 10.0,
    max_pixels: int | None = None,
    progress: bool = True,
) -> BulkResult:
    """Label every image the sources name into `out`, skipping what `out` already holds.

    `threads` threads (0: one a core) each take a batch of `batch_size` paths, read and decode
    it, and classify it with `predictor` (an imagerec.predictor.Predictor made with
    `workers=threads`, so that each has a session of its own); a bounded window of batches is
    queued ahead. A thread does both on one core, as the predictor's own in-process limit does:
    measured on 2 cores with photo-sized JPEGs, separate decode and inference threads (four
    threads on two cores) spent a fifth more CPU an image, and lost the cores' caches between
    decoding large images and running the model."""
    import cv2

    from imagerec.images import DEFAULT_MAX_PIXELS, hold_decode_buffers

    check_sources(sources)
    start = time.monotonic()
    k = checked_top_k(top_k, predictor.labels)
    model = {"name": predictor.name, "version": predictor.version, "engine": predictor.engine}
    with open_sink(out, model) as sink:  # closed, and so let go of, however the run ends
        already, done = sink.done()
        result = BulkResult(out, skipped=already, model=predictor.name, engine=predictor.engine)
        size = predictor.input_size
        max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        threads = threads or usable_cores()
        # Batches queued or under way: enough that a thread never waits for the next.
        window = 2 * threads

        bar = _progress_bar(progress, already)
        stop_counting = _count_in_background(bar, sources)

        def classify_batch(paths: list[str]) -> Rows:
            pixels, ok, errors = decode_batch(paths, size, max_pixels)
            probs = predictor.predict_arrays(pixels)
            return ranked_rows(paths, probs, ok, errors, predictor.labels, k)

        # OpenCV's own threads would compete with the pool, which already uses every core.
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        hold_decode_buffers()  # the next image reuses the last one's pages (a photo's decode: -40%)
        committer = Committer(sink, result, bar, predictor.labels, k, commit_rows, commit_s)
        in_flight: deque[Future] = deque()
        try:
            with ThreadPoolExecutor(threads, "imagerec-classify") as pool:
                batches = batched(skip_done(iter_sources(sources), done), batch_size)
                del done  # the hashes are only needed by the filter, which holds them
                exhausted = False
                while in_flight or not exhausted:
                    while not exhausted and len(in_flight) < window:
                        paths = next(batches, None)
                        if paths is None:
                            exhausted = True
                            break
                        in_flight.append(pool.submit(classify_batch, paths))
                    if not in_flight:
                        break
                    committer.add(in_flight.popleft().result())
                committer.finish()
        except KeyboardInterrupt:
            committer.save()  # the batches that finished are not lost with the ones under way
            raise
        finally:
            for future in in_flight:
                future.cancel()
            cv2.setNumThreads(cv_threads)
            stop_counting.set()
            if bar is not None:
                bar.close()
    if result.written == 0 and result.skipped == 0:
        log.warning("the sources named no image files")
    result.seconds = time.monotonic() - start
    return result


class Committer:
    """Rows gathered as batches finish, committed to the sink every `commit_rows` images or
    `commit_s` seconds, and counted into the run's result and progress bar."""

    def __init__(self, sink, result: BulkResult, bar, labels, k: int, rows: int, seconds: float):
        self.sink, self.result, self.bar = sink, result, bar
        self.labels, self.k, self.rows, self.seconds = labels, k, rows, seconds
        self.pending, self.last = Rows(labels, k), time.monotonic()

    def add(self, rows: Rows) -> None:
        self.pending.extend(rows)
        if self.bar is not None:
            self.bar.update(len(rows))
        now = time.monotonic()
        if len(self.pending) >= self.rows or now - self.last >= self.seconds:
            self._commit()
            self.last = now

    def finish(self) -> None:
        self.save()
        self.sink.finish()

    def save(self) -> None:
        """Commit the rows gathered so far (as on Ctrl-C): the same command resumes after them."""
        if len(self.pending):
            self._commit()

    def _commit(self) -> None:
        rows, self.pending = self.pending, Rows(self.labels, self.k)
        self.sink.commit(rows)
        self.result.written += len(rows)
        for error in rows.error:
            if error is not None:
                self.result.errors += 1
                codes = self.result.error_codes
                codes[error["code"]] = codes.get(error["code"], 0) + 1


def _progress_bar(enabled: bool, initial: int):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    # disable=None turns the bar off when stderr is not a terminal (logs, CI).
    return tqdm(
        total=None, initial=initial, desc="classify", unit="img", file=sys.stderr, disable=None
    )


def _count_in_background(bar, sources: list[str]) -> threading.Event:
    """Count the sources in a thread and give the bar its total (and so an ETA) when done;
    setting the event returned stops the count."""
    stop = threading.Event()
    if bar is not None:
        threading.Thread(
            target=lambda: _set_total(bar, count_sources(sources, stop)),
            name="imagerec-count",
            daemon=True,
        ).start()
    return stop


def _set_total(bar, total: int | None) -> None:
    if total is not None:
        bar.total = total
        bar.refresh()
