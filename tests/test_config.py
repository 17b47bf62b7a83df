"""Configuration: defaults, environment overrides and the YAML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from doppel.config import load_settings
from doppel.errors import DoppelError


def test_defaults_do_not_pick_up_unrelated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOPPEL_HOME")
    monkeypatch.setenv("HOME", "/somewhere/else")  # $HOME must not become DOPPEL_HOME
    settings = load_settings()
    assert settings.home == Path(".doppel")
    assert settings.db_url == f"sqlite:///{Path('.doppel').resolve() / 'doppel.db'}"


def test_environment_overrides_yaml_and_nested_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "doppel.yaml"
    config.write_text("dataset:\n  min_chars: 40\n  gap_minutes: 10\n")
    monkeypatch.setenv("DOPPEL_CONFIG", str(config))
    monkeypatch.setenv("DOPPEL_DATASET__GAP_MINUTES", "5")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@h/db")
    settings = load_settings()
    assert (settings.dataset.min_chars, settings.dataset.gap_minutes) == (40, 5.0)
    assert settings.db_url == "postgresql+psycopg://u@h/db"


def test_bad_values_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPPEL_DATASET__MIN_CHARS", "-3")
    with pytest.raises(DoppelError, match=r"dataset\.min_chars"):
        load_settings()
