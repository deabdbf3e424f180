from __future__ import annotations

import pytest

from deploy.cli import main


def test_devstack_says_it_is_not_built_yet_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devstack"]) == 2
    err = capsys.readouterr().err
    assert "not built yet" in err and "make test" in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["nonsense"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_gateway_reports_a_bad_setting_by_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HULEEDU_GATEWAY_ACCESS_TTL_S", "86400")
    assert main(["gateway"]) == 2
    err = capsys.readouterr().err
    assert "HULEEDU_GATEWAY_ACCESS_TTL_S" in err


def test_wsmanager_reports_a_bad_setting_by_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HULEEDU_WSMANAGER_ALLOWED_ORIGINS", '["ftp://evil"]')
    assert main(["wsmanager"]) == 2
    err = capsys.readouterr().err
    assert "HULEEDU_WSMANAGER_ALLOWED_ORIGINS" in err
