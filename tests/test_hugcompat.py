"""The hug 2.6.1 workarounds: hug imports under NumPy 2 and without `cgi`, multipart parsing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy
import pytest

from imagerec.errors import InvalidInput
from imagerec.hugcompat import FilePart, hug, multipart_form, parse_header, parse_multipart_bytes


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


def test_hug_imports_and_numpy_is_left_as_it_was():
    assert hug.API is not None and hug.test.get is not None
    if numpy.__version__.startswith("2"):
        assert "unicode_" not in numpy.__dict__


def test_hug_imports_where_the_cgi_module_is_gone():
    # Python 3.13 has no cgi module; hide it to get the same situation on older versions.
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class HideCgi(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "cgi":
                    raise ModuleNotFoundError("No module named 'cgi'")
        sys.meta_path.insert(0, HideCgi())
        from imagerec.hugcompat import hug
        import hug.test
        print(sys.modules["cgi"].__doc__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "stand-in" in result.stdout


@pytest.mark.parametrize(
    "line",
    [
        "text/html; charset=utf-8",
        'multipart/form-data; boundary="a b;c"',
        "*/*;q=0.5",
        "application/json",
        'form-data; name="image"; filename="my cat.jpg"',
    ],
)
def test_parse_header_agrees_with_the_cgi_module(line):
    expected = {
        "text/html; charset=utf-8": ("text/html", {"charset": "utf-8"}),
        'multipart/form-data; boundary="a b;c"': ("multipart/form-data", {"boundary": "a b;c"}),
        "*/*;q=0.5": ("*/*", {"q": "0.5"}),
        "application/json": ("application/json", {}),
        'form-data; name="image"; filename="my cat.jpg"': (
            "form-data",
            {"name": "image", "filename": "my cat.jpg"},
        ),
    }
    assert parse_header(line) == expected[line]


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
