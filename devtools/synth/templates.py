"""The text of synthetic workspaces, read once from templates.yaml.

Wording is data, kept apart from the generator so it reads and edits as prose. Loading
applies Slack's escaping to sentences and vocabulary, so the generator pastes exactly
what Slack would store.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import yaml


@dataclass(frozen=True)
class Templates:
    """Everything templates.yaml holds; archetypes and rooms are typed where they are used."""

    sentences: dict[str, tuple[str, ...]]  # topic -> sentences with {slots}, escaped
    vocab: dict[str, tuple[str, ...]]  # slot -> words, escaped
    links: tuple[str, ...]  # already in Slack markup
    files: tuple[tuple[str, str], ...]  # (name pattern, mimetype) of shared files
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    archetypes: tuple[dict[str, Any], ...]  # fields of styles.Archetype
    rooms: tuple[dict[str, Any], ...]  # fields of roster.RoomSpec


def escape(text: str) -> str:
    """Slack escapes exactly these three characters in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@cache
def load_templates() -> Templates:
    """Parse templates.yaml on first use; every later call shares the same object."""
    text = files("devtools.synth").joinpath("templates.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return Templates(
        sentences={topic: _escaped(lines) for topic, lines in data["sentences"].items()},
        vocab={slot: _escaped(words) for slot, words in data["vocab"].items()},
        links=tuple(data["links"]),
        files=tuple((entry["name"], entry["mimetype"]) for entry in data["files"]),
        first_names=tuple(data["first_names"]),
        last_names=tuple(data["last_names"]),
        archetypes=tuple(_tupled(entry) for entry in data["archetypes"]),
        rooms=tuple(_tupled(entry) for entry in data["rooms"]),
    )


def _escaped(lines: list[str]) -> tuple[str, ...]:
    return tuple(map(escape, lines))


def _tupled(entry: dict[str, Any]) -> dict[str, Any]:
    """YAML lists become tuples, so the dataclasses built from them stay hashable."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in entry.items()}
