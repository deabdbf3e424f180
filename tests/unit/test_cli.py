from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cli import main


def test_devstack_refuses_a_bad_port_naming_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devstack", "--gateway-port", "70000"]) == 2
    assert "--gateway-port 70000 is not a port" in capsys.readouterr().err


def test_devstack_reports_a_bad_setting_by_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HULEEDU_GATEWAY_ACCESS_TTL_S", "86400")
    code = main(["devstack", "--state-dir", str(tmp_path), "--gateway-port", "0", "--ws-port", "0"])
    assert code == 2
    assert "HULEEDU_GATEWAY_ACCESS_TTL_S" in capsys.readouterr().err
    assert not (tmp_path / "devstack.json").exists()


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
