"""Signing keys on disk: generated when missing (0600), rotation by adding a key."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest

from common.errors import ConfigurationError
from common.tokens import TokenSigner, TokenVerifier, VerifierPolicy
from gateway.keys import generate_key, load_signing_keys

POLICY = VerifierPolicy(issuer="iss", audience="aud")
NOW = 1_800_000_000.0


def test_an_empty_folder_gets_one_private_key(tmp_path: Path) -> None:
    keys = load_signing_keys(tmp_path / "keys")
    files = list((tmp_path / "keys").iterdir())
    assert [f.stem for f in files] == [keys.kid] and keys.public.kids() == [keys.kid]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert load_signing_keys(tmp_path / "keys").kid == keys.kid  # reused, not replaced
    with pytest.raises(ConfigurationError):
        load_signing_keys(tmp_path / "none", create=False)


def test_rotation_new_key_signs_and_old_tokens_still_verify(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    generate_key(folder, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    old = load_signing_keys(folder)
    old_token = TokenSigner(old.private, old.kid, issuer="iss", audience="aud").issue(
        sub="u", org="o", roles=[], sid="s", now=NOW
    )
    generate_key(folder, now=dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    new = load_signing_keys(folder)
    assert new.kid != old.kid and sorted(new.public.kids()) == sorted([old.kid, new.kid])
    new_token = TokenSigner(new.private, new.kid, issuer="iss", audience="aud").issue(
        sub="u", org="o", roles=[], sid="s", now=NOW
    )
    verifier = TokenVerifier(POLICY, new.public)
    assert verifier.verify(old_token, NOW).sub == "u"
    assert verifier.verify(new_token, NOW).sub == "u"
    jwks = new.public.to_jwks()
    assert {k["kid"] for k in jwks["keys"]} == {old.kid, new.kid}
    assert all("d" not in k for k in jwks["keys"])  # public halves only


def test_unusable_key_files_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "k1.pem").write_text("not a key")
    with pytest.raises(ConfigurationError, match=r"k1\.pem") as info:
        load_signing_keys(folder)
    assert info.value.field == "keys_dir"
    (folder / "k1.pem").unlink()
    (folder / "bad kid!.pem").write_text("x")
    with pytest.raises(ConfigurationError, match="not a valid kid"):
        load_signing_keys(folder)
