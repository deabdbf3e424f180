"""The committed contract code is what proto/ generates, and it imports and works."""

from __future__ import annotations

import filecmp
from pathlib import Path

from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.contracts.huleedu.identity import v1 as identity_v1
from common.contracts.huleedu.results import v1 as results_v1
from deploy.protogen import CONTRACTS_DIR, generate


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"only committed: {n}" for n in cmp.left_only]
    out += [f"only generated: {n}" for n in cmp.right_only]
    out += [f"differs: {n}" for n in cmp.diff_files]
    for name, sub in cmp.subdirs.items():
        out += [f"{name}/{line}" for line in _diff(Path(sub.left), Path(sub.right))]
    return out


def test_committed_contracts_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = tmp_path / "contracts"
    generate(fresh)
    differences = _diff(CONTRACTS_DIR, fresh)
    assert not differences, f"common/contracts is stale; run `make proto`: {differences}"


def test_services_have_async_clients_and_server_bases() -> None:
    for module, service in [
        (identity_v1, "IdentityService"),
        (batches_v1, "BatchService"),
        (files_v1, "FileService"),
        (results_v1, "ResultService"),
    ]:
        assert hasattr(module, f"{service}Stub"), service
        base = getattr(module, f"{service}Base")
        assert base.__mapping__, service


def test_upload_is_client_streaming() -> None:
    import grpclib.const

    mapping = files_v1.FileServiceBase().__mapping__()
    handler = mapping["/huleedu.files.v1.FileService/UploadFiles"]
    assert handler.cardinality is grpclib.const.Cardinality.STREAM_UNARY


def test_optional_fields_distinguish_unset_from_zero() -> None:
    essay = results_v1.EssayResult(essay_id="e1")
    back = results_v1.EssayResult.parse(bytes(essay))
    assert back.cj_rank is None and back.spellcheck_corrections is None
    zero = results_v1.EssayResult.parse(bytes(results_v1.EssayResult(essay_id="e", cj_rank=0)))
    assert zero.cj_rank == 0


def test_actor_travels_in_requests() -> None:
    req = results_v1.GetBatchRequest(
        actor=common_v1.Actor(user_id="u1", org_id="o1", roles=["teacher"]), batch_id="b1"
    )
    back = results_v1.GetBatchRequest.parse(bytes(req))
    assert back.actor is not None and back.actor.user_id == "u1"
