from pathlib import Path

import pytest

from ghostpen.server.settings import Settings


def test_defaults_need_nothing() -> None:
    settings = Settings.load(environ={})
    assert settings.limits.max_files == 12
    assert settings.engine.engine == "auto"
    assert settings.context.template == "generic-prefix"


def test_environment_then_overrides_win() -> None:
    environ = {"GHOSTPEN_MAX_FILES": "10", "GHOSTPEN_PORT": "7000", "GHOSTPEN_HOME": "/tmp/gp"}
    settings = Settings.load({"port": "7001", "enforce_eager": "false"}, environ=environ)
    assert settings.limits.max_files == 10
    assert settings.server.port == 7001
    assert settings.engine.enforce_eager is False
    assert settings.cache_dir == Path("/tmp/gp")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_filez": "3"}, "unknown setting"),
        ({"max_files": "many"}, "invalid literal"),
        ({"enforce_eager": "maybe"}, "not a boolean"),
    ],
)
def test_bad_settings_are_named(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load(values, environ={})


def test_queue_order_is_checked() -> None:
    assert Settings.load({"queue_order": "oldest"}, environ={}).engine.queue_order == "oldest"
    with pytest.raises(ValueError, match="queue_order must be one of newest, oldest: 'random'"):
        Settings.load({"queue_order": "random"}, environ={})


def test_lora_adapters_are_named_paths() -> None:
    settings = Settings.load({"lora_adapters": "team-a=~/a.gguf, team-b = /b.gguf"}, environ={})
    assert settings.engine.adapter_paths() == {
        "team-a": Path("~/a.gguf").expanduser(),
        "team-b": Path("/b.gguf"),
    }
    with pytest.raises(ValueError, match="lora_adapters wants name=path"):
        Settings.load({"lora_adapters": "just-a-path.gguf"}, environ={})
