"""The configuration file: validated once at start, every problem a one-line error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_shipped_gateway_toml_is_valid() -> None:
    config = load_config(REPO / "gateway.toml")
    assert {tool.name for tool in config.tools} >= {"docs.search", "email.send", "payments.transfer"}
    assert config.policy.engine == "embedded"


def test_no_file_means_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config()
    assert config.database_url == f"sqlite+aiosqlite:///{tmp_path}/var/gateway.db"
    assert config.policy.engine == "embedded"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"gateway": {"audiense": "x"}}, "unknown key 'gateway.audiense'"),
        ({"surprise": 1}, "unknown key 'surprise'"),
        ({"policy": {"engine": "magic"}}, "policy.engine"),
        ({"gateway": {"max_body_bytes": -1}}, "gateway.max_body_bytes"),
        ({"tools": [{"name": "a", "upstream": "ftp://x"}]}, "tools.0.upstream"),
        ({"tools": [{"name": "a", "upstream": "http://x", "effect": "maybe"}]}, "tools.0.effect"),
        (
            {"tools": [{"name": "a", "upstream": "http://x"}, {"name": "a", "upstream": "http://y"}]},
            "duplicate",
        ),
        ({"tools": [{"name": "a", "upstream": "http://x", "compensation": "b"}]}, "no tool named 'b'"),
        ({"gateway": {"idempotency_ttl_seconds": 60}}, "gateway.idempotency_ttl_seconds"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="gateway.toml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.toml")


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "gateway.toml"
    file.write_text('[gateway]\ndatabase = "sqlite+aiosqlite:///state/g.db"\nkeys_dir = "k"\n')
    config = load_config(file)
    assert config.database_url == f"sqlite+aiosqlite:///{tmp_path}/conf/state/g.db"
    assert config.path(config.gateway.keys_dir) == tmp_path / "conf" / "k"
