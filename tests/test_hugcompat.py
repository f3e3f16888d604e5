"""hug on this Python and NumPy, and the multipart parser that keeps file names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy
import pytest

from imagerec.errors import InvalidInput
from imagerec.hugcompat import FilePart, hug, multipart_form, parse_multipart_bytes


def form_body(boundary: str, parts: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: image/jpeg\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_hug_imports_cleanly_in_a_fresh_interpreter():
    # Every warning an error: the cgi deprecation warning of 3.11 and 3.12 must stay inside the
    # import. On 3.13 the standard library has no cgi; it must come from legacy-cgi.
    script = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("error")
        from imagerec.hugcompat import falcon, hug
        import hug.test
        print(sys.modules["cgi"].__file__, falcon.__version__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cgi_file, falcon_version = result.stdout.split()
    assert falcon_version == "2.0.0"
    if sys.version_info >= (3, 13):
        assert "site-packages" in cgi_file, cgi_file


def test_hug_writes_numpy_values_as_json():
    # hug 2.6.1 could not even be imported under NumPy 2 (numpy.unicode_).
    body = hug.output_format.json({"label": numpy.str_("cat"), "scores": numpy.arange(3)})
    assert body == b'{"label": "cat", "scores": [0, 1, 2]}'


def test_multipart_keeps_bytes_file_names_and_order():
    # Binary data with line breaks and dashes must come back byte for byte.
    first = bytes(range(256)) + b"\r\n--xyz\r\n--" + bytes(range(256))
    second = b"\xff\xd8\xff second"
    body = form_body(
        "xyz123",
        [("image", first, "a.jpg"), ("top_k", b"2", None), ("image", second, "b.jpg")],
    )
    fields = parse_multipart_bytes(body, "xyz123")
    assert fields == [
        ("image", FilePart(first, "a.jpg", "image/jpeg")),
        ("top_k", "2"),
        ("image", FilePart(second, "b.jpg", "image/jpeg")),
    ]


def test_multipart_form_gives_single_values_and_lists_like_hug():
    body = form_body("b", [("image", b"1", "a"), ("image", b"2", "b"), ("top_k", b"3", None)])
    form = multipart_form(body, boundary="b")
    assert [part.data for part in form["image"]] == [b"1", b"2"]
    assert form["top_k"] == "3"


@pytest.mark.parametrize(
    "body, boundary",
    [
        (b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nno end', "b"),
        (b"not multipart at all", "b"),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", "b"),
        (b"--b\r\n--b--\r\n", ""),
    ],
    ids=["truncated", "no-delimiter", "no-name", "no-boundary"],
)
def test_malformed_multipart_is_a_client_error(body, boundary):
    with pytest.raises(InvalidInput):
        parse_multipart_bytes(body, boundary)
