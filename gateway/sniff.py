"""Content sniffing: do a file's first bytes match the media type it declares?

An upload declares its type; a client can declare anything, so the first :data:`SNIFF_BYTES`
bytes must agree with it before any byte is forwarded:

==========================================================================  ===================
declared type                                                               first bytes
==========================================================================  ===================
``text/plain`` (``charset`` absent, ``utf-8`` or ``us-ascii``)              UTF-8 (a BOM is
                                                                            fine), no NUL byte
``application/pdf``                                                         ``%PDF-``
``application/vnd.openxmlformats-officedocument.wordprocessingml.document``  ``PK\\x03\\x04`` (a
                                                                            ZIP local header)
==========================================================================  ===================

``application/msword`` (legacy ``.doc``, an OLE2 compound file) is deliberately not accepted:
it is a macro carrier, its signature (``D0 CF 11 E0``) is shared by every OLE2 format (``.xls``,
``.msg``...), and the essay pipeline reads text, PDF and DOCX.

This is a gate against mislabelled or hostile uploads, not a validator: a ZIP that is not a
DOCX, or a PDF that is broken after its header, passes here and is the backend's to refuse;
for text only the first bytes are checked.
"""

from __future__ import annotations

import codecs

from common.errors import UnsupportedMediaTypeError

__all__ = ["ALLOWED_TYPES", "DOCX", "PDF", "SNIFF_BYTES", "TEXT", "check_type"]

TEXT = "text/plain"
PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"

#: The media types :func:`check_type` can vouch for.
ALLOWED_TYPES: frozenset[str] = frozenset({TEXT, PDF, DOCX})

#: How many first bytes :func:`check_type` wants: enough for the binary signatures, and a
#: useful sample of a text file (about a paragraph).
SNIFF_BYTES = 1024

_SIGNATURES: dict[str, tuple[bytes, str]] = {
    PDF: (b"%PDF-", "a PDF"),
    DOCX: (b"PK\x03\x04", "a DOCX (ZIP) document"),
}
_TEXT_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii"})


def check_type(declared: str, first_bytes: bytes, *, filename: str | None = None) -> None:
    """Refuse a file whose declared type is not accepted or whose first bytes disagree with it.

    ``declared`` is the part's ``Content-Type`` (parameters and case do not matter).
    ``first_bytes`` must be the file's first :data:`SNIFF_BYTES` bytes, or the whole file when
    it is shorter: fewer bytes than that are taken as the complete file (so text may then not
    end inside a UTF-8 character); bytes beyond ``SNIFF_BYTES`` are not looked at.
    ``filename`` only prefixes the message.

    Raises :class:`~common.errors.UnsupportedMediaTypeError` (415, ``field="content_type"``).
    """
    prefix = f"{filename}: " if filename else ""
    media_type, _, params = declared.partition(";")
    media_type = media_type.strip().lower()
    if media_type not in ALLOWED_TYPES:
        raise UnsupportedMediaTypeError(
            f"{prefix}type {media_type or 'none'!r} is not accepted; one of "
            f"{', '.join(sorted(ALLOWED_TYPES))}",
            field="content_type",
        )
    head = first_bytes[:SNIFF_BYTES]
    if media_type == TEXT:
        _check_text(head, complete=len(first_bytes) < SNIFF_BYTES, params=params, prefix=prefix)
        return
    signature, label = _SIGNATURES[media_type]
    if not head.startswith(signature):
        raise UnsupportedMediaTypeError(
            f"{prefix}content is not {label}, as its type {media_type!r} says",
            field="content_type",
        )


def _check_text(head: bytes, *, complete: bool, params: str, prefix: str) -> None:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in _TEXT_CHARSETS:
            raise UnsupportedMediaTypeError(
                f"{prefix}text charset {charset!r} is not accepted; send UTF-8",
                field="content_type",
            )
    if b"\x00" in head:
        raise UnsupportedMediaTypeError(
            f"{prefix}content holds NUL bytes: not text/plain", field="content_type"
        )
    try:
        # Not final unless complete: the sample may end inside a multi-byte character.
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=complete)
    except UnicodeDecodeError as exc:
        raise UnsupportedMediaTypeError(
            f"{prefix}content is not UTF-8 text (invalid byte at offset {exc.start})",
            field="content_type",
        ) from None
