"""Content sniffing: a declared type is accepted only when the file's first bytes agree."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import UnsupportedMediaTypeError
from gateway.sniff import ALLOWED_TYPES, DOCX, PDF, SNIFF_BYTES, TEXT, check_type

PDF_HEAD = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"
DOCX_HEAD = b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00[Content_Types].xml"


def refused(declared: str, head: bytes, **kwargs: str) -> UnsupportedMediaTypeError:
    with pytest.raises(UnsupportedMediaTypeError) as info:
        check_type(declared, head, **kwargs)
    assert info.value.http_status == 415 and info.value.field == "content_type"
    return info.value


def test_the_accepted_types_are_text_pdf_and_docx_only() -> None:
    assert frozenset({TEXT, PDF, DOCX}) == ALLOWED_TYPES
    assert DOCX == "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    assert SNIFF_BYTES >= 8


@pytest.mark.parametrize(
    ("declared", "head"),
    [
        (TEXT, "Ett essä om vårt språk.\r\n".encode()),
        (TEXT, b""),
        (TEXT, b"\xef\xbb\xbfwith a BOM"),
        ("Text/Plain; charset=UTF-8", b"plain"),
        ('text/plain; charset="us-ascii"', b"plain"),
        (PDF, PDF_HEAD),
        ("application/PDF", PDF_HEAD),
        (DOCX, DOCX_HEAD),
    ],
)
def test_matching_content_is_accepted(declared: str, head: bytes) -> None:
    check_type(declared, head)


@pytest.mark.parametrize(
    "declared",
    ["application/msword", "application/octet-stream", "image/png", "text/html", "", "text"],
)
def test_other_declared_types_are_refused(declared: str) -> None:
    error = refused(declared, b"anything", filename="essay.doc")
    assert error.message.startswith("essay.doc: type ")
    assert "is not accepted; one of application/pdf" in error.message


@pytest.mark.parametrize(
    ("declared", "head", "message"),
    [
        (PDF, b"%PDF", "is not a PDF"),
        (PDF, b"", "is not a PDF"),
        (PDF, b" %PDF-1.7", "is not a PDF"),
        (PDF, DOCX_HEAD, "is not a PDF"),
        (DOCX, PDF_HEAD, "is not a DOCX"),
        (DOCX, b"PK\x05\x06" + b"\x00" * 18, "is not a DOCX"),
        (DOCX, b"just text", "is not a DOCX"),
        (TEXT, PDF_HEAD, "not UTF-8 text (invalid byte at offset 10)"),
        (TEXT, DOCX_HEAD, "holds NUL bytes"),
        (TEXT, b"abc\x00def", "holds NUL bytes"),
        (TEXT, "latin-1 ä".encode("latin-1"), "not UTF-8 text"),
        (TEXT, b"\xed\xa0\x80 a surrogate", "not UTF-8 text (invalid byte at offset 0)"),
        (TEXT, b"\xc0\xaf overlong", "not UTF-8 text"),
        (TEXT, "short, ends inside ä".encode()[:-1], "not UTF-8 text"),
        ("text/plain; charset=iso-8859-1", b"plain", "charset 'iso-8859-1' is not accepted"),
    ],
)
def test_mismatching_content_is_refused(declared: str, head: bytes, message: str) -> None:
    error = refused(declared, head, filename="f.bin")
    assert error.message.startswith("f.bin: ") and message in error.message, error.message


def test_a_sample_may_end_inside_a_character_but_a_whole_short_file_may_not() -> None:
    text = ("ä" * SNIFF_BYTES).encode()  # two bytes each
    sample = text[: SNIFF_BYTES + 1]
    check_type(TEXT, sample)  # cut to SNIFF_BYTES: ends on a whole character
    check_type(TEXT, b"a" + text[: SNIFF_BYTES - 1])  # the sample ends after half an "ä"
    refused(TEXT, b"a" + text[: SNIFF_BYTES - 3])  # the whole file ends after half an "ä"


def test_bytes_past_the_sample_are_not_looked_at() -> None:
    check_type(TEXT, b"a" * SNIFF_BYTES + b"\x00\xff")


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"])), st.data())
def test_any_utf8_text_without_nul_is_accepted_wherever_the_sample_is_cut(
    text: str, data: st.DataObject
) -> None:
    encoded = text.encode()
    check_type(TEXT, encoded)  # the whole (short) file
    # As the start of a longer file: any cut of at least SNIFF_BYTES bytes passes.
    padded = b"x" * data.draw(st.integers(0, SNIFF_BYTES)) + encoded + b"y" * SNIFF_BYTES
    cut = data.draw(st.integers(SNIFF_BYTES, len(padded)))
    check_type(TEXT, padded[:cut])
