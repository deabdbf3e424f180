from __future__ import annotations

import pytest

from common import errors
from common.errors import (
    AuthenticationError,
    CircuitOpenError,
    DeadlineExceededError,
    DependencyError,
    GrpcStatus,
    HuleEduError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
    ValidationError,
    WsCloseCode,
    from_grpc_status,
    to_problem,
)


def _all_error_classes() -> list[type[HuleEduError]]:
    found: list[type[HuleEduError]] = []
    todo: list[type[HuleEduError]] = [HuleEduError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == "common.errors"]


def test_docstring_tree_lists_every_error_with_its_mappings() -> None:
    doc = errors.__doc__ or ""
    for cls in _all_error_classes():
        line = next((ln for ln in doc.splitlines() if f" {cls.__name__} " in ln), None)
        assert line is not None, f"{cls.__name__} missing from the error tree docstring"
        assert cls.code in line, f"{cls.__name__}: code {cls.code} not in {line!r}"
        assert str(cls.http_status) in line, f"{cls.__name__}: HTTP {cls.http_status} not drawn"
        assert cls.grpc_status.name in line, f"{cls.__name__}: {cls.grpc_status.name} not drawn"
        assert str(int(cls.ws_close_code)) in line, f"{cls.__name__}: WS code not drawn"


def test_codes_are_unique() -> None:
    codes = [c.code for c in _all_error_classes()]
    assert len(codes) == len(set(codes)), codes


def test_problem_json_for_validation_error_names_the_field() -> None:
    err = ValidationError("page_size must be at most 100", field="page_size")
    body = to_problem(err, correlation_id="abc", instance="/v1/batches")
    assert body == {
        "type": "https://errors.huleedu.dev/validation_failed",
        "title": "Validation failed",
        "status": 422,
        "detail": "page_size must be at most 100",
        "code": "validation_failed",
        "instance": "/v1/batches",
        "correlation_id": "abc",
        "field": "page_size",
        "errors": [{"field": "page_size", "message": "page_size must be at most 100"}],
    }


def test_authentication_errors_share_one_public_text_whatever_the_reason() -> None:
    a = to_problem(AuthenticationError("signature mismatch for kid k1"))
    b = to_problem(errors.TokenExpiredError("expired 3 s ago"))
    c = to_problem(errors.SessionRevokedError("sid s1 revoked"))
    assert a == b == c, "every authentication failure must give one identical body"
    assert a["detail"] == "Missing or invalid credentials."
    assert "kid" not in str(a) and "expired" not in str(b)


def test_dependency_errors_never_leak_backend_messages() -> None:
    err = DependencyError("results: INTERNAL: row for user u2 is corrupt", service="results")
    body = to_problem(err)
    assert body["status"] == 502
    assert "u2" not in body["detail"] and "corrupt" not in body["detail"]
    assert "u2" in err.message  # still there for logs


def test_rate_limited_problem_rounds_retry_after() -> None:
    body = to_problem(RateLimitedError("login limit", retry_after=2.4))
    assert (body["status"], body["retry_after"]) == (429, 2)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (GrpcStatus.NOT_FOUND, NotFoundError),
        (GrpcStatus.INVALID_ARGUMENT, ValidationError),
        (GrpcStatus.UNAUTHENTICATED, AuthenticationError),
        (GrpcStatus.UNAVAILABLE, UnavailableError),
        (GrpcStatus.DEADLINE_EXCEEDED, DeadlineExceededError),
        (GrpcStatus.INTERNAL, DependencyError),
        (GrpcStatus.UNKNOWN, DependencyError),
    ],
)
def test_from_grpc_status_maps_onto_the_tree(status: GrpcStatus, cls: type) -> None:
    err = from_grpc_status(status, "backend text", service="results", field="batch_id")
    assert type(err) is cls
    assert err.service == "results"


def test_from_grpc_keeps_client_messages_and_hides_dependency_ones() -> None:
    client = from_grpc_status(
        GrpcStatus.INVALID_ARGUMENT, "page_size too big", service="r", field="page_size"
    )
    assert client.detail == "page_size too big" and client.field == "page_size"
    dep = from_grpc_status(GrpcStatus.INTERNAL, "secret stack trace", service="r")
    assert "secret" not in dep.detail and "secret" in dep.message


def test_every_client_error_round_trips_through_grpc_status() -> None:
    for cls in _all_error_classes():
        if not issubclass(cls, errors.ClientError) or cls is errors.ClientError:
            continue
        back = from_grpc_status(cls.grpc_status, "x", service="s")
        assert isinstance(back, errors.ClientError), f"{cls.__name__} came back as {back!r}"


def test_resource_exhausted_naming_a_limit_is_payload_too_large() -> None:
    named = from_grpc_status(
        GrpcStatus.RESOURCE_EXHAUSTED, "file too big", service="files", field="max_file_bytes"
    )
    assert isinstance(named, errors.PayloadTooLargeError)
    assert named.http_status == 413
    unnamed = from_grpc_status(GrpcStatus.RESOURCE_EXHAUSTED, "slow down", service="files")
    assert isinstance(unnamed, RateLimitedError)


def test_circuit_open_is_unavailable_with_retry_after() -> None:
    err = CircuitOpenError("results breaker open", service="results", retry_after=5)
    assert isinstance(err, UnavailableError)
    assert err.ws_close_code == WsCloseCode.TRY_AGAIN_LATER
    assert to_problem(err)["retry_after"] == 5
    assert "retry_after=5" in repr(err)
