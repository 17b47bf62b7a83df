"""Deterministic synthetic Slack workspaces, in the standard Slack export format.

The demo, the tests and the benchmarks need Slack data that nobody has to hand over:
a workspace where every person writes in a distinct, learnable style, carrying the
noise real exports carry (joins, bots, files, edits, markup, HTML entities, threads
whose replies land in later day files). The same (users, days, seed) always gives
byte-identical output, and generation is linear in the number of messages.

`templates.yaml` holds the words; `styles` the writers, `roster` the people and
channels, `generator` the messages and `export` the ZIP.
"""

from __future__ import annotations

from devtools.synth.export import write_export
from devtools.synth.generator import SyntheticWorkspace, generate_workspace, iter_messages
from devtools.synth.styles import WriterStyle

__all__ = [
    "SyntheticWorkspace",
    "WriterStyle",
    "generate_workspace",
    "iter_messages",
    "write_export",
]
