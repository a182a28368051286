import pytest

from ghostpen.editor_client.settings import ClientSettings


def test_editor_options_are_checked_by_name_and_type() -> None:
    settings = ClientSettings.from_options({"server": "box:1", "debounce_max_ms": 100})
    assert settings.server == "box:1" and settings.debounce_max_ms == 100
    assert ClientSettings.from_options({"reconnect_max_s": 3}).reconnect_max_s == 3.0
    with pytest.raises(ValueError, match="unknown ghostpen setting 'sever'"):
        ClientSettings.from_options({"sever": "box:1"})
    with pytest.raises(ValueError, match="'max_files' must be a int"):
        ClientSettings.from_options({"max_files": "12"})
    with pytest.raises(ValueError, match="must not be negative"):
        ClientSettings.from_options({"cache_entries": -1})
