"""Every workaround that hug 2.6.1 needs, in one place. Import hug and falcon from here:
`from imagerec.hugcompat import falcon, hug`.

hug 2.6.1 (2020) is hug's last release, and it pins falcon 2.0.0:

- hug/output_format.py registers a JSON converter for `numpy.unicode_`, which NumPy 2 removed,
  so `import hug` fails. The alias exists only while hug is imported, then is taken away again.
- hug/format.py, hug/input_format.py and falcon 2.0.0 import the `cgi` module, deprecated in
  Python 3.11 and removed in 3.13. Where it is missing, a small stand-in with the two functions
  they use (`parse_header`, `parse_multipart`) is installed; where it exists, its deprecation
  warning is silenced for that import only.
- hug's multipart input format goes through `cgi.parse_multipart`, which drops file names.
  `multipart_form` replaces it; `install_input_formats` registers it on an API.
"""

from __future__ import annotations

import sys
import types
import warnings
from dataclasses import dataclass
from email.message import Message

import numpy

from imagerec.errors import InvalidInput


@dataclass(frozen=True)
class FilePart:
    """One file field of a multipart form."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None


def parse_header(line: str) -> tuple[str, dict[str, str]]:
    """`cgi.parse_header`: 'text/html; charset=utf-8' -> ('text/html', {'charset': 'utf-8'})."""
    message = Message()
    message["content-type"] = line
    params = message.get_params(header="content-type") or [("", "")]
    main = line.split(";", 1)[0].strip().lower()
    return main, {key.lower(): value for key, value in params[1:]}


def parse_multipart_bytes(body: bytes, boundary: str | bytes) -> list[tuple[str, str | FilePart]]:
    """Split a multipart/form-data body into (name, value) pairs in the order sent.

    A field with a filename (or a non-text content type) becomes a FilePart; the others are str.
    """
    if isinstance(boundary, str):
        boundary = boundary.encode("latin-1")
    if not boundary or len(boundary) > 200:
        raise InvalidInput("multipart/form-data needs a boundary parameter", code="invalid_form")
    # The delimiter includes the line break before it, so '--boundary' inside data cannot match.
    sections = (b"\r\n" + body).split(b"\r\n--" + boundary)
    if len(sections) < 2 or not sections[-1].startswith(b"--"):
        raise InvalidInput("the multipart form is truncated or malformed", code="invalid_form")
    fields = []
    for section in sections[1:-1]:
        head, separator, content = section.partition(b"\r\n\r\n")
        if not separator:
            raise InvalidInput("a multipart part has no header block", code="invalid_form")
        headers = Message()
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip()] = value.strip()
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise InvalidInput("a multipart part has no field name", code="invalid_form")
        filename = headers.get_filename()
        content_type = headers.get_content_type() if "content-type" in headers else None
        if filename is not None or (content_type and not content_type.startswith("text/")):
            fields.append((name, FilePart(content, filename, content_type)))
        else:
            fields.append((name, content.decode("utf-8", "replace")))
    return fields


def multipart_form(body, boundary: str = "", **_params) -> dict:
    """hug input format for multipart/form-data: {field name: value, or [values] in order}.

    As in hug's own format, a field sent once is a single value, one sent more often a list.
    """
    data = body.read() if hasattr(body, "read") else bytes(body)
    form: dict[str, list] = {}
    for name, value in parse_multipart_bytes(data, boundary):
        form.setdefault(name, []).append(value)
    return {name: values[0] if len(values) == 1 else values for name, values in form.items()}


def _cgi_parse_multipart(fp, pdict, **_kwargs) -> dict[str, list]:
    """`cgi.parse_multipart` for the stand-in module: file contents as bytes, fields as str."""
    boundary = pdict.get("boundary", b"")
    form: dict[str, list] = {}
    for name, value in parse_multipart_bytes(fp.read(), boundary):
        form.setdefault(name, []).append(value.data if isinstance(value, FilePart) else value)
    return form


def make_cgi_standin() -> types.ModuleType:
    """A module with the parts of the removed `cgi` module that hug and falcon 2.0.0 call."""
    module = types.ModuleType("cgi", "imagerec stand-in for the cgi module removed in Python 3.13")
    module.parse_header = parse_header
    module.parse_multipart = _cgi_parse_multipart
    return module


def _import_hug() -> types.ModuleType:
    if "hug" in sys.modules:
        return sys.modules["hug"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*cgi.*")
        try:
            import cgi  # noqa: F401  (deprecated in 3.11, gone in 3.13)
        except ImportError:
            sys.modules["cgi"] = make_cgi_standin()
    had_unicode = "unicode_" in numpy.__dict__
    if not had_unicode:
        numpy.unicode_ = numpy.str_
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*cgi.*")
            import hug as hug_module
    finally:
        if not had_unicode:
            del numpy.unicode_
    return hug_module


hug = _import_hug()
falcon = sys.modules["falcon"]  # imported by hug, after the cgi stand-in went in


def install_input_formats(api: hug.API) -> None:
    """Replace hug's cgi-based multipart parser on `api` with one that keeps file names."""
    api.http.set_input_format("multipart/form-data", multipart_form)
