"""Failures of the tools' steps, and the short texts that say what went wrong.

:class:`StepError` names the step (``login failed: 401 ...``); :func:`describe_failure` gives
the root causes of a network failure (``connection refused``, an untrusted certificate, a name
that does not resolve) rather than the library's wrapper text; ``_problem_text`` turns the
gateway's problem document into one phrase.
"""

from __future__ import annotations

import os
import ssl

import httpx

__all__ = ["StepError", "describe_failure"]


class StepError(Exception):
    """One step of a client run failed; ``str()`` is ``"<step> failed: <message>"``."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step} failed: {message}")
        self.step = step
        self.message = message


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups among them."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return seen


def _explain(exc: BaseException) -> str | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); pass --ca FILE or --stack FILE"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        text = os.strerror(exc.errno) if exc.errno >= 0 else exc.strerror or str(exc)
        return text.lower()
    return None


def describe_failure(exc: BaseException) -> str:
    """A short reason for a network failure: ``connection refused``, an untrusted certificate,
    a name that does not resolve... (the root causes, not the library's wrapper text)."""
    reasons: list[str] = []
    for cause in _causes(exc):
        reason = _explain(cause)
        if reason and reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or str(exc) or type(exc).__name__


def _problem_text(reply: httpx.Response) -> str:
    """``"<status> <detail>"`` from a problem document (or the reason phrase), with the
    field at fault, when to retry, and for server errors the id to quote."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"{reply.status_code} {reply.reason_phrase}".rstrip()
    extras = []
    if body.get("field"):
        extras.append(f"field {body['field']}")
    if body.get("retry_after") is not None:
        extras.append(f"retry after {body['retry_after']} s")
    if reply.status_code >= 500 and body.get("correlation_id"):
        extras.append(f"correlation id {body['correlation_id']}")
    detail = body.get("detail") or body.get("title") or reply.reason_phrase
    return f"{reply.status_code} {detail}" + (f" ({'; '.join(extras)})" if extras else "")
