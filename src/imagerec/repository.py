"""The model repository: every served model and version, loaded, swapped and freed while the
server runs. Nothing here knows HTTP; the routes ask it for a model by name and version.

    DIR/cifar10/                 a bundle: one version, its manifest digest (e.g. "1a2b3c4d5e6f")
    DIR/photos/1/, DIR/photos/7/ numbered versions (TF Serving's layout); the version is the number

A version is loaded through the injected `loader` (path -> a ready predictor or micro-batcher),
in the syncing thread, while the versions already served keep answering; it is installed only
once warm, and under the `latest` policy the versions it supersedes leave the lookup table in
the same step, so no request sees the old version after one has seen the new. A superseded
version is closed once the requests holding it (`acquire` ... `release`) are done. A version that
fails to load is logged, counted, and not retried until its files change; what served before
keeps serving.

Model control, after Triton's `--model-control-mode`: `none` loads what is there at start and
never looks again, `poll` re-scans every `poll_interval_s`, `explicit` loads at start and then
only on `load(name)` / `unload(name)` (Triton's repository API).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagerec.bundle import MANIFEST, manifest_version
from imagerec.errors import ImagerecError, InvalidInput, NotFound, NotReady

log = logging.getLogger(__name__)

MODES = ("none", "poll", "explicit")


class ModelControlError(ImagerecError):
    """A load or unload refused: a mode without model control, or the loaded-versions limit."""

    status = 400
    code = "model_control"


@dataclass(frozen=True)
class VersionPolicy:
    """Which numbered versions of a model to serve (TF Serving's model_version_policy):
    `latest` (or `latest:N`, the N highest), `all`, or `specific:1,3`."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                count = int(arg) if arg else 1
                if count >= 1:
                    return cls("latest", count)
            elif kind == "all" and not arg:
                return cls("all")
            elif kind == "specific" and arg:
                numbers = tuple(sorted({int(v) for v in arg.split(",")}))
                if all(n >= 0 for n in numbers):
                    return cls("specific", versions=numbers)
        except ValueError:
            pass
        raise InvalidInput(
            f"version policy {text!r}: use latest, latest:N, all or specific:1,3",
            code="usage",
        )

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.count :]

    def __str__(self) -> str:
        if self.kind == "latest":
            return "latest" if self.count == 1 else f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return self.kind


@dataclass(frozen=True)
class Candidate:
    """A version found on disk: where it is and a signature that changes when its files do."""

    name: str
    version: str
    number: int | None  # the directory number, or None for a plain bundle
    path: Path
    signature: str


class ServedVersion:
    """One loaded version of a model: what the routes classify with.

    Offers what the routes use of a Predictor (`labels`, `input_size`, `bundle`, `classify`,
    `predict_arrays`, `prepare`) under the repository's name and version. Held between
    `acquire()` and `release()`; once retired, it is closed when the last holder releases it.
    """

    def __init__(
        self,
        name: str,
        version: str,
        engine: Any,
        path: Path | None = None,
        number: int | None = None,
        on_closed: Callable[[ServedVersion], None] | None = None,
    ):
        self.name = name
        self.version = version
        self.number = number
        self.engine = engine  # a Predictor, or a MicroBatcher in front of one
        self.predictor = getattr(engine, "predictor", engine)
        self.bundle = getattr(engine, "bundle", None)
        bundle_path = getattr(self.bundle, "path", None)
        self.path = Path(path) if path is not None else bundle_path
        self.labels = list(engine.labels)
        self.input_size = tuple(getattr(engine, "input_size", None) or ())
        self.reports_batches = getattr(engine, "reports_batches", False)
        self.engine_name = getattr(self.predictor, "engine", None)
        self.loaded_at = time.time()
        # TF Serving's versions are integers: a digest version is also reachable as its number.
        self.numeric_version = number if number is not None else digest_number(version)
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._holders = 0
        self._retired = False
        self._closed = False

    def __repr__(self) -> str:
        return f"ServedVersion({self.name!r}, {self.version!r})"

    @property
    def sort_key(self) -> tuple[int, float]:
        return (self.number if self.number is not None else -1, self.loaded_at)

    def classify(self, images, k: int = 3):
        return self.engine.classify(images, k)

    def predict_arrays(self, images):
        return self.engine.predict_arrays(images)

    def prepare(self, image):
        return self.predictor.prepare(image)

    def acquire(self) -> bool:
        """Hold this version for one request; False if it is already closed."""
        with self._lock:
            if self._closed:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            close = self._retired and self._holders == 0 and not self._closed
            if close:
                self._closed = True
        if close:
            self._close()

    def retire(self) -> None:
        """No new holders; close now or when the last holder releases it."""
        with self._lock:
            self._retired = True
            close = self._holders == 0 and not self._closed
            if close:
                self._closed = True
        if close:
            self._close()

    def _close(self) -> None:
        try:
            if hasattr(self.engine, "close"):
                self.engine.close()  # finish the batches in flight, stop its threads
        finally:
            log.info("model %s version %s unloaded", self.name, self.version)
            self.engine = self.predictor = self.bundle = None
            if self._on_closed is not None:
                self._on_closed(self)


def manifest_digest(path: Path) -> str | None:
    """The bundle version its manifest promises (verify_bundle checks it holds), or None."""
    try:
        return manifest_version((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def scan_model(name: str, folder: Path) -> dict[str, Candidate]:
    """The versions of one model folder: itself if it is a bundle, else its numbered folders.
    Folders without a manifest (a copy under way) and names that are not numbers are skipped."""
    digest = manifest_digest(folder)
    if digest is not None:
        return {digest: Candidate(name, digest, None, folder, digest)}
    found = {}
    try:
        children = list(folder.iterdir())
    except OSError:
        return {}
    for child in children:
        if not child.name.isdigit() or not child.is_dir():
            continue
        signature = manifest_digest(child)
        if signature is not None:
            number = int(child.name)
            found[str(number)] = Candidate(name, str(number), number, child, signature)
    return found


def free_memory() -> None:
    """Hand memory freed by an unloaded model back to the system: Python's cycles, then glibc's
    free lists (without malloc_trim the process keeps its peak size)."""
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelRepository:
    """Every served model and version, and the loading, swapping and freeing of them.

    `root` is a repository folder (one model per sub-folder); `bundles` names single bundle
    folders instead (`--model PATH`: a repository of one, named as the bundle). Without either,
    models come only through `add` (tests, scripts).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        bundles: tuple[Path, ...] = (),
        loader: Callable[[Path], Any] | None = None,
        policy: VersionPolicy = VersionPolicy(),
        mode: str = "none",
        poll_interval_s: float = 1.0,
        max_versions: int = 16,
        default_model: str | None = None,
        metrics: Any = None,
    ):
        if mode not in MODES:
            raise InvalidInput(f"model control must be one of {', '.join(MODES)}", code="usage")
        self.root = Path(root) if root is not None else None
        self.bundles = tuple(Path(b) for b in bundles)
        self.loader = loader
        self.policy = policy
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self.max_versions = max_versions
        self.default_model = default_model
        self.metrics = metrics
        self._lock = threading.Lock()  # guards the tables below
        self._sync_lock = threading.Lock()  # one sync (scan, load, swap) at a time
        self._served: dict[str, dict[str, ServedVersion]] = {}
        self._failures: dict[tuple[str, str], tuple[str, str]] = {}  # -> (signature, message)
        self._unloaded: set[str] = set()  # explicit mode: models unloaded through the API
        self._started = False  # the first sync is done
        self._failure: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lookup ---------------------------------------------------------------------------

    def add(self, engine: Any, name: str | None = None, version: str | None = None) -> None:
        """Serve a ready predictor (or micro-batcher) as it is: no loader, no files watched."""
        served = ServedVersion(name or engine.name, version or engine.version, engine)
        with self._lock:
            self._served.setdefault(served.name, {})[served.version] = served
            self._started = True
            self._failure = None
        self._count()

    def fail(self, message: str) -> None:
        """Record why the models could not be loaded; readiness and lookups report it (503)."""
        with self._lock:
            self._failure = message

    def readiness(self) -> None:
        """Raise NotReady (503) with the reason unless ready."""
        with self._lock:
            failure, started, empty = self._failure, self._started, not self._served
        if failure:
            raise NotReady(failure)
        if not started:
            raise NotReady("the model is still loading; retry in a few seconds")
        if empty:
            raise NotReady("no model is loaded")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._served)

    def versions(self, name: str) -> list[ServedVersion]:
        """The served versions of `name`, oldest first."""
        with self._lock:
            return sorted(self._served.get(name, {}).values(), key=lambda s: s.sort_key)

    def default_name(self) -> str:
        """The model the native routes use when the request names none."""
        names = self.names()
        if self.default_model is not None:
            return self.default_model
        if len(names) == 1:
            return names[0]
        if not names:
            self.readiness()
            raise NotReady("no model is loaded")
        raise InvalidInput(
            f"this server serves several models ({', '.join(names)}): name one with the "
            "`model` parameter",
            code="model_required",
        )

    def acquire(self, name: str | None = None, version: str | None = None) -> ServedVersion:
        """The served version asked for (the newest if `version` is None), held for the
        caller, who must `release()` it. 404 for a name or version not served; 503 while the
        repository is still loading."""
        for _ in range(3):  # a version retired between lookup and hold: look again
            served = self._lookup(name, version)
            if served.acquire():
                return served
        raise NotReady(f"model {served.name!r} is being replaced; retry")

    def _lookup(self, name: str | None, version: str | None) -> ServedVersion:
        if name is None:
            name = self.default_name()
        with self._lock:
            versions = self._served.get(name)
            started, failure = self._started, self._failure
            names = sorted(self._served)
        if not versions:
            if not started or (failure and not names):
                self.readiness()
            served_names = ", ".join(repr(n) for n in names) or "none"
            raise NotFound(f"unknown model {name!r}: this server serves {served_names}")
        if version is None:
            return max(versions.values(), key=lambda s: s.sort_key)
        number = int(version) if version.isdigit() else None
        served = versions.get(version) or next(
            (s for s in versions.values() if s.numeric_version == number), None
        )
        if served is None:
            listed = ", ".join(sorted(versions, key=_version_order))
            raise NotFound(
                f"model {name!r} has no version {version!r} being served; served: {listed} "
                f"(version policy: {self.policy})"
            )
        return served

    # -- loading --------------------------------------------------------------------------

    def candidates(self) -> dict[str, dict[str, Candidate]]:
        """What is on disk now: model name -> version -> Candidate."""
        found: dict[str, dict[str, Candidate]] = {}
        if self.root is not None:
            try:
                folders = sorted(p for p in self.root.iterdir() if p.is_dir())
            except OSError as exc:
                log.error("cannot read the model repository %s: %s", self.root, exc)
                folders = []
            for folder in folders:
                if not folder.name.startswith("."):
                    found[folder.name] = scan_model(folder.name, folder)
        for bundle in self.bundles:
            digest = manifest_digest(bundle)
            versions = {}
            if digest is not None:
                versions[digest] = Candidate(bundle.name, digest, None, bundle, digest)
            found[bundle.name] = versions
        return found

    def sync(self, only: str | None = None) -> list[str]:
        """Scan, load what the policy wants and is not loaded, retire what it no longer
        wants. Returns the messages of the loads that failed."""
        with self._sync_lock:
            errors = self._sync(only)
            with self._lock:
                self._started = True
            return errors

    def _sync(self, only: str | None) -> list[str]:
        found = self.candidates()
        names = set(found) | set(self.names())
        errors = []
        for name in sorted(names):
            if only is not None and name != only:
                continue
            on_disk = found.get(name, {})
            wanted = [] if name in self._unloaded else self._wanted(on_disk)
            for candidate in wanted:
                if candidate.version in {s.version for s in self.versions(name)}:
                    continue
                error = self._load(candidate, wanted)
                if error:
                    errors.append(error)
            self._retire_unwanted(name, {c.version for c in wanted})
        self._count()
        return errors

    def _wanted(self, on_disk: dict[str, Candidate]) -> list[Candidate]:
        numbered = {c.number: c for c in on_disk.values() if c.number is not None}
        if numbered:
            return [numbered[n] for n in self.policy.select(list(numbered))]
        return list(on_disk.values())

    def _load(self, candidate: Candidate, wanted: list[Candidate]) -> str | None:
        key = (candidate.name, candidate.version)
        failed = self._failures.get(key)
        if failed is not None and failed[0] == candidate.signature:
            return failed[1] if self.mode == "explicit" else None  # unchanged since it failed
        others = sum(len(self.versions(n)) for n in self.names() if n != candidate.name)
        after = others + len(wanted)
        if after > self.max_versions:
            return self._failed(
                candidate,
                f"loading it would make {after} loaded versions, over the limit of "
                f"{self.max_versions} (--max-versions); unload a model or raise the limit",
            )
        if self.loader is None:
            return self._failed(candidate, "this repository has no loader")
        log.info("loading model %s version %s from %s", *key, candidate.path)
        started = time.perf_counter()
        try:
            engine = self.loader(candidate.path)
        except ImagerecError as exc:
            return self._failed(candidate, exc.message)
        except Exception as exc:
            log.exception("loading %s version %s failed", *key)
            return self._failed(candidate, f"{type(exc).__name__}: {exc}")
        served = ServedVersion(
            candidate.name,
            candidate.version,
            engine,
            candidate.path,
            candidate.number,
            on_closed=self._closed,
        )
        self._failures.pop(key, None)
        self._install(served, {c.version for c in wanted})
        if self.metrics is not None:
            self.metrics.model_load_seconds.labels(candidate.name).observe(
                time.perf_counter() - started
            )
        log.info(
            "serving model %s version %s (engine %s, loaded in %.1f s)",
            *key,
            served.engine_name,
            time.perf_counter() - started,
        )
        return None

    def _failed(self, candidate: Candidate, reason: str) -> str:
        message = f"model {candidate.name!r} version {candidate.version} was not loaded: {reason}"
        log.error("%s", message)
        self._failures[(candidate.name, candidate.version)] = (candidate.signature, message)
        if self.metrics is not None:
            self.metrics.model_load_failures.labels(candidate.name).inc()
        return message

    def _install(self, served: ServedVersion, wanted: set[str]) -> None:
        """Serve `served`, and drop the served versions the policy no longer wants in the same
        step, so lookups switch from the old to the new version at one instant."""
        with self._lock:
            versions = self._served.setdefault(served.name, {})
            versions[served.version] = served
            superseded = [v for k, v in versions.items() if k not in wanted]
            for old in superseded:
                del versions[old.version]
        for old in superseded:
            old.retire()
        self._count()

    def _retire_unwanted(self, name: str, wanted: set[str]) -> None:
        """Retire served versions the policy no longer wants, but only when at least one
        wanted version is served: a failed new version leaves the old one serving."""
        with self._lock:
            versions = self._served.get(name, {})
            if wanted and not (wanted & set(versions)):
                return
            gone = [v for k, v in versions.items() if k not in wanted]
            for old in gone:
                del versions[old.version]
            if not versions:
                self._served.pop(name, None)
        for old in gone:
            log.info("model %s version %s is no longer wanted; unloading", name, old.version)
            old.retire()

    def _closed(self, _served: ServedVersion) -> None:
        free_memory()

    def _count(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            counts = {name: len(versions) for name, versions in self._served.items()}
        self.metrics.set_loaded(counts)

    # -- model control (Triton's repository extension) ------------------------------------

    def index(self) -> list[dict]:
        """Every model on disk or served: name, version, state and reason, as Triton lists."""
        found = self.candidates()
        rows = []
        for name in sorted(set(found) | set(self.names())):
            served = {s.version for s in self.versions(name)}
            for version in sorted(set(found.get(name, {})) | served, key=_version_order):
                row = {"name": name, "version": version}
                failure = self._failures.get((name, version))
                if version in served:
                    row.update(state="READY", reason="")
                elif failure is not None:
                    row.update(state="UNAVAILABLE", reason=failure[1])
                else:
                    reason = "unloaded" if name in self._unloaded else "not selected"
                    row.update(state="UNAVAILABLE", reason=reason)
                rows.append(row)
            if not found.get(name) and not served:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": "no version"})
        return rows

    def load(self, name: str) -> None:
        """Load (or reload) a model's wanted versions now; explicit model control only."""
        self._check_control("load")
        if name not in self.candidates():
            raise NotFound(f"no model named {name!r} in the repository")
        self._unloaded.discard(name)
        self._failures = {k: v for k, v in self._failures.items() if k[0] != name}
        errors = self.sync(only=name)
        if errors:
            raise ModelControlError("; ".join(errors), code="load_failed")
        if not self.versions(name):
            raise ModelControlError(f"model {name!r} has no version to load", code="load_failed")

    def unload(self, name: str) -> None:
        """Stop serving every version of `name` (each closes once its requests finish)."""
        self._check_control("unload")
        if name not in self.names() and name not in self.candidates():
            raise NotFound(f"no model named {name!r} in the repository")
        with self._sync_lock:
            self._unloaded.add(name)
            self._retire_unwanted(name, set())
        self._count()

    def _check_control(self, action: str) -> None:
        if self.mode != "explicit":
            raise ModelControlError(
                f"explicit model {action} is not allowed: model control is {self.mode!r} "
                "(start the server with --model-control explicit)",
                code="model_control_disabled",
            )

    # -- the background thread ------------------------------------------------------------

    def start(self) -> None:
        """Load at start in a background thread, then poll if the mode says so."""
        self._thread = threading.Thread(target=self._run, name="imagerec-models", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        errors = self.sync()
        if not self.names():
            self.fail(
                "the model could not be loaded: " + "; ".join(errors)
                if errors
                else f"no model found in {self.root or ', '.join(map(str, self.bundles))}"
            )
        while self.mode == "poll" and not self._stop.wait(self.poll_interval_s):
            try:
                self.sync()
                if self.names():
                    with self._lock:
                        self._failure = None  # a model arrived after a failed start
            except Exception:  # the poller must outlive any one bad scan
                log.exception("the repository scan failed")

    def close(self) -> None:
        """Stop polling and close every served version (after its requests finish)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            served = [v for versions in self._served.values() for v in versions.values()]
            self._served.clear()
        for version in served:
            version.retire()


def digest_number(version: str) -> int:
    """A digest version as TF Serving's integer: the hex digits read as a number."""
    try:
        return int(version, 16)
    except ValueError:
        return int(hashlib.sha256(version.encode()).hexdigest()[:12], 16)


def _version_order(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)
