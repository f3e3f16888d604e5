"""What hug still needs from us, in one place. Import hug and falcon from here:
`from imagerec.hugcompat import falcon, hug`.

imagerec runs on hug-upgraded 2.8.0 (2026), the maintained fork of hug: the same `hug` module,
still on falcon 2.0.0. It was chosen over hug 2.6.1 (2020, hug's last release) with workarounds
of our own, because the fork fixes at its source what 2.6.1 breaks on today's Pythons and NumPy:

- 2.6.1 registers a JSON converter for `numpy.unicode_`, which NumPy 2 removed, so `import hug`
  fails; the fork converts `numpy.str_`.
- 2.6.1 imports `distutils` (api.py, types.py), gone from the standard library since 3.12: it
  imported only through the shim that setuptools happens to install. The fork does without.
- hug 2.6.1 and falcon 2.0.0 import `cgi`, removed in 3.13; the fork depends on `legacy-cgi`
  (the removed module, packaged) on 3.13 and later, which serves falcon 2.0.0's import too.
- 2.6.1 keeps a request/response middleware's generator on the router, shared by every
  request in flight; the fork keeps it on the request.

What the fork still leaves to us, and this module does:

- hug's multipart input format still goes through `cgi.parse_multipart`, which drops file
  names. `multipart_form` replaces it; `install_input_formats` registers it on an API.
- falcon stays at 2.0.0 (hug pins it), whose `cgi` import warns on 3.11 and 3.12: that
  deprecation warning is silenced for the import only.
"""

from __future__ import annotations

import functools
import json
import sys
import types
import warnings
from dataclasses import dataclass
from email.message import Message

from imagerec.errors import InvalidInput


@dataclass(frozen=True)
class FilePart:
    """One file field of a multipart form."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None


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


def _import_hug() -> types.ModuleType:
    with warnings.catch_warnings():
        # 3.11 and 3.12 still ship `cgi` and warn that it is going; hug and falcon import it.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*cgi.*")
        import hug as hug_module
    return hug_module


hug = _import_hug()
falcon = sys.modules["falcon"]  # hug imports falcon


def answer_error(response, error) -> None:
    """Answer with `error` (an ImagerecError) from a falcon middleware, in imagerec's error
    shape (the protocols' middleware reshapes it under their prefixes), and end the request
    there: an exception raised in middleware would reach no error handler and be a 500."""
    response.status = falcon.get_http_status(error.status)
    response.content_type = falcon.MEDIA_JSON
    response.body = json.dumps(error.to_dict())
    response.complete = True


def guard_input_formats(api: hug.API) -> None:
    """Make every body format of `api` (hug's defaults and the app's own) answer a body it
    cannot read with the client's 4xx: hug's text and urlencoded formats raise LookupError for
    an unknown charset and UnicodeDecodeError for bytes that are not in it, which would be 500s.
    Call once the app's formats are set."""
    from imagerec.errors import ImagerecError, InvalidInput, UnsupportedMediaType

    def guarded(content_type: str, parse):
        @functools.wraps(parse)
        def read(body, **params):
            try:
                return parse(body, **params)
            except ImagerecError:
                raise
            except LookupError:
                charset = params.get("charset")
                message = f"charset {charset!r} is not known: send {content_type} in UTF-8"
                raise UnsupportedMediaType(message, code="invalid_charset") from None
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                message = f"the {content_type} body cannot be read: {exc}"
                raise InvalidInput(message, code="invalid_body") from None

        return read

    formats = {**hug.defaults.input_format, **(getattr(api.http, "_input_format", None) or {})}
    for content_type, parse in formats.items():
        api.http.set_input_format(content_type, guarded(content_type, parse))


def install_input_formats(api: hug.API) -> None:
    """Replace hug's cgi-based multipart parser on `api` with one that keeps file names."""
    api.http.set_input_format("multipart/form-data", multipart_form)
