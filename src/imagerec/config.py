"""Settings: one dataclass with defaults, overridden by IMAGEREC_* variables, then by CLI flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from imagerec.errors import InvalidInput

# The bundled model: inside an installed wheel (setup.py puts it there), else in the checkout.
_WHEEL_MODEL = Path(__file__).resolve().parent / "bundled" / "cifar10"
_CHECKOUT_MODEL = Path(__file__).resolve().parents[2] / "models" / "cifar10"
DEFAULT_MODEL = _WHEEL_MODEL if _WHEEL_MODEL.is_dir() else _CHECKOUT_MODEL


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imagerec"


@dataclass
class Settings:
    model: Path = DEFAULT_MODEL
    models: Path | None = None  # a repository folder: serve every bundle in it (not `model`)
    default_model: str | None = None  # the native routes' model when a request names none
    version_policy: str = "latest"  # latest, latest:N, all or specific:1,3 (TF Serving's)
    model_control: str = ""  # none, poll or explicit; "" is poll with `models`, else none
    poll_interval_s: float = 1.0  # how often `poll` re-scans the repository (TF Serving's 1 s)
    max_versions: int = 16  # versions loaded at once, all models together
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 0  # gRPC beside HTTP (Triton's default is 8001); 0: no gRPC port
    grpc_grace_s: float = 10.0  # on SIGTERM, how long gRPC calls in flight may take to finish
    front: str = "granian"  # the HTTP server: granian (compiled) or waitress (pure Python)
    threads: int = 32  # Python threads for requests: in flight at once, so the micro-batch limit
    header_timeout_s: int = 30  # granian: a connection must send its headers within this
    max_connections: int = 10_000  # granian: open connections served at once (each is a file)
    backlog: int = 2048  # connections the kernel queues before the server accepts them
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch: int = 64
    max_wait_ms: float = 2.0
    batch_workers: int = 2  # batches in flight: one is gathered while the other runs
    http_cores: int = 1  # CPUs the Python threads share (0: no limit); the model keeps them all
    top_k: int = 3
    engine: str = "auto"  # auto, tensorflow, onnx or onnx-int8 (imagerec.engines)
    # imagerec classify (imagerec.bulk): images a forward pass, threads (0: one a core),
    # images a commit holds (what a killed run can lose), Ray actors (0: one a cluster CPU).
    classify_batch: int = 64
    classify_threads: int = 0
    commit_rows: int = 8192
    ray_actors: int = 0
    cache_dir: Path = field(default_factory=_default_cache)
    # Access (imagerec.access), all off by default: keys that open the API (comma-separated),
    # a file of them re-read when it changes, whether /metrics needs a key too, and the
    # origins of browser apps that may call the API (comma-separated, or *).
    api_keys: str = ""
    api_keys_file: Path | None = None
    metrics_need_key: bool = False
    cors_origins: str = ""
    # Pretrained weights (imagerec.pretrained): Keras' host, or a mirror with the same paths.
    weights_url: str = "https://storage.googleapis.com/"
    download_timeout_s: float = 10.0  # connect and read: offline fails in seconds, not minutes

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then IMAGEREC_<FIELD> variables, then explicit (non-None) overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"IMAGEREC_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _convert(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.model = Path(settings.model)
        settings.models = Path(settings.models) if settings.models is not None else None
        settings.cache_dir = Path(settings.cache_dir)
        if settings.api_keys_file is not None:
            settings.api_keys_file = Path(settings.api_keys_file)
        return settings


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def _convert(name: str, raw: str, kind: str):
    converters = {
        "bool": _boolean,
        "int": int,
        "float": float,
        "str": str,
        "Path": Path,
        "str | None": str,
        "Path | None": Path,
    }
    try:
        return converters[kind](raw)
    except ValueError:
        raise InvalidInput(f"IMAGEREC_{name.upper()}={raw!r} is not a valid {kind}") from None
