"""Who may call the API: API keys and cross-origin browser apps. Both are off by default.

- API keys (`IMAGEREC_API_KEYS`, comma-separated, and/or `IMAGEREC_API_KEYS_FILE`, one key a
  line, `#` comments, re-read when the file changes): every route but the health probes, the web
  page's own files and, unless `IMAGEREC_METRICS_NEED_KEY` is set, /metrics, then needs
  `Authorization: Bearer KEY`. Keys are compared in constant time and never logged, not even in
  part; a missing or wrong key is 401 in the route's own error shape.
- CORS (`IMAGEREC_CORS_ORIGINS`, comma-separated origins, or `*`): browser apps on those origins
  may call the API; preflight requests are answered here, before any key is asked for (browsers
  send none with them).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from pathlib import Path

from imagerec.errors import ImagerecError
from imagerec.hugcompat import answer_error

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/")
OPEN_PREFIXES = ("/static/",)  # the page's script and style: a browser fetches them unasked
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Content-Encoding, Inference-Header-Content-Length"
EXPOSED_HEADERS = "Inference-Header-Content-Length"
PREFLIGHT_MAX_AGE_S = 600


class Unauthorized(ImagerecError):
    status = 401
    code = "unauthorized"


def _split(text: str) -> set[str]:
    return {part.strip() for part in text.replace("\n", ",").split(",") if part.strip()}


class ApiKeys:
    """The keys that open the API: from the settings' list and a file re-read when it changes."""

    def __init__(self, keys: str = "", path: Path | None = None):
        self._fixed = {key.encode() for key in _split(keys)}
        self._path = Path(path) if path is not None else None
        self._from_file: set[bytes] = set()
        self._seen: tuple | None = None
        self._lock = threading.Lock()
        if self._path is not None:
            self._reload()
            if self._seen is None:
                raise ImagerecError(f"the API keys file {self._path} cannot be read", code="usage")

    @property
    def enabled(self) -> bool:
        return bool(self._fixed) or self._path is not None

    def _reload(self) -> None:
        """Read the file again if it changed (its inode, size or modification time)."""
        try:
            stat = os.stat(self._path)
        except OSError:
            return  # gone for a moment (a rename in progress): keep the keys read last
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if seen == self._seen:
                return
            try:
                text = self._path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("the API keys file %s cannot be read: %s", self._path, exc)
                return
            lines = (line.split("#", 1)[0] for line in text.splitlines())
            self._from_file = {key.encode() for line in lines for key in _split(line)}
            self._seen = seen
        log.info("API keys file %s read: %d keys", self._path, len(self._from_file))

    def check(self, authorization: str | None) -> None:
        """Raise Unauthorized unless `authorization` is "Bearer KEY" with a valid KEY."""
        if self._path is not None:
            self._reload()
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("this server needs an API key: send Authorization: Bearer KEY")
        candidate = given.strip().encode()
        # Every key is compared, each in constant time: the time taken says nothing of which
        # key came close.
        matched = False
        for key in self._fixed | self._from_file:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise Unauthorized("the API key is not valid")


class RequireApiKey:
    """Falcon middleware: every request but the open paths needs a valid key."""

    def __init__(self, keys: ApiKeys, metrics_need_key: bool = False):
        self.keys = keys
        self.open_paths = OPEN_PATHS if metrics_need_key else (*OPEN_PATHS, "/metrics")

    def process_request(self, request, response) -> None:
        path = request.path
        if request.method == "OPTIONS" or path in self.open_paths or path.startswith(OPEN_PREFIXES):
            return
        try:
            self.keys.check(request.get_header("Authorization"))
        except Unauthorized as exc:
            response.set_header("WWW-Authenticate", 'Bearer realm="imagerec"')
            answer_error(response, exc)


class Cors:
    """Falcon middleware: CORS for the allowed origins, preflight answered here."""

    def __init__(self, origins: str):
        self.origins = _split(origins)
        self.any = "*" in self.origins

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def process_request(self, request, response) -> None:
        origin = request.get_header("Origin")
        preflight = request.method == "OPTIONS" and request.get_header(
            "Access-Control-Request-Method"
        )
        if not preflight:
            return
        if not self.allowed(origin):
            refused = f"origin {origin!r} may not call this API (IMAGEREC_CORS_ORIGINS)"
            answer_error(response, ImagerecError(refused, code="origin_not_allowed", status=403))
            return
        response.set_header("Access-Control-Allow-Methods", ALLOWED_METHODS)
        response.set_header("Access-Control-Allow-Headers", ALLOWED_HEADERS)
        response.set_header("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE_S))
        response.status = "204 No Content"
        response.complete = True  # answered: no route runs

    def process_response(self, request, response, resource, req_succeeded) -> None:
        origin = request.get_header("Origin")
        response.append_header("Vary", "Origin")
        if not self.allowed(origin):
            return
        response.set_header("Access-Control-Allow-Origin", origin)
        response.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)
