"""Multipart parse speed: :class:`gateway.multipart.MultipartParser` over in-memory bodies.

Cases: one large file fed in 64 KiB and in 4 KiB chunks (random bytes; and data dense with
near-delimiters ``\\r\\n--<boundary minus one byte>``, the worst case for the delimiter
search and the hold-back), many small parts in 64 KiB chunks (header parsing dominates), and
a header block trickled one byte per call (the incremental end-of-headers search). Each is
the median of RUNS runs; MB/s is megabytes (10^6) of body per second of parse time, events
consumed but not copied.

    python -m perf.bench_multipart      # writes perf/results/multipart.*
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from gateway.multipart import MultipartParser, PartData
from perf._report import median, write_report

RUNS = 7
BOUNDARY = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"
FILE_BYTES = 64 << 20
SMALL_PARTS = 20_000
SMALL_LABEL = "20k parts of 100 B, 64 KiB chunks"


def _file_body(data: bytes) -> bytes:
    return (
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="essay.pdf"\r\n'
        b"Content-Type: application/pdf\r\n\r\n" + data + b"\r\n--" + BOUNDARY + b"--\r\n"
    )


def _small_parts_body() -> bytes:
    part = (
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="field"; filename="f.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\n" + b"x" * 100 + b"\r\n"
    )
    return part * SMALL_PARTS + b"--" + BOUNDARY + b"--\r\n"


def _chunks(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def _parse(chunks: list[bytes]) -> int:
    parser = MultipartParser(BOUNDARY)
    total = 0
    for chunk in chunks:
        for event in parser.feed(chunk):
            if isinstance(event, PartData):
                total += len(event.data)
    parser.end()
    return total


def _measure(chunks: list[bytes], expect: Callable[[int], bool]) -> dict[str, Any]:
    size = sum(len(c) for c in chunks)
    runs = []
    for _ in range(RUNS):
        start = time.perf_counter()
        got = _parse(chunks)
        runs.append(time.perf_counter() - start)
        assert expect(got), f"parsed {got} data bytes"
    best = median(runs)
    return {
        "body_bytes": size,
        "chunks": len(chunks),
        "median_s": best,
        "runs_s": runs,
        "mb_per_s": size / best / 1e6,
    }


def main() -> None:
    random_data = os.urandom(FILE_BYTES)
    near = b"\r\n--" + BOUNDARY[:-1] + b"."
    dense = (near * (FILE_BYTES // len(near) + 1))[:FILE_BYTES]
    small = _small_parts_body()
    header_trickle = _file_body(b"").replace(
        b"Content-Type", b"X-Pad: " + b"p" * 7000 + b"\r\nContent-Type"
    )
    cases = {
        "one file, random bytes, 64 KiB chunks": (_file_body(random_data), 64 << 10, FILE_BYTES),
        "one file, random bytes, 4 KiB chunks": (_file_body(random_data), 4 << 10, FILE_BYTES),
        "one file, near-delimiters, 64 KiB chunks": (_file_body(dense), 64 << 10, FILE_BYTES),
        SMALL_LABEL: (small, 64 << 10, 100 * SMALL_PARTS),
        "7 KiB header block, 1 byte per feed": (header_trickle, 1, 0),
    }
    results: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for label, (body, size, data_bytes) in cases.items():
        result = _measure(_chunks(body, size), lambda got, n=data_bytes: got == n)
        results[label] = result
        per_feed_us = result["median_s"] / result["chunks"] * 1e6
        rows.append(
            [
                label,
                f"{result['body_bytes'] / 1e6:.1f}",
                f"{result['mb_per_s']:.0f}",
                f"{per_feed_us:.2f}",
            ]
        )
    write_report(
        "multipart",
        title="Multipart parser throughput (gateway/multipart.py)",
        columns=["case", "body MB", "MB/s (median)", "µs per feed"],
        rows=rows,
        data={"runs": RUNS, "boundary_len": len(BOUNDARY), "cases": results},
        notes=[
            f"median of {RUNS} runs, one thread, body pre-split in memory; the parse only "
            "(events counted, not forwarded). MB = 10^6 bytes.",
            "near-delimiters: the data is nothing but CRLF--<boundary minus its last byte>, a "
            "near match every 41 bytes, and chunk edges that fall inside one hold bytes back.",
            f"20k parts: {results[SMALL_LABEL]['median_s'] / SMALL_PARTS * 1e6:.1f} µs per part "
            "(header block parse and validation dominate; an upload has at most a few hundred).",
            "the 1-byte trickle checks that the end-of-headers search resumes where it left "
            "off (linear, not quadratic, in the header block).",
        ],
    )
    print({k: round(v["mb_per_s"], 1) for k, v in results.items()})


if __name__ == "__main__":
    main()
