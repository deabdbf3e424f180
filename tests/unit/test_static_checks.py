"""S9: static checks bandit does not make (verification turned off, unpinned JWT algorithms,
secrets compared with ``==``), plus bandit itself at medium severity and above."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["common", "gateway", "wsmanager", "aggregator", "deploy"]


def _product_sources() -> list[Path]:
    files: list[Path] = []
    for pkg in PRODUCT:
        files += [
            p
            for p in (ROOT / pkg).rglob("*.py")
            if "contracts" not in p.parts and ".cache" not in p.parts
        ]
    return sorted(files)


FORBIDDEN = {
    "verification switched off": re.compile(r"verify_signature[\"' ]*:\s*False"),
    "CERT_NONE": re.compile(r"\bCERT_NONE\b"),
    "hostname check off": re.compile(r"check_hostname\s*=\s*False"),
    "alg none allowed": re.compile(r"algorithms\s*=\s*\[\s*[\"']none", re.IGNORECASE),
    "secret compared with ==": re.compile(
        r"(get_secret_value\(\)\s*[!=]=|[!=]=\s*\S*get_secret_value\(\)|"
        r"\b\w*(secret|password|token_hash|digest|refresh_token|access_token|ticket)\w*"
        r"\s*[!=]=\s*\w)",
        re.IGNORECASE,
    ),
}


def test_s9_no_forbidden_security_patterns_in_product_code() -> None:
    hits = []
    for path in _product_sources():
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, pattern in FORBIDDEN.items():
                if pattern.search(code):
                    hits.append(f"{path.relative_to(ROOT)}:{no}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_s9_every_jwt_decode_pins_algorithms() -> None:
    hits = []
    for path in _product_sources():
        text = path.read_text()
        for match in re.finditer(r"jwt\.decode(_complete)?\(", text):
            call = text[match.end() : match.end() + 400]
            if "algorithms=" not in call.split(")\n", 1)[0]:
                no = text[: match.start()].count("\n") + 1
                hits.append(f"{path.relative_to(ROOT)}:{no}")
    assert not hits, f"jwt.decode without algorithms=: {hits}"


def test_s9_patterns_catch_what_they_claim() -> None:
    # Guard against a pattern that silently matches nothing.
    samples = {
        "verification switched off": 'options={"verify_signature": False}',
        "CERT_NONE": "ctx.verify_mode = ssl.CERT_NONE",
        "hostname check off": "ctx.check_hostname = False",
        "alg none allowed": 'jwt.decode(t, algorithms=["none"])',
        "secret compared with ==": "if token_hash == stored:",
        "refresh token compared with ==": "if refresh_token != presented:",
    }
    for what, sample in samples.items():
        pattern = FORBIDDEN.get(what) or FORBIDDEN["secret compared with =="]
        assert pattern.search(sample), what


@pytest.mark.slow
def test_s9_bandit_reports_no_medium_or_high_findings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bandit", "-q", "-ll", "-c", "pyproject.toml", "-r", *PRODUCT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
