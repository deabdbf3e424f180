"""A sans-IO, incremental ``multipart/form-data`` parser (RFC 7578 framing over RFC 2046).

Feed it the body as it arrives; it returns events and keeps almost nothing::

    parser = MultipartParser(boundary_from_content_type(headers["content-type"]))
    for chunk in body:
        for event in parser.feed(chunk):
            ...  # PartStarted, PartData*, PartEnded per part, then Finished
    parser.end()  # raises if the closing delimiter never came

Part data is emitted as soon as it arrives, except for a trailing piece that could be the
start of the next delimiter (at most ``len(boundary) + 3`` bytes). Between calls the parser
holds at most :attr:`MultipartParser.max_buffered_bytes` (``buffered_bytes`` says how much it
holds now); each byte is scanned a bounded number of times, so the cost is linear in the body.

Strict where a lenient reading could differ from another parser's: the delimiter line must end
with CRLF (transport padding of spaces/tabs is accepted), the boundary must never appear in part
data unless as a delimiter, header lines must end with CRLF, folded lines, control characters,
duplicate ``Content-Disposition``/``Content-Type`` and encoded transfer encodings are refused.
The preamble and epilogue are ignored. File names lose any directory (``/`` or ``\\``) or
drive part and must be free of control and bidi-override characters; they are not
percent-decoded (``filename*=UTF-8''...``, RFC 5987, is, and wins over ``filename``).

Every problem in the body is a :class:`~common.errors.ValidationError` (422) whose ``field`` is
``body`` or ``parts.<i>.<what>`` (``i`` counts parts from 0). Limits on sizes, counts and types
are the caller's: this module only bounds each part's header block.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import Enum, auto
from urllib.parse import unquote_to_bytes

from common.errors import UnsupportedMediaTypeError, ValidationError

__all__ = [
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_BYTES",
    "MAX_FILENAME_BYTES",
    "MAX_TRANSPORT_PADDING",
    "Event",
    "Finished",
    "MultipartParser",
    "PartData",
    "PartEnded",
    "PartStarted",
    "boundary_from_content_type",
]

#: Largest header block of one part (its header lines with their CRLFs, not the empty line).
DEFAULT_MAX_HEADER_BYTES = 8 * 1024
#: Most header lines in one part (browsers send two or three).
DEFAULT_MAX_HEADERS = 16
#: Spaces/tabs tolerated between a delimiter and its CRLF (RFC 2046 transport padding).
MAX_TRANSPORT_PADDING = 64
#: Longest file name accepted, in UTF-8 bytes (what common file systems store).
MAX_FILENAME_BYTES = 255

_TCHARS = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(f"[{_TCHARS}]+")
_TOKEN_BYTES = re.compile(f"[{_TCHARS}]+".encode())
_MEDIA_TYPE = re.compile(f"[ \t]*([{_TCHARS}]+)/([{_TCHARS}]+)")
_BARE_VALUE = re.compile(r'[^;" \t]+')
_QUOTED = re.compile(r'"((?:[^"\\]+|\\.)*)"')
_ESCAPE = re.compile(r'\\([\\"])')
_CTL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # HTAB is the one control allowed
# RFC 2046 bchars, at most 70, not ending in a space.
_BOUNDARY_CHARS = r"0-9A-Za-z'()+_,\-./:=?"
_BOUNDARY = re.compile(f"[{_BOUNDARY_CHARS} ]{{0,69}}[{_BOUNDARY_CHARS}]")
_BOUNDARY_BYTES = re.compile(_BOUNDARY.pattern.encode())
# RFC 5987 ext-value, UTF-8 only: charset ' [language] ' value-chars
_EXT_VALUE = re.compile(r"(?i:utf-8)'[A-Za-z0-9-]*'((?:%[0-9A-Fa-f]{2}|[A-Za-z0-9!#$&+\-.^_`|~])*)")
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})


@dataclass(frozen=True, slots=True)
class PartStarted:
    """A part's headers are complete; its data follows.

    ``filename`` is ``None`` for a plain form field, otherwise a bare, non-empty file name.
    ``content_type`` is the lower-case ``type/subtype`` without parameters (``text/plain`` when
    the part has no ``Content-Type``, as RFC 7578 says). ``headers`` holds every header line as
    (lower-case name, value) in order.
    """

    name: str
    filename: str | None
    content_type: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class PartData:
    """The next bytes of the current part (never empty)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnded:
    """The current part is complete."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The closing delimiter was seen; anything after it (the epilogue) is ignored."""


Event = PartStarted | PartData | PartEnded | Finished


class _State(Enum):
    PREAMBLE = auto()
    DELIMITER = auto()  # just after "\r\n--boundary": "--" or padding + CRLF must follow
    HEADERS = auto()
    DATA = auto()
    EPILOGUE = auto()
    FAILED = auto()


def boundary_from_content_type(value: str) -> bytes:
    """The boundary of a ``multipart/form-data`` request ``Content-Type`` header value.

    Raises :class:`~common.errors.UnsupportedMediaTypeError` (415) when the value is missing or
    is another media type, and :class:`~common.errors.ValidationError` (422) when the parameters
    are malformed or the boundary is missing, duplicated, longer than 70 characters or holds
    characters outside RFC 2046's set; both with ``field="content-type"``.
    """
    field = "content-type"
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise UnsupportedMediaTypeError(
            "Content-Type is missing or not a media type; expected multipart/form-data",
            field=field,
        )
    media_type = f"{match[1]}/{match[2]}".lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"Content-Type {media_type!r} is not accepted; expected multipart/form-data",
            field=field,
        )
    params = _parse_params(value, match.end(), "Content-Type", field)
    boundaries = [v for k, v in params if k == "boundary"]
    if not boundaries:
        raise ValidationError("Content-Type has no boundary parameter", field=field)
    if len(boundaries) > 1:
        raise ValidationError("Content-Type has more than one boundary parameter", field=field)
    boundary = boundaries[0]
    if not 1 <= len(boundary) <= 70:
        raise ValidationError(
            f"multipart boundary must be 1 to 70 characters, got {len(boundary)}", field=field
        )
    if _BOUNDARY.fullmatch(boundary) is None:
        raise ValidationError(
            "multipart boundary may hold only letters, digits, spaces (not last) and '()+_,-./:=?",
            field=field,
        )
    return boundary.encode("ascii")


class MultipartParser:
    """Incremental parser of one ``multipart/form-data`` body (see the module docstring).

    ``boundary`` is the raw boundary (from :func:`boundary_from_content_type`); an invalid one
    is a ``ValueError`` (a bug of the caller, not of the client). After a ``ValidationError``
    the parser is failed: every later call raises the same error.
    """

    def __init__(
        self,
        boundary: bytes,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        if _BOUNDARY_BYTES.fullmatch(boundary) is None:
            raise ValueError(f"invalid multipart boundary {boundary!r}")
        if max_header_bytes < 1 or max_headers < 1:
            raise ValueError("max_header_bytes and max_headers must be positive")
        self._delimiter = b"\r\n--" + boundary
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        # A virtual CRLF in front: a body that opens with "--boundary" starts with a delimiter.
        self._buffer = b"\r\n"
        self._state = _State.PREAMBLE
        self._header_scan = 0  # where to resume looking for the header block's end
        self._part = -1
        self._error: ValidationError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held between calls (a possible delimiter start, or an unfinished header block)."""
        return len(self._buffer)

    @property
    def max_buffered_bytes(self) -> int:
        """Upper bound of :attr:`buffered_bytes`, whatever the body and however it is split."""
        return max(len(self._delimiter) - 1, MAX_TRANSPORT_PADDING + 1, self._max_header_bytes + 3)

    def feed(self, data: bytes) -> list[Event]:
        """Parse the next piece of the body; returns the events it completes.

        Raises :class:`~common.errors.ValidationError` for a malformed body. Data after
        :class:`Finished` is ignored.
        """
        if self._error is not None:
            raise self._error
        if self._state is _State.EPILOGUE:
            return []
        events: list[Event] = []
        buffer = self._buffer + data if self._buffer else bytes(data)
        try:
            self._buffer = self._run(buffer, events)
        except ValidationError as exc:
            self._fail(exc)
            raise
        return events

    def end(self) -> list[Event]:
        """Mark the end of the body; raises ``ValidationError`` unless it was complete."""
        if self._error is not None:
            raise self._error
        if self._state is _State.EPILOGUE:
            return []
        if self._state is _State.PREAMBLE:
            message = "multipart body holds no boundary delimiter"
        elif self._state is _State.HEADERS:
            message = f"multipart body ended inside the headers of part {self._part}"
        else:
            message = "multipart body ended before the closing boundary delimiter"
        error = ValidationError(message, field="body")
        self._fail(error)
        raise error

    def _fail(self, error: ValidationError) -> None:
        self._state = _State.FAILED
        self._error = error
        self._buffer = b""

    def _run(self, buf: bytes, events: list[Event]) -> bytes:
        """Advance through ``buf`` as far as it goes; returns the bytes to keep."""
        pos = 0
        delimiter = self._delimiter
        while True:
            state = self._state
            if state is _State.DATA or state is _State.PREAMBLE:
                found = buf.find(delimiter, pos)
                if found < 0:
                    keep = self._holdback(buf, pos)
                    if state is _State.DATA and keep > pos:
                        events.append(PartData(buf[pos:keep]))
                    return buf[keep:]
                if state is _State.DATA:
                    if found > pos:
                        events.append(PartData(buf[pos:found]))
                    events.append(PartEnded())
                pos = found + len(delimiter)
                self._state = _State.DELIMITER
            elif state is _State.DELIMITER:
                if buf.startswith(b"--", pos):
                    events.append(Finished())
                    self._state = _State.EPILOGUE
                    return b""
                end = len(buf)
                after = pos
                while after < end and buf[after] in b" \t":
                    after += 1
                    if after - pos > MAX_TRANSPORT_PADDING:
                        raise ValidationError(
                            "too much padding after a boundary delimiter", field="body"
                        )
                rest = buf[after : after + 2]
                if rest == b"\r\n":
                    pos = after + 2
                    self._part += 1
                    self._header_scan = 0
                    self._state = _State.HEADERS
                elif not (rest in (b"", b"\r") or (after == pos and rest == b"-")):
                    raise ValidationError(
                        "a boundary delimiter must be followed by CRLF or '--' (is the "
                        "boundary inside the data?)",
                        field="body",
                    )
                else:
                    return buf[pos:]  # wait for the bytes that decide
            elif state is _State.HEADERS:
                if buf.startswith(b"\r\n", pos):
                    block, pos = b"", pos + 2
                else:
                    found = buf.find(b"\r\n\r\n", pos + self._header_scan)
                    if found < 0:
                        if len(buf) - pos > self._max_header_bytes + 3:
                            raise self._header_block_too_large()
                        self._header_scan = max(0, len(buf) - pos - 3)
                        return buf[pos:]
                    if found - pos + 2 > self._max_header_bytes:
                        raise self._header_block_too_large()
                    block, pos = buf[pos:found], found + 4
                events.append(self._part_started(block))
                self._state = _State.DATA
            else:  # pragma: no cover - EPILOGUE and FAILED never reach _run
                raise AssertionError(state)

    def _holdback(self, buf: bytes, pos: int) -> int:
        """Where the tail that could begin the delimiter starts (``len(buf)`` if none).

        The boundary holds no CR, so the delimiter's only CR is its first byte: the one
        candidate is the suffix starting at the last CR among the final bytes.
        """
        cr = buf.rfind(b"\r", max(pos, len(buf) - len(self._delimiter) + 1))
        if cr >= 0 and self._delimiter.startswith(buf[cr:]):
            return cr
        return len(buf)

    def _header_block_too_large(self) -> ValidationError:
        return ValidationError(
            f"part {self._part}: header block exceeds {self._max_header_bytes} bytes",
            field=f"parts.{self._part}.headers",
            extra={"limit": "max_header_bytes", "max": self._max_header_bytes},
        )

    def _part_started(self, block: bytes) -> PartStarted:
        index = self._part
        field = f"parts.{index}.headers"
        lines = block.split(b"\r\n") if block else []
        if len(lines) > self._max_headers:
            raise ValidationError(
                f"part {index}: more than {self._max_headers} header lines", field=field
            )
        headers = tuple(_parse_header_line(line, index) for line in lines)
        single: dict[str, str] = {}
        for name, value in headers:
            if name in ("content-disposition", "content-type", "content-transfer-encoding"):
                if name in single:
                    raise ValidationError(f"part {index}: more than one {name} header", field=field)
                single[name] = value
        disposition = single.get("content-disposition")
        if disposition is None:
            raise ValidationError(f"part {index}: no Content-Disposition header", field=field)
        encoding = single.get("content-transfer-encoding")
        if encoding is not None and encoding.lower() not in _IDENTITY_ENCODINGS:
            raise ValidationError(
                f"part {index}: Content-Transfer-Encoding {encoding!r} is not supported",
                field=field,
            )
        name, filename = _parse_disposition(disposition, index)
        return PartStarted(
            name, filename, _part_media_type(single.get("content-type"), index), headers
        )


def _parse_header_line(line: bytes, index: int) -> tuple[str, str]:
    field = f"parts.{index}.headers"
    if line[:1] in (b" ", b"\t"):
        raise ValidationError(f"part {index}: folded header lines are not accepted", field=field)
    raw_name, colon, raw_value = line.partition(b":")
    if not colon or _TOKEN_BYTES.fullmatch(raw_name) is None:
        raise ValidationError(f"part {index}: malformed header line", field=field)
    name = raw_name.decode("ascii").lower()
    raw_value = raw_value.strip(b" \t")
    if _CTL_BYTES.search(raw_value):
        raise ValidationError(
            f"part {index}: control character (or bare CR/LF) in header {name}", field=field
        )
    try:
        return name, raw_value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"part {index}: header {name} is not UTF-8", field=field) from None


def _parse_params(text: str, pos: int, what: str, field: str) -> list[tuple[str, str]]:
    """``*( OWS ";" OWS name "=" ( token | quoted-string ) )`` from ``pos`` to the end."""
    params: list[tuple[str, str]] = []
    end = len(text)
    while True:
        pos = _skip_ows(text, pos)
        if pos == end:
            return params
        if text[pos] != ";":
            raise ValidationError(
                f"{what}: expected ';' before {text[pos : pos + 20]!r}", field=field
            )
        pos = _skip_ows(text, pos + 1)
        if pos == end:
            return params  # a trailing ";" is harmless
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValidationError(f"{what}: malformed parameter name", field=field)
        key = match[0].lower()
        pos = _skip_ows(text, match.end())
        if not text.startswith("=", pos):
            raise ValidationError(f"{what}: parameter {key!r} has no value", field=field)
        pos = _skip_ows(text, pos + 1)
        if text.startswith('"', pos):
            value, pos = _quoted_string(text, pos, what, field)
        else:
            match = _BARE_VALUE.match(text, pos)
            if match is None:
                raise ValidationError(f"{what}: parameter {key!r} has no value", field=field)
            value, pos = match[0], match.end()
        params.append((key, value))


def _skip_ows(text: str, pos: int) -> int:
    while text.startswith((" ", "\t"), pos):
        pos += 1
    return pos


def _quoted_string(text: str, pos: int, what: str, field: str) -> tuple[str, int]:
    r"""The quoted string whose opening quote is at ``pos``, and the position after it.

    Only ``\"`` and ``\\`` are unescaped: browsers send a backslash in a file name as is (the
    HTML form encoding percent-encodes only ``"``, CR and LF), so ``a\b`` stays ``a\b``.
    """
    match = _QUOTED.match(text, pos)
    if match is None:
        raise ValidationError(f"{what}: unterminated quoted string", field=field)
    return _ESCAPE.sub(r"\1", match[1]), match.end()


def _parse_disposition(value: str, index: int) -> tuple[str, str | None]:
    field = f"parts.{index}.headers"
    match = _TOKEN.match(value)
    if match is None or match[0].lower() != "form-data":
        raise ValidationError(f"part {index}: Content-Disposition must be form-data", field=field)
    params: dict[str, str] = {}
    for key, param in _parse_params(
        value, match.end(), f"part {index}: Content-Disposition", field
    ):
        if key in params:
            raise ValidationError(
                f"part {index}: Content-Disposition has more than one {key!r}", field=field
            )
        params[key] = param
    name = params.get("name")
    if not name:
        raise ValidationError(
            f"part {index}: Content-Disposition has no name", field=f"parts.{index}.name"
        )
    if _has_control(name):
        raise ValidationError(
            f"part {index}: name holds a control character", field=f"parts.{index}.name"
        )
    if "filename*" in params:
        return name, _safe_filename(_decode_ext_value(params["filename*"], index), index)
    if "filename" in params:
        return name, _safe_filename(params["filename"], index)
    return name, None


def _decode_ext_value(value: str, index: int) -> str:
    field = f"parts.{index}.filename"
    match = _EXT_VALUE.fullmatch(value)
    if match is None:
        raise ValidationError(
            f"part {index}: filename* must be a UTF-8 RFC 5987 value", field=field
        )
    try:
        return unquote_to_bytes(match[1]).decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"part {index}: filename* is not UTF-8", field=field) from None


def _safe_filename(raw: str, index: int) -> str:
    field = f"parts.{index}.filename"
    if _has_control(raw):
        raise ValidationError(
            f"part {index}: filename holds a control or bidi-override character", field=field
        )
    base = re.split(r"[/\\]", raw)[-1]
    if re.match(r"[A-Za-z]:", base):
        base = base[2:]  # "C:name" from an old Windows client
    if base in ("", ".", ".."):
        raise ValidationError(f"part {index}: filename has no file name part", field=field)
    if len(base.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise ValidationError(
            f"part {index}: filename is longer than {MAX_FILENAME_BYTES} bytes", field=field
        )
    return base


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in text)


def _part_media_type(value: str | None, index: int) -> str:
    if value is None:
        return "text/plain"
    field = f"parts.{index}.content_type"
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise ValidationError(f"part {index}: Content-Type is not a media type", field=field)
    _parse_params(value, match.end(), f"part {index}: Content-Type", field)
    return f"{match[1]}/{match[2]}".lower()
