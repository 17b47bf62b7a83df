"""The synthetic workspace generator: reproducible, a valid export, noisy, and learnable."""

from __future__ import annotations

import json
import time
import zipfile
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path
from statistics import mean

import pytest

from devtools.synth import SyntheticWorkspace, generate_workspace, iter_messages, write_export
from doppel.errors import DoppelError

GAP_SECONDS = 30 * 60  # the dataset builder's default conversation gap


@pytest.fixture(scope="module")
def workspace() -> SyntheticWorkspace:
    return generate_workspace(users=8, days=30, seed=0)


@pytest.fixture(scope="module")
def export(workspace: SyntheticWorkspace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(workspace, tmp_path_factory.mktemp("export") / "synthco.zip")


def _read_zip(path: Path) -> dict[str, object]:
    with zipfile.ZipFile(path) as archive:
        return {name: json.loads(archive.read(name)) for name in archive.namelist()}


def _all_messages(workspace: SyntheticWorkspace) -> list[dict]:
    return [message for messages in workspace.messages.values() for message in messages]


def _plain(workspace: SyntheticWorkspace, user_id: str) -> list[str]:
    """Texts of a user's ordinary messages (no subtype), the ones a model learns from."""
    return [
        message["text"]
        for message in _all_messages(workspace)
        if message.get("user") == user_id and "subtype" not in message
    ]


def _long_replies(workspace: SyntheticWorkspace, min_chars: int = 100) -> Counter[str]:
    """Per user: plain messages of >= min_chars that answer someone else.

    In a thread that is the message before it in the thread; in the channel, the
    previous top-level message when it came less than GAP_SECONDS earlier.
    """
    counts: Counter[str] = Counter()
    for messages in workspace.messages.values():
        threads: dict[str, list[dict]] = defaultdict(list)
        top_level: list[dict] = []
        for message in messages:
            if message.get("thread_ts", message["ts"]) != message["ts"]:
                threads[message["thread_ts"]].append(message)
            else:
                top_level.append(message)
        by_ts = {message["ts"]: message for message in messages}
        pairs = []
        for thread_ts, replies in threads.items():
            pairs += zip([by_ts[thread_ts], *replies], replies, strict=False)
        pairs += [
            (before, after)
            for before, after in pairwise(top_level)
            if float(after["ts"]) - float(before["ts"]) < GAP_SECONDS
        ]
        for before, after in pairs:
            if (
                "subtype" not in after
                and after.get("user") != before.get("user")
                and len(after["text"]) >= min_chars
            ):
                counts[after["user"]] += 1
    return counts


def test_same_seed_same_bytes_other_seed_differs(export: Path, tmp_path: Path) -> None:
    again = write_export(generate_workspace(users=8, days=30, seed=0), tmp_path / "again.zip")
    other = write_export(generate_workspace(users=8, days=30, seed=1), tmp_path / "other.zip")
    assert again.read_bytes() == export.read_bytes()
    assert other.read_bytes() != export.read_bytes()


def test_generation_is_fast() -> None:
    started = time.perf_counter()
    generate_workspace(users=8, days=30, seed=3)
    assert time.perf_counter() - started < 1.0


def test_zip_has_the_slack_export_layout(workspace: SyntheticWorkspace, export: Path) -> None:
    files = _read_zip(export)
    channels, users = files.pop("channels.json"), files.pop("users.json")
    assert channels == workspace.channels and users == workspace.users
    names = {channel["name"] for channel in channels}
    seen = 0
    for path, messages in files.items():
        folder, day_file = path.split("/")
        assert folder in names and day_file.endswith(".json")
        stamps = [message["ts"] for message in messages]
        assert stamps == sorted(stamps)
        for ts in stamps:
            seconds, micros = ts.split(".")
            assert len(micros) == 6
            assert time.strftime("%Y-%m-%d", time.gmtime(int(seconds))) + ".json" == day_file
        seen += len(messages)
    assert seen == len(_all_messages(workspace))


def test_timestamps_are_unique_per_channel(workspace: SyntheticWorkspace) -> None:
    for messages in workspace.messages.values():
        stamps = [message["ts"] for message in messages]
        assert len(stamps) == len(set(stamps))


def test_some_thread_reply_is_in_a_later_day_file(export: Path) -> None:
    day_file_of: dict[tuple[str, str], str] = {}
    replies = []
    for path, messages in _read_zip(export).items():
        if "/" not in path:
            continue
        folder, day_file = path.split("/")
        for message in messages:
            day_file_of[folder, message["ts"]] = day_file
            if message.get("thread_ts", message["ts"]) != message["ts"]:
                replies.append((folder, message, day_file))
    later = [r for r in replies if r[2] > day_file_of[r[0], r[1]["thread_ts"]]]
    assert later, "no thread reply lands on a later day than its parent"


def test_thread_parents_describe_their_replies(workspace: SyntheticWorkspace) -> None:
    for messages in workspace.messages.values():
        replies = defaultdict(list)
        for message in messages:
            if message.get("thread_ts", message["ts"]) != message["ts"]:
                replies[message["thread_ts"]].append(message)
        parents = {m["ts"]: m for m in messages if m.get("thread_ts") == m["ts"]}
        assert set(parents) == set(replies)
        for ts, parent in parents.items():
            found = replies[ts]
            assert parent["reply_count"] == len(found)
            assert parent["latest_reply"] == max(reply["ts"] for reply in found)
            assert set(parent["reply_users"]) == {reply["user"] for reply in found}
            assert parent["reply_users_count"] == len(parent["reply_users"])
            assert all(reply["parent_user_id"] == parent["user"] for reply in found)


def test_users_and_channels(workspace: SyntheticWorkspace) -> None:
    users = {user["id"]: user for user in workspace.users}
    assert all(user["team_id"] == workspace.workspace_id for user in users.values())
    assert users["U0BOT0001"]["is_bot"] and "USLACKBOT" in users
    humans = [user for user in users.values() if user["id"] in workspace.styles]
    assert len(humans) == 9 and sum(user["deleted"] for user in humans) == 1
    assert any(user["profile"]["display_name"] == "" for user in humans)
    channels = workspace.channels
    assert 4 <= len(channels) <= 6
    assert sum(channel["is_archived"] for channel in channels) == 1
    assert sum(channel["is_general"] for channel in channels) == 1
    assert all(set(channel["members"]) <= set(users) for channel in channels)


def test_real_export_noise_is_present(workspace: SyntheticWorkspace) -> None:
    messages = _all_messages(workspace)
    subtypes = Counter(message.get("subtype") for message in messages)
    for subtype in (
        "channel_join",
        "channel_purpose",
        "channel_topic",
        "bot_message",
        "file_share",
        "pinned_item",
    ):
        assert subtypes[subtype] >= 1, subtype
    assert all("user" not in m for m in messages if m.get("subtype") == "bot_message")
    assert any(m.get("user") == "U0BOT0001" and m.get("bot_id") for m in messages)
    assert any("edited" in message for message in messages)
    texts = "\n".join(message["text"] for message in messages)
    for markup in ("<@U", "<#C", "<http", "<!here>", "&amp;", "&lt;", "&gt;", ":tada:"):
        assert markup in texts, markup
    human = [m for m in messages if "user_profile" in m]
    assert all(m["team"] == m["user_team"] == workspace.workspace_id for m in human)


def test_personas_have_distinct_signatures(workspace: SyntheticWorkspace) -> None:
    active = list(workspace.styles.values())[:8]
    assert len({style.archetype for style in active}) == 8
    for style in active:
        signature = style.signature_phrases[0]
        mine = _plain(workspace, style.user_id)
        others = [
            text
            for user_id in workspace.styles
            if user_id != style.user_id
            for text in _plain(workspace, user_id)
        ]
        assert sum(signature in text for text in mine) / len(mine) >= 0.8, signature
        assert sum(signature in text for text in others) / len(others) <= 0.02, signature


def test_message_lengths_differ_by_persona(workspace: SyntheticWorkspace) -> None:
    lengths = [
        mean(len(text) for text in _plain(workspace, user_id)) for user_id in workspace.styles
    ]
    assert max(lengths) >= 3 * min(lengths)


def test_top_persona_has_enough_long_replies(workspace: SyntheticWorkspace) -> None:
    assert max(_long_replies(workspace).values()) >= 150


def test_volume_is_realistic(workspace: SyntheticWorkspace) -> None:
    per_day = sum("user_profile" in m for m in _all_messages(workspace)) / 30
    assert 40 <= per_day <= 120


def test_iter_messages_streams_the_same_messages(tmp_path: Path) -> None:
    workspace = generate_workspace(users=4, days=5, seed=7)
    streamed = sorted(
        (channel_id, message["ts"], message.get("text"))
        for channel_id, message in iter_messages(4, 5, 7)
    )
    stored = sorted(
        (channel_id, message["ts"], message.get("text"))
        for channel_id, messages in workspace.messages.items()
        for message in messages
    )
    assert streamed == stored


def test_write_export_requires_zip_and_leaves_no_temp_file(tmp_path: Path) -> None:
    workspace = generate_workspace(users=3, days=2, seed=0)
    with pytest.raises(DoppelError):
        write_export(workspace, tmp_path / "export.json")
    written = write_export(workspace, tmp_path / "nested" / "export.zip")
    assert [path.name for path in written.parent.iterdir()] == ["export.zip"]
    assert zipfile.ZipFile(written).testzip() is None


def test_rejects_empty_workspaces() -> None:
    with pytest.raises(DoppelError):
        generate_workspace(users=0)
