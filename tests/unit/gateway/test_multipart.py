"""The incremental multipart/form-data parser: round trips split anywhere, malformed bodies
refused with a 422 naming the problem, and bounded memory on a 100 MB body."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import UnsupportedMediaTypeError, ValidationError
from gateway.multipart import (
    DEFAULT_MAX_HEADER_BYTES,
    Event,
    Finished,
    MultipartParser,
    PartData,
    PartEnded,
    PartStarted,
    boundary_from_content_type,
)

BOUNDARY = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"
CT = "multipart/form-data; boundary=" + BOUNDARY.decode()


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


def build(
    parts: list[Part], boundary: bytes = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b""
) -> bytes:
    """A reference encoder (what a browser sends)."""
    out = [preamble + b"\r\n" if preamble else b""]
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        out.append(b"--" + boundary + b"\r\n")
        out.append(f"Content-Disposition: {disposition}\r\n".encode())
        out.append(f"Content-Type: {part.content_type}\r\n\r\n".encode())
        out.append(part.data + b"\r\n")
    out.append(b"--" + boundary + b"--")
    if epilogue:
        out.append(b"\r\n" + epilogue)
    return b"".join(out)


def collect(events: list[Event]) -> list[Part]:
    """Fold events into parts, checking their order on the way."""
    parts: list[Part] = []
    current: Part | None = None
    finished = False
    for event in events:
        assert not finished, f"event after Finished: {event}"
        if isinstance(event, PartStarted):
            assert current is None, "PartStarted inside a part"
            current = Part(event.name, event.filename, event.content_type, b"")
        elif isinstance(event, PartData):
            assert current is not None, "PartData outside a part"
            assert event.data, "empty PartData"
            current.data += event.data
        elif isinstance(event, PartEnded):
            assert current is not None, "PartEnded outside a part"
            parts.append(current)
            current = None
        else:
            assert isinstance(event, Finished)
            assert current is None, "Finished inside a part"
            finished = True
    assert finished, "no Finished event"
    return parts


def parse(body: bytes, cuts: list[int] | None = None, boundary: bytes = BOUNDARY) -> list[Part]:
    parser = MultipartParser(boundary)
    events: list[Event] = []
    edges = [0, *sorted(cuts or []), len(body)]
    for start, stop in itertools.pairwise(edges):
        events += parser.feed(body[start:stop])
        assert parser.buffered_bytes <= parser.max_buffered_bytes
    events += parser.end()
    return collect(events)


def refused(body: bytes, **kwargs: int) -> ValidationError:
    parser = MultipartParser(BOUNDARY, **kwargs)
    with pytest.raises(ValidationError) as info:
        parser.feed(body)
        parser.end()
    return info.value


# --- round trips ------------------------------------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
boundaries = st.builds(
    lambda head, last: head + last,
    st.text(alphabet=BCHARS + " ", max_size=69),
    st.sampled_from(BCHARS),
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[Part], list[int], bytes]:
    boundary = draw(boundaries).encode()
    delimiter = b"\r\n--" + boundary
    # Data made of pieces that look like the delimiter's start, CR/LF runs and random bytes.
    tricky = st.sampled_from(
        [b"\r", b"\n", b"\r\n", b"--", b"\r\n--", b"\r\n\r\n", delimiter[:-1], delimiter[:3]]
        + [delimiter[: i + 1] for i in range(0, len(delimiter) - 1, 7)]
        + [b"--" + boundary, b"--" + boundary + b"--"]
    )
    piece = st.one_of(tricky, st.binary(max_size=40))
    data = st.lists(piece, max_size=12).map(b"".join).filter(lambda d: delimiter not in d)
    name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789[]. -", min_size=1, max_size=12)
    filename = st.none() | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_ ().", max_size=10).map(
        lambda s: s + "x.txt"
    )
    content_type = st.sampled_from(["text/plain", "application/pdf", "application/octet-stream"])
    parts = draw(st.lists(st.builds(Part, name, filename, content_type, data), max_size=5))
    preamble = draw(st.sampled_from([b"", b"This is a preamble.", b"--" + boundary[:-1]]))
    epilogue = draw(st.sampled_from([b"", b"epilogue\r\n--" + boundary + b"\r\n"]))
    body = build(parts, boundary, preamble, epilogue)
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=20))
    return boundary, parts, cuts, body


@settings(max_examples=400, deadline=None)
@given(bodies())
def test_generated_bodies_split_anywhere_parse_to_the_same_parts(
    case: tuple[bytes, list[Part], list[int], bytes],
) -> None:
    boundary, parts, cuts, body = case
    assert parse(body, cuts, boundary) == parts, f"cuts {sorted(cuts)} of {body!r}"


@settings(max_examples=100, deadline=None)
@given(bodies())
def test_byte_at_a_time_gives_the_same_parts(
    case: tuple[bytes, list[Part], list[int], bytes],
) -> None:
    boundary, parts, _, body = case
    assert parse(body, list(range(len(body))), boundary) == parts


@settings(max_examples=100, deadline=None)
@given(boundaries)
def test_boundary_round_trips_through_the_content_type_header(boundary: str) -> None:
    quoted = boundary_from_content_type(f'multipart/form-data; boundary="{boundary}"')
    assert quoted == boundary.encode()


def test_browser_body_with_preamble_padding_and_epilogue() -> None:
    body = (
        b"ignored preamble\r\n"
        b"--" + BOUNDARY + b" \t\r\n"
        b'Content-Disposition: form-data; name="essay"; filename="C:\\Users\\ann\\essay.txt"\r\n'
        b"Content-Type: Text/Plain; charset=utf-8\r\n"
        b"\r\n"
        b"line 1\r\n\r\n--not the boundary\r\n"
        b"--" + BOUNDARY + b"\r\n"
        b"content-disposition: form-data; name=comment\r\n"
        b"\r\n"
        b"\r\n--" + BOUNDARY + b"--  \r\nthe epilogue, ignored: --" + BOUNDARY + b"\r\n"
    )
    assert parse(body) == [
        Part("essay", "essay.txt", "text/plain", b"line 1\r\n\r\n--not the boundary"),
        Part("comment", None, "text/plain", b""),
    ]


def test_part_started_carries_the_headers_in_order() -> None:
    body = build([Part("f", "a.pdf", "application/pdf", b"%PDF-")])
    started = [e for e in MultipartParser(BOUNDARY).feed(body) if isinstance(e, PartStarted)]
    assert started == [
        PartStarted(
            "f",
            "a.pdf",
            "application/pdf",
            (
                ("content-disposition", 'form-data; name="f"; filename="a.pdf"'),
                ("content-type", "application/pdf"),
            ),
        )
    ]


def test_a_body_with_no_parts_just_finishes() -> None:
    parser = MultipartParser(BOUNDARY)
    assert parser.feed(b"--" + BOUNDARY + b"--") == [Finished()]
    assert parser.feed(b"anything after is the epilogue") == []
    assert parser.end() == []


def test_data_is_emitted_as_it_arrives_except_a_possible_delimiter_start() -> None:
    parser = MultipartParser(BOUNDARY)
    parser.feed(b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"\r\n\r\n')
    assert parser.feed(b"x" * 1000) == [PartData(b"x" * 1000)], "plain data held back"
    assert parser.feed(b"abc\r\n--" + BOUNDARY[:5]) == [PartData(b"abc")]
    assert parser.buffered_bytes == 4 + 5, "only the delimiter's possible start is held"
    assert parser.feed(b"!") == [PartData(b"\r\n--" + BOUNDARY[:5] + b"!")]
    assert parser.buffered_bytes == 0
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\n--" + BOUNDARY + b"--") == [PartEnded(), Finished()]


@pytest.mark.parametrize(
    ("disposition", "name", "filename"),
    [
        ('form-data; name="a"; filename="../../etc/passwd"', "a", "passwd"),
        ('form-data; name="a"; filename="dir\\sub\\x.docx"', "a", "x.docx"),
        ('form-data; name="a"; filename="C:x.pdf"', "a", "x.pdf"),
        ('form-data; name="a"; filename="say \\"hi\\".txt"', "a", 'say "hi".txt'),
        ("form-data; name=a; filename=plain.txt", "a", "plain.txt"),
        ('Form-Data ; NAME = "a" ; FileName="b.txt" ;', "a", "b.txt"),
        (
            'form-data; name="a"; filename="x.txt"; filename*=UTF-8\'\'%C3%A6ssay.txt',
            "a",
            "æssay.txt",
        ),
        ("form-data; name=\"a\"; filename*=utf-8'en'%2E%2E%2Fx.txt", "a", "x.txt"),
        ('form-data; name="å"; filename="résumé.txt"', "å", "résumé.txt"),
    ],
)
def test_content_disposition(disposition: str, name: str, filename: str) -> None:
    body = (
        b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n"
        b"data\r\n--" + BOUNDARY + b"--"
    )
    assert parse(body) == [Part(name, filename, "text/plain", b"data")]


def test_a_100_mb_body_in_64_kib_chunks_keeps_the_buffer_bounded() -> None:
    size, chunk = 100 * 1024 * 1024, 64 * 1024
    delimiter = b"\r\n--" + BOUNDARY
    # Every block is full of near-delimiters, and one ends on a delimiter prefix at a chunk edge.
    unit = b"\r\n--" + BOUNDARY[:-1] + b"\x00" * 100
    block = unit * ((chunk - len(delimiter)) // len(unit))
    block += b"\xff" * (chunk - len(block) - len(delimiter) + 1) + delimiter[:-1]
    assert len(block) == chunk and delimiter not in block + block

    def body() -> Iterator[bytes]:
        yield (
            b"--"
            + BOUNDARY
            + b'\r\nContent-Disposition: form-data; name="f"; filename="big"\r\n\r\n'
        )
        for _ in range(size // chunk):
            yield block
        yield delimiter + b"--\r\n"

    parser = MultipartParser(BOUNDARY)
    seen, largest, most_buffered = hashlib.sha256(), 0, 0
    events: list[Event] = []
    for piece in body():
        for event in parser.feed(piece):
            if isinstance(event, PartData):
                seen.update(event.data)
                largest = max(largest, len(event.data))
            else:
                events.append(event)
        most_buffered = max(most_buffered, parser.buffered_bytes)
    events += parser.end()
    expected = hashlib.sha256()
    for _ in range(size // chunk):
        expected.update(block)
    assert seen.hexdigest() == expected.hexdigest(), "the file's bytes changed"
    assert [type(e) for e in events] == [PartStarted, PartEnded, Finished]
    assert most_buffered == len(delimiter) - 1, f"held {most_buffered} bytes between chunks"
    assert parser.max_buffered_bytes == DEFAULT_MAX_HEADER_BYTES + 3
    assert largest <= chunk + len(delimiter), f"a PartData of {largest} bytes"


def test_a_header_block_trickled_in_is_held_only_up_to_its_limit() -> None:
    parser = MultipartParser(BOUNDARY, max_header_bytes=1024)
    parser.feed(b"--" + BOUNDARY + b"\r\nX-Long: ")
    with pytest.raises(ValidationError) as info:
        for _ in range(2000):
            parser.feed(b"a")
            assert parser.buffered_bytes <= parser.max_buffered_bytes
    assert info.value.field == "parts.0.headers"
    assert "header block exceeds 1024 bytes" in info.value.message


# --- refusals ---------------------------------------------------------------------------------

OPEN = b"--" + BOUNDARY + b"\r\n"
CD = b'Content-Disposition: form-data; name="f"\r\n'
CLOSE = b"\r\n--" + BOUNDARY + b"--"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (b"no delimiter at all", "body", "holds no boundary delimiter"),
        (OPEN + CD + b"\r\ndata", "body", "before the closing boundary delimiter"),
        (OPEN + CD + b"\r\ndata\r\n--" + BOUNDARY, "body", "before the closing"),
        (OPEN + CD, "body", "inside the headers of part 0"),
        (b"--" + BOUNDARY + b"x\r\n" + CD + b"\r\n" + CLOSE, "body", "followed by CRLF or '--'"),
        (b"--" + BOUNDARY + b"\n" + CD + b"\r\n" + CLOSE, "body", "followed by CRLF or '--'"),
        (OPEN + CD + b"\r\nd\r\n--" + BOUNDARY + b"-x" + CLOSE, "body", "followed by CRLF"),
        (b"--" + BOUNDARY + b" " * 65 + b"\r\n", "body", "too much padding"),
        (OPEN + b"\r\ndata" + CLOSE, "parts.0.headers", "no Content-Disposition header"),
        (OPEN + b"Content-Disposition form-data\r\n\r\n" + CLOSE, "parts.0.headers", "malformed"),
        (OPEN + CD + b" folded\r\n\r\n" + CLOSE, "parts.0.headers", "folded header lines"),
        (OPEN + b"X-A: a\nb\r\n" + CD + b"\r\n" + CLOSE, "parts.0.headers", "bare CR/LF"),
        (OPEN + b"X-A: \x00\r\n" + CD + b"\r\n" + CLOSE, "parts.0.headers", "control character"),
        (OPEN + b"X-A: \xff\r\n" + CD + b"\r\n" + CLOSE, "parts.0.headers", "is not UTF-8"),
        (OPEN + CD + CD + b"\r\n" + CLOSE, "parts.0.headers", "more than one content-disp"),
        (
            OPEN + CD + b"Content-Type: a/b\r\nContent-Type: c/d\r\n\r\n" + CLOSE,
            "parts.0.headers",
            "more than one content-type",
        ),
        (
            OPEN + CD + b"Content-Transfer-Encoding: base64\r\n\r\n" + CLOSE,
            "parts.0.headers",
            "Content-Transfer-Encoding 'base64' is not supported",
        ),
        (OPEN + CD + b"Content-Type: nonsense\r\n\r\n" + CLOSE, "parts.0.content_type", "not a"),
        (OPEN + b"X: y\r\n" * 17 + CD + b"\r\n" + CLOSE, "parts.0.headers", "more than 16"),
        (
            OPEN + b"X: " + b"y" * 9000 + b"\r\n" + CD + b"\r\n" + CLOSE,
            "parts.0.headers",
            "header block exceeds 8192 bytes",
        ),
    ],
)
def test_malformed_body_is_refused(body: bytes, field: str, message: str) -> None:
    error = refused(body)
    assert error.field == field and message in error.message, repr(error)
    assert error.http_status == 422


@pytest.mark.parametrize(
    ("disposition", "field", "message"),
    [
        (b"attachment; name=f", "parts.0.headers", "must be form-data"),
        (b"form-data", "parts.0.name", "has no name"),
        (b'form-data; filename="a.txt"', "parts.0.name", "has no name"),
        (b'form-data; name=""', "parts.0.name", "has no name"),
        (b'form-data; name="a"; name="b"', "parts.0.headers", "more than one 'name'"),
        (b'form-data; name="a', "parts.0.headers", "unterminated quoted string"),
        (b'form-data; name="a" junk', "parts.0.headers", "expected ';'"),
        (b"form-data; name=", "parts.0.headers", "has no value"),
        (b'form-data; name="a"; filename="x\ty"', "parts.0.filename", "control"),
        (b"form-data; name=a; filename*=UTF-8''a%00b", "parts.0.filename", "control"),
        (b"form-data; name=a; filename*=UTF-8''a%0Ab", "parts.0.filename", "control"),
        (b"form-data; name=a; filename*=UTF-8''%E2%80%AEtxt.exe", "parts.0.filename", "bidi"),
        (b"form-data; name=a; filename*=ISO-8859-1''a%E6.txt", "parts.0.filename", "RFC 5987"),
        (b"form-data; name=a; filename*=UTF-8''%FF.txt", "parts.0.filename", "is not UTF-8"),
        (b'form-data; name="a"; filename=""', "parts.0.filename", "no file name part"),
        (b'form-data; name="a"; filename="../"', "parts.0.filename", "no file name part"),
        (b'form-data; name="a"; filename="a/.."', "parts.0.filename", "no file name part"),
        (b'form-data; name="a"; filename="' + b"x" * 256 + b'"', "parts.0.filename", "255"),
    ],
)
def test_bad_content_disposition_is_refused(disposition: bytes, field: str, message: str) -> None:
    body = OPEN + b"Content-Disposition: " + disposition + b"\r\n\r\n" + CLOSE
    error = refused(body)
    assert error.field == field and message in error.message, repr(error)


def test_the_second_part_is_named_in_the_error() -> None:
    body = OPEN + CD + b"\r\nok\r\n--" + BOUNDARY + b"\r\nX: y\r\n\r\n" + CLOSE
    error = refused(body)
    assert error.field == "parts.1.headers" and error.message.startswith("part 1:"), repr(error)


def test_a_failed_parser_keeps_failing() -> None:
    parser = MultipartParser(BOUNDARY)
    with pytest.raises(ValidationError) as first:
        parser.feed(b"--" + BOUNDARY + b"junk")
    with pytest.raises(ValidationError) as again:
        parser.feed(OPEN + CD + b"\r\n" + CLOSE)
    assert again.value is first.value
    with pytest.raises(ValidationError):
        parser.end()
    assert parser.buffered_bytes == 0


def test_the_header_limit_is_a_parameter() -> None:
    body = OPEN + b"X: " + b"y" * 100 + b"\r\n" + CD + b"\r\n" + CLOSE
    assert refused(body, max_header_bytes=100).extra == {"limit": "max_header_bytes", "max": 100}
    assert "more than 1 header" in refused(body, max_headers=1).message
    parser = MultipartParser(
        BOUNDARY, max_header_bytes=len(b"X: " + b"y" * 100 + b"\r\n") + len(CD)
    )
    assert [type(e) for e in parser.feed(body)] == [PartStarted, PartEnded, Finished]


def test_an_invalid_boundary_is_a_programming_error() -> None:
    for boundary in (b"", b"x" * 71, b"a\rb", b"ends with space "):
        with pytest.raises(ValueError, match="invalid multipart boundary"):
            MultipartParser(boundary)


# --- the request's Content-Type ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "boundary"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ('multipart/form-data; boundary="a b:c?"', b"a b:c?"),
        ("Multipart/Form-Data;BOUNDARY=abc;charset=utf-8", b"abc"),
        ('multipart/form-data; charset="x;y"; boundary=----x', b"----x"),
        ("multipart/form-data; boundary=" + "z" * 70, b"z" * 70),
    ],
)
def test_boundary_from_content_type(value: str, boundary: bytes) -> None:
    assert boundary_from_content_type(value) == boundary


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("multipart/form-data", "no boundary parameter"),
        ("multipart/form-data; boundary=", "has no value"),
        ('multipart/form-data; boundary=""', "1 to 70 characters, got 0"),
        ("multipart/form-data; boundary=" + "z" * 71, "1 to 70 characters, got 71"),
        ('multipart/form-data; boundary="ends "', "spaces (not last)"),
        ("multipart/form-data; boundary=a@b", "may hold only"),
        ('multipart/form-data; boundary="a\\"b"', "may hold only"),
        ("multipart/form-data; boundary=a; boundary=b", "more than one boundary"),
        ('multipart/form-data; boundary="abc', "unterminated quoted string"),
        ("multipart/form-data boundary=abc", "expected ';'"),
    ],
)
def test_bad_boundary_is_refused(value: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        boundary_from_content_type(value)
    assert info.value.field == "content-type" and message in info.value.message, repr(info.value)


@pytest.mark.parametrize("value", ["", "application/json", "multipart/mixed; boundary=x", "x"])
def test_other_media_types_are_415(value: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as info:
        boundary_from_content_type(value)
    assert info.value.field == "content-type" and info.value.http_status == 415
    assert "expected multipart/form-data" in info.value.message
