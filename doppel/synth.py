"""Deterministic synthetic Slack workspaces, in the standard Slack export format.

The demo, the tests and the benchmarks need Slack data that nobody has to hand over:
a workspace where every person writes in a distinct, learnable voice, carrying the
noise real exports carry (joins, bots, files, edits, markup, HTML entities, threads
whose replies land in later day files). The same (users, days, seed) always gives
byte-identical output, and generation is linear in the number of messages.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

from doppel.errors import DoppelError

SlackDict = dict[str, Any]

BASE_EPOCH = 1_699_833_600  # Monday 2023-11-13 00:00 UTC: day 0 of every synthetic workspace
DAY = 86_400
ZIP_DATE = (2023, 11, 13, 0, 0, 0)  # fixed member timestamps keep the ZIP bytes reproducible
BOT_USER_ID = "U0BOT0001"
BOT_ID = "B0000001"
SLACKBOT_ID = "USLACKBOT"
AVATARS = "https://avatars.synthco.example"

# Volume and rhythm. About 11 human messages per user on weekdays, 3 on weekends.
WEEKDAY_MESSAGES_PER_USER = 11.0
WEEKEND_MESSAGES_PER_USER = 3.0
MEAN_CONVERSATION = 5.0  # messages per thread or run, on average
WORK_START = 7 * 3600  # conversations start between 07:00 and 20:00 UTC
WORK_SPAN = 13 * 3600
THREAD_SHARE = 0.45  # conversations that are threads; the rest are runs in the channel
LATE_REPLY = 0.08  # thread replies that come 6-30 hours later, often on a later day
DOUBLE_POST = 0.08  # the same person posts again right away
MENTION_RATE = 0.12  # a reply names the person it answers
EDIT_RATE = 0.04
FILE_RATE = 0.015
DESIGN_FILE_RATE = 0.08
PIN_RATE = 0.03
OWN_TOPIC = 0.75  # the rest of the time people talk about the channel's subject


def _escape(text: str) -> str:
    """Slack escapes exactly these three characters in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# Sentence templates per topic: lowercase starts, no final punctuation (personas add theirs).
_RAW_TEMPLATES: dict[str, tuple[str, ...]] = {
    "infra": (
        "the {service} {k8s} keeps getting OOMKilled on {cluster}, so I bumped the memory "
        "limit to {n}Gi for now",
        "{metric} on {service} went from {n}ms to {m}ms after the {tool} upgrade & nobody "
        "noticed until the alert fired",
        "we should move {service} onto {cluster} once the {tool} module for it is reviewed "
        "and merged",
        "the readiness probe on the {service} {k8s} is way too aggressive, it flaps every "
        "time {metric} spikes",
        "rolling back {service} was painless because the {k8s} kept the previous replica set "
        "around",
        "anything with {metric} above {pct}% for more than {n} minutes should page whoever is on "
        "call",
        "I spent most of the afternoon chasing a DNS issue in {cluster} that turned out to be "
        "a stale {tool} config",
        "the {tool} plan for {cluster} wants to recreate the {k8s}, which would mean real "
        "downtime for {service}",
        "let's pin {tool} to the current version until the {k8s} changes have soaked on "
        "staging for a few days",
        "autoscaling for {service} finally behaves now that the {k8s} requests match the real "
        "{metric}",
        "CPU & memory requests for {service} were copied from a template years ago and nobody "
        "has revisited them since",
        "the SLO says p99 latency < {m}ms, but {service} has been over that for {n} days straight",
        "if the {k8s} for {service} can't drain within {n} seconds we should fix the shutdown "
        "hook instead of raising the timeout",
    ),
    "code": (
        "the flaky test in {service} is a race between the cache warmup and the first request",
        "I left a few comments on the PR, mostly naming nits & one real bug in the retry loop",
        "we could drop the custom JSON encoder in {service} now that we're on the new serializer",
        "the migration for the {table} table needs a backfill step before we can add the "
        "NOT NULL constraint",
        "type hints on the {service} client caught two bugs this week, which more than paid "
        "for the effort",
        "let's split the {service} refactor into smaller PRs so reviews don't take a whole day "
        "each",
        "the linter now fails on unused imports, so rebase before you push or CI will complain",
        "error handling in the {service} webhook swallows timeouts & returns a 200, which "
        "hides real failures",
        "the feature flag for {feature} is wired up but defaults to off until QA signs off",
        "build times on CI dropped from {m} to {n} minutes after we started caching the "
        "dependency layer",
        "the config loader still maps an empty string -> None, which bites us in {service} "
        "every few weeks",
    ),
    "oncall": (
        "the {service} alert fired again at {hour}am, and it was the same disk pressure issue "
        "as last week",
        "who owns the runbook for {service}, the link in the alert points at a page that no "
        "longer exists",
        "the incident review for the {service} outage is on {weekday}, please add your notes "
        "to the doc beforehand",
        "is the pager rotation for next week final, or can I still swap my {weekday} shift",
        "the error rate on {service} is back under {pct}% after the restart, but I'd like to "
        "understand the root cause",
        "we got paged {n} times overnight for {metric} on {service} and none of them needed action",
        "the status page still says degraded for {service} even though everything recovered "
        "an hour ago",
        "has anyone seen {service} return 502s from the load balancer while the upstream is "
        "healthy",
    ),
    "release": (
        "release {ver} is cut and going through QA, the changelog is in the usual place",
        "the {feature} work slips to next sprint because the API contract with the mobile team "
        "isn't settled",
        "we're freezing the main branch on {weekday} afternoon so the release train can leave "
        "on time",
        "QA found a regression in the {feature} flow on Safari, so the release is on hold until "
        "it's fixed",
        "the hotfix for {service} went out this morning and the error rate is already back to "
        "normal",
        "the release checklist now includes a database migration dry run against a copy of "
        "production",
        "mobile and web need to ship {feature} together, otherwise the onboarding copy won't match",
        "the staged rollout of {ver} is at {pct}% and the crash-free rate looks healthy so far",
    ),
    "planning": (
        "the roadmap review for {quarter} is on {weekday}, and I'd like each team to bring "
        "their top three priorities",
        "we agreed to trim the scope of {feature} so that the first version ships before the "
        "end of {quarter}",
        "please update the status of your tickets before the planning meeting so we can spend "
        "the time on decisions",
        "the {customer} account has asked for {feature} twice this month, which makes it a "
        "candidate for next quarter",
        "headcount for {quarter} is approved, so we can start interviewing for the two open "
        "engineering roles",
        "the offsite agenda is in the shared drive, including travel details & the dinner "
        "reservation",
        "I have moved the retro to {weekday} at {hour}pm because half the team is out on the "
        "original date",
        "our OKRs for {quarter} are drafted, and I would appreciate comments by the end of the "
        "week",
        "the budget request for {tool} licences has been approved by finance for the rest of "
        "the year",
    ),
    "product": (
        "users keep asking why {feature} is hidden behind the settings menu instead of the "
        "main screen",
        "the interviews with {customer} showed that nobody reads the tooltip on the {screen} page",
        "we could make {feature} opt-in first and watch how many people turn it on before we "
        "commit",
        "support tickets about {feature} doubled since the last release, mostly confusion "
        "about pricing",
        "the onboarding funnel loses people at the {screen} step, the one with the most form "
        "fields",
        "I'd rather ship a smaller {feature} next week than a perfect one next quarter",
        "a competitor launched something like {feature} yesterday, but theirs only works on "
        "desktop",
    ),
    "design": (
        "the new {component} on the {screen} page looks so much cleaner with the {color} accent",
        "I pushed the updated mockups for {screen} to Figma, the spacing finally lines up on "
        "mobile",
        "we're switching the headings to {font} and the contrast ratio now passes AA everywhere",
        "the empty state illustration for {screen} came back from the illustrator and it is "
        "adorable",
        "can we get rid of the drop shadow on the {component}, it fights with the {color} "
        "background",
        "the design system now has a proper {component} with hover, focus & disabled states",
        "user testing on the {screen} redesign went really well, people found the {component} "
        "right away",
        "dark mode for {screen} is ready for review, including {color} variants for every "
        "{component}",
    ),
    "data": (
        "the retention curve for the {quarter} cohort flattens at around {pct}% after week {n}",
        "the {table} table has duplicate rows for about {pct}% of users, so weekly actives are "
        "overstated",
        "I rebuilt the {dashboard} dashboard on the new events model and the numbers match "
        "finance within {pct}%",
        "the A/B test on {feature} is not significant yet, we need roughly {n}k more sessions "
        "per arm",
        "conversion on the {screen} page dropped {pct}% last week, but it lines up with the "
        "tracking outage",
        "the nightly job that loads {table} runs for {m} minutes now, mostly spent on one "
        "unindexed join",
        "median time to first value is {n} days & the mean is useless because of a long tail "
        "of dormant accounts",
        "we should define an active user once in dbt instead of re-deriving it in every "
        "{dashboard} query",
        "the survey response rate was only {pct}%, so I would not read much into the NPS change",
    ),
    "banter": (
        "who took the last {snack}",
        "that {show} finale though",
        "my cat just walked across the keyboard mid standup",
        "coffee machine is broken again",
        "is it friday yet",
        "the wifi on the third floor is cursed",
        "just saw a dog in the elevator",
        "{weekday} already feels long",
        "someone's alarm has been going off for ten minutes",
        "that meeting could have been an email",
        "new {snack} flavour in the kitchen",
    ),
    "food": (
        "anyone up for {food} at noon",
        "the {food} place downstairs has a new menu",
        "bringing {snack} tomorrow for the team",
        "{food} again for lunch",
        "the {food} truck is back on {weekday}",
        "there are leftover {snack} in the kitchen",
    ),
}

_RAW_VOCAB: dict[str, tuple[str, ...]] = {
    "service": (
        "api", "billing-worker", "search-indexer", "auth-gateway", "ingest",
        "notifications", "ledger", "web-frontend", "scheduler", "export-service",
    ),
    "k8s": (
        "pod", "deployment", "statefulset", "HPA", "ingress", "node pool", "CronJob",
        "sidecar", "DaemonSet",
    ),
    "cluster": (
        "the eu-west cluster", "the staging cluster", "prod-us-east", "the spot node pool",
        "the new GKE cluster", "the ARM nodes",
    ),
    "metric": (
        "p99 latency", "CPU throttling", "memory usage", "error rate", "queue depth",
        "disk pressure", "GC pause time",
    ),
    "tool": (
        "Terraform", "Helm", "ArgoCD", "Prometheus", "Grafana", "Karpenter", "Vault", "Istio",
        "Datadog",
    ),
    "n": ("2", "3", "4", "5", "8", "12", "15", "20", "30", "45", "90"),
    "m": ("6", "7", "9", "11", "14", "25", "40", "60", "120", "250"),
    "pct": ("0.5", "1", "2", "3", "5", "10", "12", "18", "25", "40"),
    "hour": ("1", "2", "3", "4", "5"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"),
    "table": ("events", "accounts", "invoices", "sessions", "subscriptions", "page_views"),
    "feature": (
        "dark mode", "SSO", "bulk export", "the activity feed", "usage-based billing",
        "saved filters", "two-factor login", "the mobile widget",
    ),
    "ver": ("2.14.0", "2.14.1", "2.15.0", "3.0.0-rc1", "3.0.0", "3.1.2"),
    "quarter": ("Q1", "Q2", "Q3", "Q4"),
    "customer": ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries"),
    "screen": ("settings", "checkout", "onboarding", "dashboard", "billing", "search", "profile"),
    "component": (
        "button", "modal", "date picker", "sidebar", "toast", "card grid", "nav bar", "dropdown",
    ),
    "color": ("teal", "coral", "deep purple", "warm grey", "mustard", "midnight blue"),
    "font": ("Inter", "IBM Plex Sans", "Source Serif", "Work Sans"),
    "dashboard": ("revenue", "growth", "activation", "churn", "support"),
    "snack": ("donuts", "croissants", "cookies", "brownies", "bagels", "empanadas"),
    "show": ("Severance", "The Bear", "Succession", "Shogun", "Slow Horses"),
    "food": ("ramen", "tacos", "pho", "pizza", "burritos", "dumplings", "falafel"),
}  # fmt: skip

TEMPLATES = {topic: tuple(map(_escape, lines)) for topic, lines in _RAW_TEMPLATES.items()}
VOCAB = {slot: tuple(map(_escape, words)) for slot, words in _RAW_VOCAB.items()}

LINKS = (
    "<https://example.com/docs|the docs>",
    "<https://grafana.synthco.example/d/api-latency|this dashboard>",
    "<https://www.figma.com/file/synthco-design|the figma file>",
    "<https://notion.synthco.example/runbooks|runbook>",
)
FILES = (  # (name pattern, mimetype) of shared files
    ("mockup-v{n}.png", "image/png"),
    ("{table}-export.csv", "text/csv"),
    ("incident-notes.pdf", "application/pdf"),
    ("trace-{m}.txt", "text/plain"),
    ("roadmap-{quarter}.pdf", "application/pdf"),
)

FIRST_NAMES = (
    "Alice", "Bruno", "Chiara", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Keiko", "Liam", "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tomas",
    "Uma", "Victor", "Wen", "Yara",
)  # fmt: skip
LAST_NAMES = (
    "Nguyen", "Okafor", "Rossi", "Patel", "Kowalski", "Haddad", "Kim", "Tanaka", "Garcia",
    "Berg", "Sato", "Murphy", "Cohen", "Iyer", "Petrova", "Silva", "Walsh", "Moreno", "Aziz",
    "Novak", "Rao", "Lindqvist", "Chen",
)  # fmt: skip


@dataclass(frozen=True)
class Persona:
    """How one synthetic person writes: the voice a per-user model should learn."""

    user_id: str
    name: str  # real name; sign-offs use the first word
    archetype: str
    opener: str  # signature phrase that starts a message ("" for none)
    closer: str  # signature that ends a message, with its own leading space or newlines
    signature_rate: float  # share of messages carrying the opener and closer
    typical_words: int
    sentence_end: str  # punctuation habit at the end of every sentence
    joiner: str  # between sentences: a space, or a newline and a bullet
    drop_commas: bool
    casing: str  # "sentence" or "lower"
    emoji: tuple[str, ...]
    emoji_rate: float
    topics: tuple[str, ...]
    activity: float  # relative share of the conversation

    @property
    def signature_phrases(self) -> tuple[str, ...]:
        """The phrases that give this writer away; the first is in nearly every message."""
        return tuple(phrase.strip() for phrase in (self.opener, self.closer) if phrase.strip())


@dataclass(frozen=True)
class _Archetype:
    """A hand-written style. Users cycle through these; later cycles take other variants."""

    key: str
    openers: tuple[str, ...]  # one per variant
    closers: tuple[str, ...]  # one per variant; "{first}" becomes the writer's first name
    typical_words: int
    sentence_end: str
    topics: tuple[str, ...]
    activity: float
    casing: str = "sentence"
    joiner: str = " "
    drop_commas: bool = False
    emoji: tuple[str, ...] = ()
    emoji_rate: float = 0.0
    signature_rate: float = 0.92


ARCHETYPES = (
    _Archetype(
        "infra_veteran", ("honestly,", "frankly,", "tbh,"), (" :rocket:", " :ship:", " :fire:"),
        typical_words=48, sentence_end=".", topics=("infra", "oncall", "code"), activity=3.0,
        signature_rate=1.0,
    ),
    _Archetype(
        "lowercase_lol", ("",), (" lol", " lmao", " haha"), typical_words=7, sentence_end="",
        topics=("banter", "food"), activity=1.6, casing="lower", drop_commas=True,
        emoji=(":joy:", ":skull:"), emoji_rate=0.15,
    ),
    _Archetype(
        "design_hype", ("",), (" :tada:", " :sparkles:", " :star-struck:"), typical_words=16,
        sentence_end="!!!", topics=("design", "product"), activity=1.2,
        emoji=(":heart_eyes:", ":art:", ":raised_hands:"), emoji_rate=0.4,
    ),
    _Archetype(
        "formal_pm", ("",),
        ("\n\nCheers, {first}", "\n\nBest regards, {first}", "\n\nKind regards, {first}"),
        typical_words=42, sentence_end=".", topics=("planning", "release", "product"),
        activity=1.5, signature_rate=0.95,
    ),
    _Archetype(
        "data_skeptic", ("fwiw", "imo", "afaict"), ("",), typical_words=30, sentence_end=".",
        topics=("data", "product"), activity=1.3, emoji=(":chart_with_upwards_trend:",),
        emoji_rate=0.1,
    ),
    _Archetype(
        "quick_question", ("quick q:", "sanity check:", "random q:"), ("",), typical_words=18,
        sentence_end="?", topics=("oncall", "code", "release"), activity=1.1,
        emoji=(":eyes:", ":thinking_face:"), emoji_rate=0.3,
    ),
    _Archetype(
        "bullet_updater", ("Update:", "Status:", "Heads up:"), ("",), typical_words=34,
        sentence_end="", topics=("release", "planning", "code"), activity=1.0, joiner="\n• ",
        emoji=(":white_check_mark:",), emoji_rate=0.2, signature_rate=0.95,
    ),
    _Archetype(
        "ellipsis_musing", ("hmm...", "welp...", "ok so..."), ("",), typical_words=14,
        sentence_end="...", topics=("product", "design", "banter"), activity=0.9,
        casing="lower", emoji=(":upside_down_face:",), emoji_rate=0.2,
    ),
)  # fmt: skip


@dataclass(frozen=True)
class _RoomSpec:
    """A channel every synthetic workspace has, and what people talk about there."""

    name: str
    topics: tuple[str, ...]
    weight: float  # share of the day's conversations
    purpose: str
    topic: str
    everyone: bool = False  # every human is a member
    is_general: bool = False
    archived: bool = False  # archived half way through the window: quiet afterwards


ROOMS = (
    _RoomSpec(
        "general", ("planning", "release", "product"), 1.0,
        "Company-wide announcements & work-based matters", "All hands every other Thursday",
        everyone=True, is_general=True,
    ),
    _RoomSpec(
        "engineering", ("infra", "code", "oncall", "release"), 1.4,
        "Everything about building & running our services", "On call this week: see the pager",
    ),
    _RoomSpec(
        "random", ("banter", "food"), 0.8, "Non-work banter and water cooler conversation",
        "Be nice", everyone=True,
    ),
    _RoomSpec("design", ("design", "product"), 0.7, "Design reviews and critique", "Figma links"),
    _RoomSpec("data", ("data", "product"), 0.7, "Metrics, dashboards & experiments", "dbt docs"),
    _RoomSpec(
        "proj-apollo", ("release", "planning", "infra"), 0.5, "The Apollo launch",
        "Launch on the 1st", archived=True,
    ),
)  # fmt: skip

BOT_ROOMS = ("general", "engineering")


@dataclass
class SyntheticWorkspace:
    """A whole synthetic workspace in Slack's own JSON shapes, plus the personas behind it."""

    team_id: str
    team_name: str
    channels: list[SlackDict]
    users: list[SlackDict]
    messages: dict[str, list[SlackDict]]  # channel id -> messages sorted by ts
    personas: dict[str, Persona]  # user id -> the persona that wrote their messages


@dataclass
class _Room:
    """A channel while it is being generated."""

    info: SlackDict
    spec: _RoomSpec
    everyone: tuple[list[str], list[float]]  # speakers and cumulative activity
    stayers: tuple[list[str], list[float]]  # the same without the user who leaves
    seq: int = 0  # messages so far: the microseconds of the next ts


@dataclass
class _Roster:
    """Who is in the workspace and where: everything generated before any message."""

    team_id: str
    team_name: str
    active_users: int
    personas: dict[str, Persona]
    profiles: dict[str, SlackDict]  # user id -> the user_profile carried on messages
    users: list[SlackDict]
    rooms: list[_Room]


def generate_workspace(
    users: int = 8,
    days: int = 30,
    seed: int = 0,
    team_id: str = "T0SYNTH01",
    team_name: str = "synthco",
) -> SyntheticWorkspace:
    """Generate a workspace of `users` active people talking for `days` days."""
    roster, rng = _start(users, days, seed, team_id, team_name)
    messages: dict[str, list[SlackDict]] = {room.info["id"]: [] for room in roster.rooms}
    for channel_id, message in _Generator(roster, rng, days).stream():
        messages[channel_id].append(message)
    for channel_messages in messages.values():
        channel_messages.sort(key=itemgetter("ts"))
    return SyntheticWorkspace(
        team_id=team_id,
        team_name=team_name,
        channels=[room.info for room in roster.rooms],
        users=roster.users,
        messages=messages,
        personas=roster.personas,
    )


def iter_messages(
    users: int,
    days: int,
    seed: int,
    *,
    team_id: str = "T0SYNTH01",
    team_name: str = "synthco",
) -> Iterator[tuple[str, SlackDict]]:
    """Stream (channel id, message) without holding the workspace, e.g. for benchmarks.

    Yields exactly the messages of `generate_workspace` with the same arguments, in
    generation order rather than sorted by ts.
    """
    roster, rng = _start(users, days, seed, team_id, team_name)
    yield from _Generator(roster, rng, days).stream()


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


# --- the roster ---------------------------------------------------------------------


def _start(
    users: int, days: int, seed: int, team_id: str, team_name: str
) -> tuple[_Roster, random.Random]:
    if users < 1 or days < 1:
        raise DoppelError(
            f"a synthetic workspace needs at least 1 user and 1 day (got {users} and {days})",
            "pass users >= 1 and days >= 1",
        )
    rng = random.Random(seed)
    return _build_roster(users, team_id, team_name, rng), rng


def _build_roster(users: int, team_id: str, team_name: str, rng: random.Random) -> _Roster:
    """People, their personas and the channels they are in.

    The last human has left the company (deleted) and only talks in the first third.
    """
    personas: dict[str, Persona] = {}
    human_users: list[SlackDict] = []
    for index in range(users + 1):
        user_id = f"U{index + 1:07d}"
        user = _human_user(index, user_id, team_id, deleted=index == users)
        human_users.append(user)
        personas[user_id] = _persona(index, user_id, user["real_name"], rng)
    leaver = human_users[-1]["id"]
    profiles = {user["id"]: _message_profile(user) for user in human_users}
    rooms = [
        _room(position, spec, list(personas.values()), leaver, rng)
        for position, spec in enumerate(ROOMS)
    ]
    return _Roster(
        team_id=team_id,
        team_name=team_name,
        active_users=users,
        personas=personas,
        profiles=profiles,
        users=[*human_users, *_system_users(team_id)],
        rooms=rooms,
    )


def _persona(index: int, user_id: str, real_name: str, rng: random.Random) -> Persona:
    """The index-th persona: archetypes in turn, other variants and a little jitter later."""
    archetype = ARCHETYPES[index % len(ARCHETYPES)]
    variant = index // len(ARCHETYPES)
    first_name = real_name.split()[0]
    return Persona(
        user_id=user_id,
        name=real_name,
        archetype=archetype.key,
        opener=archetype.openers[variant % len(archetype.openers)],
        closer=archetype.closers[variant % len(archetype.closers)].format(first=first_name),
        signature_rate=archetype.signature_rate,
        typical_words=max(3, round(archetype.typical_words * rng.uniform(0.85, 1.15))),
        sentence_end=archetype.sentence_end,
        joiner=archetype.joiner,
        drop_commas=archetype.drop_commas,
        casing=archetype.casing,
        emoji=archetype.emoji,
        emoji_rate=archetype.emoji_rate,
        topics=archetype.topics,
        activity=archetype.activity * rng.uniform(0.85, 1.15),
    )


def _full_name(index: int) -> tuple[str, str]:
    """Distinct (first, last) pairs for the first 552 users, numbered after that."""
    first = FIRST_NAMES[index % len(FIRST_NAMES)]
    last = LAST_NAMES[(index + index // len(FIRST_NAMES)) % len(LAST_NAMES)]
    cycle = index // (len(FIRST_NAMES) * len(LAST_NAMES))
    return first, f"{last}{cycle + 1}" if cycle else last


def _human_user(index: int, user_id: str, team_id: str, *, deleted: bool) -> SlackDict:
    first, last = _full_name(index)
    real_name = f"{first} {last}"
    return {
        "id": user_id,
        "team_id": team_id,
        "name": f"{first}.{last}".lower(),
        "real_name": real_name,
        "deleted": deleted,
        "is_bot": False,
        "profile": {
            # Every third person never set a display name: readers must fall back.
            "display_name": "" if index % 3 == 2 else first.lower(),
            "real_name": real_name,
            "image_72": f"{AVATARS}/{user_id}_72.png",
            "image_192": f"{AVATARS}/{user_id}_192.png",
        },
    }


def _system_users(team_id: str) -> list[SlackDict]:
    """The deploy bot and Slackbot (whom Slack lists with is_bot false)."""
    return [
        {
            "id": BOT_USER_ID,
            "team_id": team_id,
            "name": "deploybot",
            "real_name": "deploybot",
            "deleted": False,
            "is_bot": True,
            "profile": {
                "bot_id": BOT_ID,
                "display_name": "",
                "real_name": "deploybot",
                "image_72": f"{AVATARS}/{BOT_USER_ID}_72.png",
                "image_192": f"{AVATARS}/{BOT_USER_ID}_192.png",
            },
        },
        {
            "id": SLACKBOT_ID,
            "team_id": team_id,
            "name": "slackbot",
            "real_name": "Slackbot",
            "deleted": False,
            "is_bot": False,
            "profile": {
                "display_name": "Slackbot",
                "real_name": "Slackbot",
                "image_72": f"{AVATARS}/{SLACKBOT_ID}_72.png",
                "image_192": f"{AVATARS}/{SLACKBOT_ID}_192.png",
            },
        },
    ]


def _message_profile(user: SlackDict) -> SlackDict:
    profile = user["profile"]
    return {
        "name": user["name"],
        "real_name": profile["real_name"],
        "display_name": profile["display_name"],
        "image_72": profile["image_72"],
    }


def _created(position: int) -> int:
    """Channels are created at 06:00 on day 0, a minute apart, before anyone talks."""
    return BASE_EPOCH + 6 * 3600 + position * 60


def _room(
    position: int, spec: _RoomSpec, personas: list[Persona], leaver: str, rng: random.Random
) -> _Room:
    members = [
        persona
        for persona in personas
        if spec.everyone or set(persona.topics) & set(spec.topics) or rng.random() < 0.35
    ]
    if len(members) < min(3, len(personas)):
        members = personas[:3]
    stayers = [persona for persona in members if persona.user_id != leaver] or members
    creator = members[0].user_id
    created = _created(position)
    member_ids = [persona.user_id for persona in members]
    if spec.name in BOT_ROOMS:
        member_ids.append(BOT_USER_ID)
    info = {
        "id": f"C{position + 1:07d}",
        "name": spec.name,
        "created": created,
        "creator": creator,
        "is_archived": spec.archived,
        "is_general": spec.is_general,
        "members": member_ids,
        "purpose": {"value": spec.purpose, "creator": creator, "last_set": created + 1},
        "topic": {"value": spec.topic, "creator": creator, "last_set": created + 2},
    }
    return _Room(info=info, spec=spec, everyone=_weighted(members), stayers=_weighted(stayers))


def _weighted(personas: list[Persona]) -> tuple[list[str], list[float]]:
    ids, cumulative, total = [], [], 0.0
    for persona in personas:
        total += persona.activity
        ids.append(persona.user_id)
        cumulative.append(total)
    return ids, cumulative


# --- messages -----------------------------------------------------------------------


class _Vocab:
    """A format_map mapping that fills every {slot} with a random word of its kind."""

    def __init__(self, rng: random.Random) -> None:
        self.choice = rng.choice

    def __getitem__(self, slot: str) -> str:
        return self.choice(VOCAB[slot])


class _Generator:
    """Turns a roster into a stream of messages, conversation by conversation."""

    def __init__(self, roster: _Roster, rng: random.Random, days: int) -> None:
        self.roster = roster
        self.rng = rng
        self.days = days
        self.vocab = _Vocab(rng)
        self.rooms = {room.spec.name: room for room in roster.rooms}
        self.files = 0

    def stream(self) -> Iterator[tuple[str, SlackDict]]:
        yield from self._onboarding()
        for day in range(self.days):
            yield from self._bots(day)
            yield from self._day(day)

    # -- the day's rhythm

    def _onboarding(self) -> Iterator[tuple[str, SlackDict]]:
        """Day 0: each channel's creator joins and sets purpose and topic, then the rest join."""
        for room in self.roster.rooms:
            info = room.info
            creator, created = info["creator"], info["created"]
            yield info["id"], self._join(room, creator, created)
            for key in ("purpose", "topic"):
                value = info[key]["value"]
                yield (
                    info["id"],
                    self._system(
                        room,
                        creator,
                        info[key]["last_set"],
                        f"channel_{key}",
                        f"<@{creator}> set the channel {key}: {_escape(value)}",
                        **{key: value},
                    ),
                )
            for offset, user_id in enumerate(info["members"]):
                if user_id != creator:
                    yield info["id"], self._join(room, user_id, created + 3 + 5 * offset)

    def _bots(self, day: int) -> Iterator[tuple[str, SlackDict]]:
        """Weekdays: the standup reminder from the bot user, and a few deploy notices."""
        if day % 7 >= 5:
            return
        start = BASE_EPOCH + day * DAY
        general, engineering = self.rooms["general"], self.rooms["engineering"]
        reminder = self._base(general, start + 9 * 3600 + 50 * 60)
        reminder.update(
            user=BOT_USER_ID,
            bot_id=BOT_ID,
            text="Reminder: standup starts in 10 minutes <!here>",
            team=self.roster.team_id,
        )
        yield general.info["id"], reminder
        for _ in range(self.rng.randint(1, 3)):
            yield engineering.info["id"], self._deploy(engineering, start)

    def _deploy(self, room: _Room, day_start: int) -> SlackDict:
        rng, vocab = self.rng, self.vocab
        pull = rng.randint(100, 4000)
        message = self._base(room, day_start + rng.uniform(9 * 3600, 18 * 3600))
        message.update(
            subtype="bot_message",
            bot_id=BOT_ID,
            username="deploybot",
            text=f"Deployed `{vocab['service']}` v{vocab['ver']} to production &amp; "
            f"staging: <https://github.com/{self.roster.team_name}/api/pull/{pull}|#{pull}>",
        )
        return message

    def _day(self, day: int) -> Iterator[tuple[str, SlackDict]]:
        """Spread the day's conversations over working hours, channel by channel."""
        rng = self.rng
        rooms = [r for r in self.roster.rooms if not r.spec.archived or day < self.days // 2]
        per_user = WEEKEND_MESSAGES_PER_USER if day % 7 >= 5 else WEEKDAY_MESSAGES_PER_USER
        conversations = self.roster.active_users * per_user / MEAN_CONVERSATION
        total_weight = sum(room.spec.weight for room in rooms)
        day_start = BASE_EPOCH + day * DAY
        for room in rooms:
            expected = conversations * room.spec.weight / total_weight * rng.uniform(0.6, 1.4)
            count = int(expected) + (rng.random() < expected % 1)
            slot = WORK_SPAN / max(count, 1)
            for index in range(count):
                start = day_start + WORK_START + index * slot + rng.uniform(0, slot / 2)
                if rng.random() < THREAD_SHARE:
                    yield from self._thread(room, start, day)
                else:
                    yield from self._run(room, start, day)

    # -- conversations

    def _run(self, room: _Room, start: float, day: int) -> Iterator[tuple[str, SlackDict]]:
        """People answering each other in the channel itself, minutes apart."""
        rng, channel_id = self.rng, room.info["id"]
        speakers = self._speakers(room, day)
        previous: str | None = None
        now = start
        for _ in range(rng.randint(2, 10)):
            user_id = self._next_speaker(previous, [], speakers)
            if previous is not None:
                now += rng.uniform(5, 40) if user_id == previous else rng.uniform(20, 360)
            yield channel_id, self._say(room, user_id, now, previous)
            previous = user_id

    def _thread(self, room: _Room, start: float, day: int) -> Iterator[tuple[str, SlackDict]]:
        """A parent and 1-8 replies; some replies come a day or more later."""
        rng, channel_id = self.rng, room.info["id"]
        speakers = self._speakers(room, day)
        author = self._pick(speakers, avoid=None)
        parent = self._say(room, author, start, None)
        participants, replies, previous, now = [author], [], author, start
        for _ in range(min(8, 1 + int(rng.expovariate(1 / 2.2)))):
            late = rng.random() < LATE_REPLY
            now += rng.uniform(6 * 3600, 30 * 3600) if late else rng.uniform(30, 900)
            user_id = self._next_speaker(previous, participants, speakers)
            reply = self._say(room, user_id, now, previous)
            reply.update(thread_ts=parent["ts"], parent_user_id=author)
            replies.append(reply)
            if user_id not in participants:
                participants.append(user_id)
            previous = user_id
        repliers = list(dict.fromkeys(reply["user"] for reply in replies))
        parent.update(
            thread_ts=parent["ts"],
            reply_count=len(replies),
            reply_users=repliers,
            reply_users_count=len(repliers),
            latest_reply=max(reply["ts"] for reply in replies),
        )
        yield channel_id, parent
        for reply in replies:
            yield channel_id, reply
        if rng.random() < PIN_RATE:
            yield (
                channel_id,
                self._system(
                    room,
                    author,
                    start + rng.uniform(60, 600),
                    "pinned_item",
                    f"<@{author}> pinned a message to this channel.",
                    item_type="C",
                ),
            )

    def _speakers(self, room: _Room, day: int) -> tuple[list[str], list[float]]:
        return room.everyone if day < max(1, self.days // 3) else room.stayers

    def _pick(self, speakers: tuple[list[str], list[float]], avoid: str | None) -> str:
        """A speaker by activity, preferably not `avoid` (few tries keep it linear)."""
        ids, cumulative = speakers
        for _ in range(4):
            user_id = self.rng.choices(ids, cum_weights=cumulative)[0]
            if user_id != avoid:
                break
        return user_id

    def _next_speaker(
        self, previous: str | None, participants: list[str], speakers: tuple[list[str], list[float]]
    ) -> str:
        """Mostly someone else; sometimes the same person again; threads go back and forth."""
        rng = self.rng
        if previous is not None and rng.random() < DOUBLE_POST:
            return previous
        others = [user_id for user_id in participants if user_id != previous]
        if others and rng.random() < 0.5:
            return rng.choice(others)
        return self._pick(speakers, avoid=previous)

    # -- single messages

    def _base(self, room: _Room, now: float) -> SlackDict:
        """A message whose ts is unique in its channel.

        The microseconds count the channel's messages, so two could only clash beyond a
        million messages in one channel.
        """
        room.seq += 1
        return {"type": "message", "ts": f"{int(now)}.{room.seq % 1_000_000:06d}"}

    def _system(
        self, room: _Room, user_id: str, now: float, subtype: str, text: str, **extra: Any
    ) -> SlackDict:
        message = self._base(room, now)
        message.update(subtype=subtype, user=user_id, text=text, **extra)
        return message

    def _join(self, room: _Room, user_id: str, now: float) -> SlackDict:
        return self._system(
            room, user_id, now, "channel_join", f"<@{user_id}> has joined the channel"
        )

    def _say(self, room: _Room, user_id: str, now: float, previous: str | None) -> SlackDict:
        """A human message in the speaker's voice, sometimes edited or with a file."""
        rng, team_id = self.rng, self.roster.team_id
        persona = self.roster.personas[user_id]
        message = self._base(room, now)
        message.update(
            user=user_id,
            text=self._text(persona, room, self._head(room, previous, user_id)),
            team=team_id,
            user_team=team_id,
            user_profile=dict(self.roster.profiles[user_id]),
        )
        if rng.random() < EDIT_RATE:
            message["edited"] = {"user": user_id, "ts": f"{int(now) + rng.randint(30, 900)}.000000"}
        file_rate = DESIGN_FILE_RATE if room.spec.name == "design" else FILE_RATE
        if rng.random() < file_rate:
            self._attach_file(message)
        return message

    def _attach_file(self, message: SlackDict) -> None:
        self.files += 1
        pattern, mimetype = self.rng.choice(FILES)
        name = pattern.format_map(self.vocab)
        message.update(
            subtype="file_share",
            upload=True,
            files=[
                {
                    "id": f"F{self.files:07d}",
                    "name": name,
                    "title": name.rsplit(".", 1)[0].replace("-", " "),
                    "mimetype": mimetype,
                }
            ],
        )

    def _head(self, room: _Room, previous: str | None, user_id: str) -> str:
        """Markup at the start: <!here> on some announcements, <@U..> on some replies."""
        if previous is None:
            return "<!here>" if room.spec.is_general and self.rng.random() < 0.05 else ""
        if previous != user_id and self.rng.random() < MENTION_RATE:
            return f"<@{previous}>"
        return ""

    def _text(self, persona: Persona, room: _Room, head: str) -> str:
        """Sentences on the persona's topics (or the channel's) until their usual length."""
        rng = self.rng
        target = rng.gauss(persona.typical_words, persona.typical_words * 0.3)
        sentences: list[str] = []
        words = 0
        while words < target:
            topics = persona.topics if rng.random() < OWN_TOPIC else room.spec.topics
            sentence = rng.choice(TEMPLATES[rng.choice(topics)]).format_map(self.vocab)
            if sentence in sentences:
                continue
            words += sentence.count(" ") + 1
            sentences.append(sentence)
        signed = rng.random() < persona.signature_rate
        emoji = f" {rng.choice(persona.emoji)}" if rng.random() < persona.emoji_rate else ""
        return _style(persona, sentences, signed, head, self._link(room) + emoji)

    def _link(self, room: _Room) -> str:
        """Now and then a bare URL, a labelled URL or a link to another channel."""
        rng, roll = self.rng, self.rng.random()
        if roll < 0.04:
            return (
                f" <https://github.com/{self.roster.team_name}/api/pull/{rng.randint(100, 4000)}>"
            )
        if roll < 0.07:
            return f" see {rng.choice(LINKS)}"
        if roll < 0.09:
            other = rng.choice(self.roster.rooms)
            if other is not room:
                return f" (see <#{other.info['id']}|{other.spec.name}>)"
        return ""


def _style(persona: Persona, sentences: list[str], signed: bool, head: str, tail: str) -> str:
    """Dress plain sentences in the persona's casing, punctuation and signature."""
    if persona.casing == "lower":
        sentences = [sentence.lower() for sentence in sentences]
    if persona.drop_commas:
        sentences = [sentence.replace(",", "") for sentence in sentences]
    opener = persona.opener if signed else ""
    if persona.casing == "sentence":
        flows_on = bool(opener) and persona.joiner == " "  # "honestly, the pod..." stays lower
        sentences = [
            sentence if position == 0 and flows_on else sentence[:1].upper() + sentence[1:]
            for position, sentence in enumerate(sentences)
        ]
    body = persona.joiner.join(sentence + persona.sentence_end for sentence in sentences)
    lead = " ".join(part for part in (opener, head) if part)
    text = f"{lead}{persona.joiner}{body}" if lead else body
    return text + tail + (persona.closer if signed else "")


# --- the export ZIP -----------------------------------------------------------------


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
