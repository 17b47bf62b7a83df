"""From the message store to a saved Hugging Face `DatasetDict` for one user."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import datasets
from datasets import Dataset, DatasetDict, Features, Value
from sqlalchemy import select
from sqlalchemy.orm import Session

from doppel.config import DatasetSettings, Settings
from doppel.consent import opted_out_users
from doppel.dataset.clean import TextCleaner
from doppel.dataset.conversations import (
    Conversation,
    Segmentation,
    StoredMessage,
    Turn,
    gc_paused,
    segment,
)
from doppel.dataset.samples import Sample, SampleRules, split_samples, trim_context, user_samples
from doppel.dataset.scrub import Scrubber
from doppel.errors import DoppelError
from doppel.store.database import database
from doppel.store.lookup import Person, channel_names, people, resolve_user, resolve_workspace
from doppel.store.models import Message, Workspace

# Explicit types, so that an empty split still has a schema.
FEATURES = Features(
    {
        "messages": [{"role": Value("string"), "content": Value("string")}],
        "workspace_id": Value("string"),
        "user_id": Value("string"),
        "conversation_id": Value("string"),
        "channel": Value("string"),
        "reply_ts": Value("string"),
        "context_turns": Value("int32"),
    }
)


@dataclass
class WorkspaceConversations:
    """A workspace's conversations plus what is needed to render them."""

    workspace: Workspace
    people: dict[str, Person]
    channels: dict[str, str]
    segmentation: Segmentation

    @property
    def names(self) -> dict[str, str]:
        return {uid: person.label for uid, person in self.people.items()}

    def by_author(self) -> dict[str, list[Conversation]]:
        index: dict[str, list[Conversation]] = defaultdict(list)
        for conversation in self.segmentation.conversations:
            for author in {turn.author for turn in conversation.turns}:
                index[author].append(conversation)
        return index

    def system_prompt(self, template: str, person: Person) -> str:
        return template.format(
            name=person.label, workspace=self.workspace.name or self.workspace.id
        )


def load_conversations(
    session: Session, workspace: Workspace, gap_minutes: float
) -> WorkspaceConversations:
    """Read every message of the workspace once, in (channel, ts) order, and segment it."""
    known = people(session, workspace.id)
    channels = channel_names(session, workspace.id)
    cleaner = TextCleaner({uid: p.label for uid, p in known.items()}, channels)
    result = session.execute(
        select(
            Message.channel_id,
            Message.ts,
            Message.thread_ts,
            Message.user_id,
            Message.subtype,
            Message.bot_id,
            Message.text,
        )
        .where(Message.workspace_id == workspace.id)
        .order_by(Message.channel_id, Message.ts)
        .execution_options(yield_per=10_000)
    )
    # Each Row has StoredMessage's fields by name; using the rows as they come skips building
    # a million tuples again.
    rows = cast("Iterable[StoredMessage]", result)
    bots = {uid for uid, person in known.items() if person.is_bot}
    opted_out = opted_out_users(session, workspace.id)
    left_out: Counter[str] = Counter()
    if opted_out:
        rows = _without(rows, opted_out, left_out)
    segmentation = segment(rows, bots=bots, clean=cleaner, gap_minutes=gap_minutes)
    segmentation.dropped.update(left_out)
    return WorkspaceConversations(workspace, known, channels, segmentation)


def _without(
    rows: Iterable[StoredMessage], opted_out: set[str], left_out: Counter[str]
) -> Iterator[StoredMessage]:
    """Messages of people who opted out never reach a dataset, not even as context."""
    for row in rows:
        if row.user_id in opted_out:
            left_out["opted_out"] += 1
        else:
            yield row


@dataclass
class BuiltDataset:
    path: Path
    user_id: str
    user_name: str
    train: int
    validation: int
    stats: dict[str, Any]


def build_user_dataset(
    loaded: WorkspaceConversations, person: Person, settings: DatasetSettings, out: Path
) -> BuiltDataset:
    """Build, split and save one user's samples; refuse with counts when there are none."""
    rules = SampleRules.from_settings(settings)
    conversations = loaded.by_author().get(person.id, [])
    built = user_samples(conversations, person.id, rules)
    counts = built.counts
    if not built.samples:
        raise DoppelError(
            f"user {person.id} ({person.label}) has no eligible samples: "
            f"{counts['turns']} turns, {counts['too_short']} shorter than {rules.min_chars} "
            f"chars, {counts['no_earlier_turn_by_others']} with no earlier turn by someone "
            f"else, {counts['duplicate']} duplicates",
            "lower --min-chars, or pick a more active user ('doppel users' shows who has samples)",
        )
    scrubber = Scrubber.for_rules(rules)
    samples = _scrubbed(built.samples, conversations, rules, scrubber)
    train, validation = split_samples(
        samples, settings.validation_fraction, salt=loaded.workspace.id
    )
    stats = {
        "workspace_id": loaded.workspace.id,
        "user_id": person.id,
        "user_name": person.label,
        "train": len(train),
        "validation": len(validation),
        "conversations": len({s.conversation_id for s in built.samples}),
        "turns": counts["turns"],
        "dropped_turns": {k: v for k, v in counts.items() if k not in {"turns", "samples"}},
        "dropped_workspace_messages": dict(sorted(loaded.segmentation.dropped.items())),
        "scrubbed": dict(sorted(scrubber.replaced.items())),  # placeholders written, by kind
        "settings": {**asdict(rules), "gap_minutes": settings.gap_minutes},
        "system_prompt": settings.system_prompt,
    }
    prompt = loaded.system_prompt(settings.system_prompt, person)
    splits = {"train": train, "validation": validation}
    _save_atomically(
        DatasetDict(
            {name: _to_dataset(rows, loaded, person, prompt) for name, rows in splits.items()}
        ),
        stats,
        out,
    )
    return BuiltDataset(out, person.id, person.label, len(train), len(validation), stats)


def _scrubbed(
    samples: list[Sample], conversations: list[Conversation], rules: SampleRules, scrub: Scrubber
) -> list[Sample]:
    """The samples with secrets and personal data replaced in every text they hold.

    Only the turns samples use are scrubbed, each once however many samples share it. Each
    context is trimmed again from the scrubbed turns: a context's oldest turn may have
    been cut to fit, and a cut through a secret would leave its tail unrecognised. (The
    garbage collector is paused, as in `segment`: many small acyclic objects.)
    """
    clean: dict[int, Turn] = {}

    def scrubbed(turn: Turn) -> Turn:
        if id(turn) not in clean:
            text = scrub(turn.text)
            clean[id(turn)] = turn if text is turn.text else Turn(turn.author, text, turn.ts)
        return clean[id(turn)]

    result = []
    with gc_paused():
        turns_of = {c.id: c.turns for c in conversations}
        position = {
            id(turn): i
            for conversation_id in {sample.conversation_id for sample in samples}
            for i, turn in enumerate(turns_of[conversation_id])
        }
        for sample in samples:
            turns, index = turns_of[sample.conversation_id], position[id(sample.reply)]
            window = turns[max(0, index - rules.max_context_turns) : index]
            context = trim_context([scrubbed(turn) for turn in window], rules)
            reply = scrubbed(sample.reply)
            result.append(Sample(context, reply, sample.conversation_id, sample.channel_id))
    return result


def _to_dataset(
    samples: list[Sample], loaded: WorkspaceConversations, person: Person, prompt: str
) -> Dataset:
    names = loaded.names
    return Dataset.from_dict(
        {
            "messages": [s.messages(prompt, names) for s in samples],
            "workspace_id": [loaded.workspace.id] * len(samples),
            "user_id": [person.id] * len(samples),
            "conversation_id": [s.conversation_id for s in samples],
            "channel": [loaded.channels.get(s.channel_id, s.channel_id) for s in samples],
            "reply_ts": [s.reply.ts for s in samples],
            "context_turns": [len(s.context) for s in samples],
        },
        features=FEATURES,
    )


def _save_atomically(dataset: DatasetDict, stats: dict[str, Any], out: Path) -> None:
    """Write next to the destination, then swap: a crash never leaves half a dataset."""
    datasets.disable_progress_bars()  # a few shards; the CLI shows its own status
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # One shard per split: `load_from_disk` cannot read back a split saved as zero shards.
        dataset.save_to_disk(str(staging / "data"), num_shards=dict.fromkeys(dataset, 1))
        (staging / "data" / "stats.json").write_text(json.dumps(stats, indent=2))
        previous = out.with_name(f".{out.name}.previous")
        if out.exists():
            shutil.rmtree(previous, ignore_errors=True)
            out.rename(previous)
        (staging / "data").rename(out)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def user_summaries(
    loaded: WorkspaceConversations, message_counts: dict[str, int], settings: DatasetSettings
) -> list[dict[str, Any]]:
    """Each person's message count and how many samples a dataset build would yield."""
    rules = SampleRules.from_settings(settings)
    index = loaded.by_author()
    summaries = []
    for person in loaded.people.values():
        built = user_samples(index.get(person.id, []), person.id, rules)
        summaries.append(
            {
                "id": person.id,
                "name": person.name,
                "display_name": person.display_name,
                "real_name": person.real_name,
                "is_bot": person.is_bot,
                "deleted": person.deleted,
                "messages": message_counts.get(person.id, 0),
                "samples": len(built.samples),
            }
        )
    return sorted(summaries, key=lambda row: (-row["samples"], -row["messages"], row["id"]))


def build_dataset(
    settings: Settings,
    user: str,
    *,
    workspace: str | None = None,
    min_chars: int | None = None,
    gap_minutes: float | None = None,
    out: Path | None = None,
) -> BuiltDataset:
    """The whole step: resolve workspace and user, read the store, build and save."""
    overrides = {"min_chars": min_chars, "gap_minutes": gap_minutes}
    rules = settings.dataset.model_copy(
        update={key: value for key, value in overrides.items() if value is not None}
    )
    with database(settings.db_url).session() as session:
        ws = resolve_workspace(session, workspace)
        loaded = load_conversations(session, ws, rules.gap_minutes)
    person = resolve_user(loaded.people, user)
    return build_user_dataset(loaded, person, rules, out or settings.dataset_dir(ws.id, person.id))
