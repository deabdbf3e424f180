"""Sample data shipped with the package: short student essays for ``huleedu demo``.

The essays (``essays/*.txt``, UTF-8 plain text) answer one prompt, :data:`ESSAY_PROMPT`; they
are original texts written for this project and carry no personal data.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ESSAYS_DIR", "ESSAY_PROMPT"]

#: The folder holding the bundled sample essays (installed as package data).
ESSAYS_DIR = Path(__file__).resolve().parent / "essays"
#: The instructions the sample essays were written to.
ESSAY_PROMPT = (
    "Write 250-450 words about a journey that changed you. Describe the journey itself, "
    "and explain how and why you were different afterwards."
)
