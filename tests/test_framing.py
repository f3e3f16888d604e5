"""HTTP framing fuzzed on the wire: raw bytes over a socket to the real `imagerec serve` with its
default front (Granian, the bundled model on the int8 engine), on every route of every protocol.

requests and http.client write well-formed framing whatever they are given, so every request
here is built byte by byte: Content-Length shorter or longer than the body, not a number,
negative, sent twice with different values; Transfer-Encoding chunked in any letter case, with
chunk extensions, malformed chunk sizes, trailers or no last chunk; Content-Length and
Transfer-Encoding together; a Content-Type wrong for the route, odd multipart boundaries, bytes
that are not UTF-8 in the body and the headers, huge header values.

The property: never a 5xx; a 4xx from the app in its route's documented shape
({"error": {"code", "message"}} for imagerec's routes, {"error": "message"} under /v2 and
/v1/models/); the server healthy afterwards (GET /healthz answers 200).

Granian answers some requests itself, before the app sees them, and the property accepts those
answers as they are: bodiless (`content-length: 0`, `connection: close`, no `server` header).

- 400: a Content-Length that is not a plain decimal (`abc`, `-1`, `+5`, `5, 5`, past 64 bits),
  two Content-Length headers with different values, a Transfer-Encoding whose last coding is not
  chunked (`gzip`), a header line that does not parse (a space in its name, a NUL, obsolete line
  folding), a path that is not UTF-8, an HTTP version other than 1.0 and 1.1.
- 431: headers past Granian's buffer (about 400 KB) or more than about a hundred of them.
- No answer at all to a client that half-closes its side after a complete request: hyper, under
  Granian, drops such a connection. A half-close is sent here only when the body is cut short
  (the server would otherwise wait for the rest), and then an answer may be missing.

What Granian does not tell the app: a chunked body that ends badly (a malformed chunk size, no
last chunk) reaches the app as the bytes decoded before the fault, as if the body ended there,
so it is answered as that shorter body would be. A body shorter than its Content-Length is told
apart by its length, and is a 400 `incomplete_body`.

A bounded run is part of the suite; `make fuzz` runs the same properties with many more
examples (IMAGEREC_FUZZ_EXAMPLES). Inputs that once failed are kept as explicit examples.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_routes import FUZZ, PROTOCOL_PREFIXES, ROUTES
from live_server import running_server

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "cifar10"
IMAGE = (Path(__file__).parent / "fixtures" / "samples" / "dog.jpg").read_bytes()
TIMEOUT_S = 20  # a server that neither answers nor closes within this has hung


@dataclass
class Server:
    host: str
    port: int
    version: str  # the bundled model's version, for the versioned routes
    process: object


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(BUNDLED, tmp_path_factory.mktemp("framing")) as live:
        host, port = live.url.removeprefix("http://").rsplit(":", 1)
        server = Server(host, int(port), "", live.process)
        answers = exchange(server, Raw("GET", "/v1/model"))
        server.version = json.loads(answers[0].body)["version"]
        yield server


@dataclass
class Raw:
    """One request as bytes on the wire: the head is written as given, then `body` as is."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    half_close: bool = False  # shut our side after the body: the stream ends there

    def to_bytes(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"Host: imagerec"]
        # One request a connection: the server closes after its answer, so reading to the end
        # of the stream reads the whole answer.
        lines.append(b"Connection: close")
        lines += [name + b": " + value for name, value in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def from_granian(self) -> bool:
        """Granian's own answer: bodiless, without the `server` header it adds to the app's."""
        return (
            self.status in (400, 431)
            and "server" not in self.headers
            and self.headers.get("content-length") == "0"
        )


def exchange(server: Server, raw: Raw) -> list[Answer]:
    """Send `raw` on a new connection and read every answer until the server closes it."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT_S) as sock:
        try:
            sock.sendall(raw.to_bytes())
            if raw.half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # a broken pipe, a reset, or already shut: the server has closed
            pass  # (answered before the whole request was written, say): read what it said
        data = bytearray()
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer within {TIMEOUT_S} s: {raw}") from None
            if not chunk:
                break
            data += chunk
    return parse_answers(bytes(data))


def parse_answers(data: bytes) -> list[Answer]:
    answers = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        assert separator, f"a truncated answer: {data[:300]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if status < 200 else int(headers.get("content-length", len(rest)))
        body, data = rest[:length], rest[length:]
        if status >= 200:  # a 100 Continue comes before the answer itself
            answers.append(Answer(status, headers, body))
    return answers


def route_path(path: str) -> str:
    return path.partition("?")[0]


def check_answers(server: Server, raw: Raw) -> list[Answer]:
    """The property, for one request: see the module docstring."""
    answers = exchange(server, raw)
    where = f"{raw.method} {raw.path} {raw.headers!r:.400} body {raw.body[:200]!r}"
    assert answers or raw.half_close, f"no answer: {where}"
    for answer in answers:
        said = f"{answer.status} {answer.body[:300]!r} to {where}"
        assert answer.status < 500, said
        if answer.status < 400 or answer.from_granian or raw.method == "HEAD":
            continue
        assert answer.headers.get("content-type", "").startswith("application/json"), said
        error = json.loads(answer.body)["error"]
        if route_path(raw.path).startswith(PROTOCOL_PREFIXES):
            assert isinstance(error, str) and error, said
        else:
            assert isinstance(error["code"], str) and isinstance(error["message"], str), said
    health = exchange(server, Raw("GET", "/healthz"))
    assert [a.status for a in health] == [200], f"unhealthy after {where}"
    return answers


def chunked(body: bytes, sizes: list[int], extension: bytes = b"", trailer: bytes = b"") -> bytes:
    """`body` in chunks of `sizes` (the rest in one more), then the last chunk."""
    out, start = bytearray(), 0
    for size in [*sizes, len(body)]:
        piece = body[start : start + size]
        start += len(piece)
        if piece:
            out += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
    return bytes(out) + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED", b"cHuNkEd"])
def test_chunked_in_any_letter_case_is_read_as_chunked(server, coding):
    # Before: any spelling but "chunked" left the body unread, a 400 missing_image.
    raw = Raw(
        "POST",
        "/v1/predict",
        [(b"Content-Type", b"image/jpeg"), (b"Transfer-Encoding", coding)],
        chunked(IMAGE, [100, 7]),
    )
    (answer,) = check_answers(server, raw)
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["results"][0]["label"] == "dog"


def image_b64() -> str:
    import base64

    return base64.b64encode(IMAGE).decode()


def v2_binary_body() -> tuple[bytes, bytes]:
    """A v2 binary-extension body and its Inference-Header-Content-Length."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 4 + len(IMAGE)},
                }
            ]
        }
    ).encode()
    return header + len(IMAGE).to_bytes(4, "little") + IMAGE, str(len(header)).encode()


def multipart_image(boundary: bytes = b"imagerec-boundary") -> bytes:
    return (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="image"; filename="dog.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + IMAGE + b"\r\n--" + boundary + b"--\r\n"
    )


def valid_requests(version: str) -> list[Raw]:
    """One valid request to each route that reads a body, in each of its body forms."""
    as_json = [(b"Content-Type", b"application/json")]
    binary, header_length = v2_binary_body()
    instances = json.dumps({"instances": [{"b64": image_b64()}]}).encode()
    v2_json = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": []}]}
    v2_json["inputs"][0]["data"].append(image_b64())
    return [
        Raw("POST", "/v1/predict", [(b"Content-Type", b"image/jpeg")], IMAGE),
        Raw(
            "POST",
            "/v1/predict?top_k=2",
            [(b"Content-Type", b"multipart/form-data; boundary=imagerec-boundary")],
            multipart_image(),
        ),
        Raw(
            "POST", "/v1/predict", as_json, json.dumps({"images": [{"b64": image_b64()}]}).encode()
        ),
        Raw("POST", "/v2/models/cifar10/infer", as_json, json.dumps(v2_json).encode()),
        Raw(
            "POST",
            f"/v2/models/cifar10/versions/{version}/infer",
            [
                (b"Content-Type", b"application/octet-stream"),
                (b"Inference-Header-Content-Length", header_length),
            ],
            binary,
        ),
        Raw("POST", "/v1/models/cifar10:predict", as_json, instances),
        Raw("POST", f"/v1/models/cifar10/versions/{version}:predict", as_json, instances),
        Raw(
            "POST",
            "/v1/models/cifar10:classify",
            as_json,
            json.dumps({"examples": [{"image": {"b64": image_b64()}}]}).encode(),
        ),
    ]


def with_length(raw: Raw, length: bytes | int) -> Raw:
    length = str(length).encode() if isinstance(length, int) else length
    return Raw(raw.method, raw.path, [*raw.headers, (b"Content-Length", length)], raw.body)


VALID_IDS = ["raw", "multipart", "json", "v2-json", "v2-binary", "tf", "tf-version", "tf-classify"]


@pytest.mark.parametrize("index", range(len(VALID_IDS)), ids=VALID_IDS)
def test_a_valid_request_with_its_content_length_is_answered(server, index):
    raw = valid_requests(server.version)[index]
    (answer,) = check_answers(server, with_length(raw, len(raw.body)))
    assert answer.status == 200, answer.body


@pytest.mark.parametrize("index", range(len(VALID_IDS)), ids=VALID_IDS)
@pytest.mark.parametrize("missing", [1, 100, 10_000])
def test_a_body_shorter_than_its_content_length_is_an_incomplete_body(server, index, missing):
    # Before: the bytes that came were read as the whole body: 200 when they were enough
    # (an image's trailing bytes are not needed to decode it), else whatever they made.
    raw = valid_requests(server.version)[index]
    raw = with_length(raw, len(raw.body) + missing)
    raw.half_close = True  # the stream ends there
    (answer,) = check_answers(server, raw)
    assert answer.status == 400, answer.body
    error = json.loads(answer.body)["error"]
    if route_path(raw.path).startswith(PROTOCOL_PREFIXES):
        assert "Content-Length" in error, error
    else:
        assert error["code"] == "incomplete_body", error


# -- the fuzz ------------------------------------------------------------------------------

NOT_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"]
CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=utf-16",
    b"application/json; charset=bogus",
    b"image/jpeg",
    b"image/png",
    b"application/octet-stream",
    b"application/x-www-form-urlencoded",
    b"text/plain",
    b"application/xml",
    b"multipart/form-data",  # no boundary
    b"multipart/form-data; boundary=",
    b'multipart/form-data; boundary=""',
    b"multipart/form-data; boundary=" + b"b" * 300,
    b"multipart/form-data; boundary=imagerec-boundary; boundary=other",
    b'multipart/form-data; boundary="imagerec-boundary"',
    b"multipart/form-data; boundary=imagerec-boundary",
    b"multipart/form-data; boundary=\xff\xfe",
    b"image/\xff\xfe",
    b"",
]
CHUNKED = [b"chunked", b"Chunked", b"CHUNKED", b"cHuNkEd", b"gzip, chunked", b" chunked "]


@st.composite
def payloads(draw, version: str) -> Raw:
    """A request to any route with any body: one of the valid ones, or bytes of any kind, with
    the route's Content-Type or a wrong one."""
    kind = draw(st.sampled_from(["valid", "valid", "other", "other", "bytes", "empty"]))
    if kind == "valid":
        raw = draw(st.sampled_from(valid_requests(version)))
        raw = Raw(raw.method, raw.path, list(raw.headers), raw.body)
        if draw(st.booleans()):  # cut, or with bytes that are not UTF-8 spliced in
            cut = draw(st.integers(0, len(raw.body)))
            raw.body = raw.body[:cut] + draw(st.sampled_from([b"", *NOT_UTF8])) + raw.body[cut:]
    else:
        method, template = draw(st.sampled_from(ROUTES))
        name = draw(st.sampled_from(["cifar10", "cifar10", "nope"]))
        path = template.replace("{name}", name).replace("{version}", version)
        body = {
            "other": lambda: draw(st.sampled_from(valid_requests(version))).body,
            "bytes": lambda: draw(st.binary(max_size=300)) + draw(st.sampled_from(NOT_UTF8)),
            "empty": lambda: b"",
        }[kind]()
        raw = Raw(method, path, [], body)
    if kind != "valid" or draw(st.integers(0, 3)) == 0:  # a Content-Type of any kind
        raw.headers = [(n, v) for n, v in raw.headers if n != b"Content-Type"]
        content_type = draw(st.sampled_from(CONTENT_TYPES))
        if content_type:
            raw.headers.append((b"Content-Type", content_type))
    if draw(st.integers(0, 5)) == 0:
        raw.method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]))
    return raw


@st.composite
def odd_headers(draw) -> list[tuple[bytes, bytes]]:
    """Headers beside the framing: huge values, bytes that are not UTF-8, encodings."""
    headers = []
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["huge", "not-utf8", "encoding", "v2-length", "expect"]))
        if what == "huge":
            value = b"v" * draw(st.sampled_from([1_000, 8_000, 64_000, 300_000, 500_000]))
            headers.append((b"X-Huge", value))
        elif what == "not-utf8":
            name = draw(st.sampled_from([b"X-Bytes", b"Content-Type", b"Accept", b"User-Agent"]))
            headers.append((name, b"a" + draw(st.sampled_from(NOT_UTF8))))
        elif what == "encoding":
            coding = draw(st.sampled_from([b"gzip", b"deflate", b"br", b"identity", b"\xff"]))
            headers.append((b"Content-Encoding", coding))
        elif what == "v2-length":
            length = draw(st.sampled_from([b"0", b"-1", b"99999", b"x", b"18446744073709551616"]))
            headers.append((b"Inference-Header-Content-Length", length))
        else:
            headers.append((b"Expect", draw(st.sampled_from([b"100-continue", b"bogus"]))))
    return headers


def chunk_sizes(body_length: int):
    return st.lists(st.integers(1, max(1, body_length)), max_size=4)


@st.composite
def framed(draw, raw: Raw) -> Raw:
    """`raw` with its body framed in any way, well or badly."""
    body = raw.body
    headers = [*raw.headers, *draw(odd_headers())]
    half_close = False
    how = draw(
        st.sampled_from(
            [
                "length",
                "short",
                "long",
                "not-a-number",
                "negative",
                "twice",
                "chunked",
                "chunk-extension",
                "bad-chunk-size",
                "no-last-chunk",
                "length-and-chunked",
                "other-coding",
                "none",
            ]
        )
    )
    if how == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif how == "short":  # fewer bytes than announced, then the stream ends
        headers.append((b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 5000)))))
        half_close = True
    elif how == "long":  # more bytes than announced: the rest is junk after the request
        cut = draw(st.integers(0, len(body)))
        headers.append((b"Content-Length", b"%d" % cut))
        body += draw(st.binary(max_size=40))
    elif how == "not-a-number":
        value = draw(st.sampled_from([b"abc", b"1e3", b"0x10", b"+5", b"5 5", b"5,5", b"", b" "]))
        headers.append((b"Content-Length", value))
        half_close = True
    elif how == "negative":
        headers.append((b"Content-Length", b"-%d" % draw(st.integers(0, 2**70))))
        half_close = True
    elif how == "twice":
        first = draw(st.integers(0, len(body) + 10))
        second = draw(st.sampled_from([first, len(body), first + 1, 0]))
        headers += [(b"Content-Length", b"%d" % first), (b"Content-Length", b"%d" % second)]
        half_close = True
    elif how in ("chunked", "chunk-extension", "length-and-chunked"):
        extension = b";name=value" if how == "chunk-extension" else b""
        trailer = draw(st.sampled_from([b"", b"X-Trailer: yes\r\n"]))
        body = chunked(body, draw(chunk_sizes(len(body))), extension, trailer)
        if how == "length-and-chunked":
            headers.append((b"Content-Length", b"%d" % draw(st.integers(0, len(body) + 10))))
        headers.append((b"Transfer-Encoding", draw(st.sampled_from(CHUNKED))))
    elif how == "bad-chunk-size":
        size = draw(st.sampled_from([b"zz", b"-1", b"", b"ffffffffffffffffffff", b"1 0", b"0x5"]))
        cut = draw(st.integers(0, len(body)))
        body = chunked(body[:cut], []).removesuffix(b"0\r\n\r\n") + size + b"\r\n" + body[cut:]
        headers.append((b"Transfer-Encoding", draw(st.sampled_from(CHUNKED))))
        half_close = True
    elif how == "no-last-chunk":
        body = chunked(body, draw(chunk_sizes(len(body)))).removesuffix(b"0\r\n\r\n")
        headers.append((b"Transfer-Encoding", draw(st.sampled_from(CHUNKED))))
        half_close = True
    elif how == "other-coding":
        coding = draw(st.sampled_from([b"gzip", b"identity", b"chunked, gzip", b"chunked\xff"]))
        headers.append((b"Transfer-Encoding", coding))
        half_close = True
    # "none": a body with neither header is no body at all in HTTP/1.1; the bytes are junk after
    return Raw(raw.method, raw.path, headers, body, half_close)


@st.composite
def any_framed_request(draw, version: str) -> Raw:
    return draw(framed(draw(payloads(version))))


FOUND = [
    # Transfer-Encoding in another letter case: the body was left unread (400 missing_image)
    (200, Raw("POST", "/v1/models/cifar10:predict", [(b"Content-Type", b"application/json"),
        (b"Transfer-Encoding", b"CHUNKED")], chunked(b'{"instances": [{"b64": "' +
        image_b64().encode() + b'"}]}', [5]))),
    # a body shorter than its Content-Length: what came was read as whole (200)
    (400, Raw("POST", "/v1/predict", [(b"Content-Type", b"image/jpeg"),
        (b"Content-Length", b"%d" % (len(IMAGE) + 1))], IMAGE, half_close=True)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("status", "raw"), FOUND, ids=lambda x: f"{x}" if isinstance(x, int) else x.path
)
def test_found_framings_stay_fixed(server, status, raw):
    (answer,) = check_answers(server, raw)
    assert answer.status == status, answer.body


@FUZZ
@given(data=st.data())
def test_any_framing_of_any_request_to_any_route(server, data):
    check_answers(server, data.draw(any_framed_request(server.version)))


@FUZZ
@given(data=st.data())
def test_a_valid_body_well_framed_in_any_way_is_answered(server, data):
    raw = data.draw(st.sampled_from(valid_requests(server.version)))
    sizes = data.draw(chunk_sizes(len(raw.body)))
    how = data.draw(st.sampled_from(["length", "chunked", "extension", "length-and-chunked"]))
    if how == "length":
        raw = with_length(raw, len(raw.body))
    else:
        extension = b";a=b" if how == "extension" else b""
        raw.body = chunked(raw.body, sizes, extension)
        raw.headers.append((b"Transfer-Encoding", data.draw(st.sampled_from(CHUNKED))))
        if how == "length-and-chunked":  # Transfer-Encoding wins (RFC 9112 6.3)
            raw = with_length(raw, data.draw(st.integers(0, len(raw.body))))
    (answer,) = check_answers(server, raw)
    assert answer.status == 200, (raw, answer.body[:300])


@FUZZ
@given(data=st.data())
def test_a_body_cut_short_of_its_content_length_is_incomplete_on_every_body_route(server, data):
    raw = data.draw(st.sampled_from(valid_requests(server.version)))
    length = len(raw.body) + data.draw(st.integers(0, 5000))
    cut = data.draw(st.integers(0, min(len(raw.body), length - 1)))
    raw = with_length(raw, length)
    raw.body, raw.half_close = raw.body[:cut], True
    (answer,) = check_answers(server, raw)
    assert answer.status == 400, (raw, answer.body[:300])
    error = json.loads(answer.body)["error"]
    if route_path(raw.path).startswith(PROTOCOL_PREFIXES):
        assert "Content-Length" in error, error
    else:
        assert error["code"] == "incomplete_body", error
