from __future__ import annotations

import json

import pytest
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from common.errors import ConfigurationError
from common.settings import KafkaSettings, ServiceSettings, load_settings, redacted


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HULEEDU_DEMO_", extra="forbid", frozen=True, env_nested_delimiter="__"
    )
    signing_secret: SecretStr = SecretStr("")
    kafka: KafkaSettings = KafkaSettings()
    port: int = 8443


def test_env_prefix_and_nested_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HULEEDU_DEMO_PORT", "9443")
    monkeypatch.setenv("HULEEDU_DEMO_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    s = load_settings(DemoSettings)
    assert s.port == 9443
    assert s.kafka.bootstrap_servers == "127.0.0.1:19092"


def test_bad_value_names_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HULEEDU_DEMO_SHUTDOWN_GRACE_S", "-1")
    with pytest.raises(ConfigurationError) as info:
        load_settings(DemoSettings)
    assert info.value.field == "shutdown_grace_s"
    assert "HULEEDU_DEMO_SHUTDOWN_GRACE_S" in str(info.value)


def test_nested_bad_value_names_the_nested_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HULEEDU_DEMO_KAFKA__CONSUME_BATCH_MAX", "0")
    with pytest.raises(ConfigurationError) as info:
        load_settings(DemoSettings)
    assert "HULEEDU_DEMO_KAFKA__CONSUME_BATCH_MAX" in str(info.value)


def test_redacted_hides_secrets_but_keeps_shape() -> None:
    s = load_settings(
        DemoSettings,
        signing_secret=SecretStr("s3cr3t-value"),
        kafka=KafkaSettings(sasl_password=SecretStr("pw-value")),
    )
    dumped = json.dumps(redacted(s))
    assert "s3cr3t-value" not in dumped and "pw-value" not in dumped
    assert redacted(s)["signing_secret"] == "**********"
    assert redacted(s)["kafka"]["sasl_password"] == "**********"
    assert redacted(s)["port"] == 8443


def test_secrets_are_not_in_repr() -> None:
    s = load_settings(DemoSettings, signing_secret=SecretStr("s3cr3t-value"))
    assert "s3cr3t-value" not in repr(s) and "s3cr3t-value" not in str(s)
