"""A synthetic workspace as a standard Slack export ZIP, byte for byte reproducible.

Members are written in a fixed order with fixed headers and sorted JSON keys, so the
same workspace always gives the same bytes, wherever and whenever it is written.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import Any

from devtools.synth.generator import SyntheticWorkspace
from devtools.synth.roster import DAY
from doppel.errors import DoppelError
from doppel.types import SlackDict

ZIP_DATE = (2023, 11, 13, 0, 0, 0)  # fixed member timestamps keep the ZIP bytes reproducible


def write_export(workspace: SyntheticWorkspace, out: Path) -> Path:
    """Write the workspace as a Slack export ZIP, atomically; returns the path written."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise DoppelError(
            f"{out} is not a .zip path: a Slack export is written as a ZIP file",
            "name the output like synthco-export.zip",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w") as archive:
            for name, data in _export_files(workspace):
                archive.writestr(_zip_info(name), data)
        os.chmod(temp, 0o644)  # mkstemp makes it private; an export is an ordinary file
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return out


def _export_files(workspace: SyntheticWorkspace) -> Iterator[tuple[str, bytes]]:
    """channels.json, users.json, then <channel name>/<YYYY-MM-DD>.json per day with messages."""
    yield "channels.json", _json(workspace.channels)
    yield "users.json", _json(workspace.users)
    for channel in workspace.channels:
        messages = workspace.messages.get(channel["id"], [])
        for day, day_messages in groupby(messages, key=_day_of):
            yield f"{channel['name']}/{_date_name(day)}.json", _json(list(day_messages))


def _day_of(message: SlackDict) -> int:
    ts = message["ts"]
    return int(ts[: ts.index(".")]) // DAY


@lru_cache(maxsize=4096)
def _date_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY))


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _zip_info(name: str) -> zipfile.ZipInfo:
    """A member header with nothing that depends on when or where it was written."""
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info
