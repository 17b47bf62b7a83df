"""Who is in a synthetic workspace and where: people, their styles and the channels.

Everything here is decided before the first message, from the same seeded generator
the messages then draw from, so the roster is part of what a seed reproduces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from devtools.synth.styles import WriterStyle, writer_style
from devtools.synth.templates import load_templates
from doppel.types import SlackDict

BASE_EPOCH = 1_699_833_600  # Monday 2023-11-13 00:00 UTC: day 0 of every synthetic workspace
DAY = 86_400
BOT_USER_ID = "U0BOT0001"
BOT_ID = "B0000001"
SLACKBOT_ID = "USLACKBOT"
AVATARS = "https://avatars.synthco.example"
BOT_ROOMS = ("general", "engineering")  # where the bot user is a member
JOIN_RATE = 0.35  # chance that someone joins a channel off their topics

Speakers = tuple[list[str], list[float]]  # user ids and their cumulative activity


@dataclass(frozen=True)
class RoomSpec:
    """A channel every synthetic workspace has (from templates.yaml), and its subjects."""

    name: str
    topics: tuple[str, ...]
    weight: float  # share of the day's conversations
    purpose: str
    topic: str
    everyone: bool = False  # every human is a member
    is_general: bool = False
    archived: bool = False  # archived half way through the window: quiet afterwards


@cache
def room_specs() -> tuple[RoomSpec, ...]:
    return tuple(RoomSpec(**entry) for entry in load_templates().rooms)


@dataclass
class Room:
    """A channel while it is being generated."""

    info: SlackDict  # its channels.json entry
    spec: RoomSpec
    everyone: Speakers
    stayers: Speakers  # the same without the user who leaves
    seq: int = 0  # messages so far: the microseconds of the next ts


@dataclass
class Roster:
    """Who is in the workspace and where: everything generated before any message."""

    workspace_id: str
    team_name: str
    active_users: int
    styles: dict[str, WriterStyle]  # user id -> how they write
    profiles: dict[str, SlackDict]  # user id -> the user_profile carried on messages
    users: list[SlackDict]
    rooms: list[Room]


def build_roster(users: int, workspace_id: str, team_name: str, rng: random.Random) -> Roster:
    """People, their writer styles and the channels they are in.

    The last human has left the company (deleted) and only talks in the first third.
    """
    styles: dict[str, WriterStyle] = {}
    human_users: list[SlackDict] = []
    for index in range(users + 1):
        user_id = f"U{index + 1:07d}"
        user = _human_user(index, user_id, workspace_id, deleted=index == users)
        human_users.append(user)
        styles[user_id] = writer_style(index, user_id, user["real_name"], rng)
    leaver = human_users[-1]["id"]
    profiles = {user["id"]: _message_profile(user) for user in human_users}
    rooms = [
        _room(position, spec, list(styles.values()), leaver, rng)
        for position, spec in enumerate(room_specs())
    ]
    return Roster(
        workspace_id=workspace_id,
        team_name=team_name,
        active_users=users,
        styles=styles,
        profiles=profiles,
        users=[*human_users, *_system_users(workspace_id)],
        rooms=rooms,
    )


def _full_name(index: int) -> tuple[str, str]:
    """Distinct (first, last) pairs for the first 552 users, numbered after that."""
    templates = load_templates()
    first_names, last_names = templates.first_names, templates.last_names
    first = first_names[index % len(first_names)]
    last = last_names[(index + index // len(first_names)) % len(last_names)]
    cycle = index // (len(first_names) * len(last_names))
    return first, f"{last}{cycle + 1}" if cycle else last


def _human_user(index: int, user_id: str, workspace_id: str, *, deleted: bool) -> SlackDict:
    first, last = _full_name(index)
    real_name = f"{first} {last}"
    return {
        "id": user_id,
        "team_id": workspace_id,
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


def _system_users(workspace_id: str) -> list[SlackDict]:
    """The deploy bot and Slackbot (whom Slack lists with is_bot false)."""
    return [
        {
            "id": BOT_USER_ID,
            "team_id": workspace_id,
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
            "team_id": workspace_id,
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
    position: int, spec: RoomSpec, styles: list[WriterStyle], leaver: str, rng: random.Random
) -> Room:
    members = [
        style
        for style in styles
        if spec.everyone or set(style.topics) & set(spec.topics) or rng.random() < JOIN_RATE
    ]
    if len(members) < min(3, len(styles)):
        members = styles[:3]
    stayers = [style for style in members if style.user_id != leaver] or members
    creator = members[0].user_id
    created = _created(position)
    member_ids = [style.user_id for style in members]
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
    return Room(info=info, spec=spec, everyone=_weighted(members), stayers=_weighted(stayers))


def _weighted(styles: list[WriterStyle]) -> Speakers:
    ids: list[str] = []
    cumulative: list[float] = []
    total = 0.0
    for style in styles:
        total += style.activity
        ids.append(style.user_id)
        cumulative.append(total)
    return ids, cumulative
