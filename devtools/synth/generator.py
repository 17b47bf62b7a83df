"""The workspace generator: a roster, then conversations spread over each day.

Every random choice comes from one generator seeded once, drawn in a fixed order, so the
same (users, days, seed) always gives the same messages; the work is linear in their number.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter

from devtools.synth.messages import MessageWriter
from devtools.synth.roster import BASE_EPOCH, DAY, Room, Roster, Speakers, build_roster
from devtools.synth.styles import WriterStyle
from devtools.synth.templates import escape
from doppel.errors import DoppelError
from doppel.types import SlackDict

# Volume and rhythm. About 11 human messages per user on weekdays, 3 on weekends.
WEEKDAY_MESSAGES_PER_USER = 11.0
WEEKEND_MESSAGES_PER_USER = 3.0
MEAN_CONVERSATION = 5.0  # messages per thread or run, on average
WORK_START = 7 * 3600  # conversations start between 07:00 and 20:00 UTC
WORK_SPAN = 13 * 3600
THREAD_SHARE = 0.45  # conversations that are threads; the rest are runs in the channel
LATE_REPLY = 0.08  # thread replies that come 6-30 hours later, often on a later day
DOUBLE_POST = 0.08  # the same person posts again right away
PIN_RATE = 0.03

Posted = Iterator[tuple[str, SlackDict]]  # (channel id, message) in generation order


@dataclass
class SyntheticWorkspace:
    """A whole synthetic workspace in Slack's own JSON shapes, plus the styles behind it."""

    workspace_id: str
    team_name: str
    channels: list[SlackDict]
    users: list[SlackDict]
    messages: dict[str, list[SlackDict]]  # channel id -> messages sorted by ts
    styles: dict[str, WriterStyle]  # user id -> the style that wrote their messages


def generate_workspace(
    users: int = 8,
    days: int = 30,
    seed: int = 0,
    workspace_id: str = "T0SYNTH01",
    team_name: str = "synthco",
) -> SyntheticWorkspace:
    """Generate a workspace of `users` active people talking for `days` days."""
    roster, rng = _start(users, days, seed, workspace_id, team_name)
    messages: dict[str, list[SlackDict]] = {room.info["id"]: [] for room in roster.rooms}
    for channel_id, message in _Generator(roster, rng, days).stream():
        messages[channel_id].append(message)
    for channel_messages in messages.values():
        channel_messages.sort(key=itemgetter("ts"))
    return SyntheticWorkspace(
        workspace_id=workspace_id,
        team_name=team_name,
        channels=[room.info for room in roster.rooms],
        users=roster.users,
        messages=messages,
        styles=roster.styles,
    )


def iter_messages(
    users: int,
    days: int,
    seed: int,
    *,
    workspace_id: str = "T0SYNTH01",
    team_name: str = "synthco",
) -> Posted:
    """Stream (channel id, message) without holding the workspace, e.g. for benchmarks.

    Yields exactly the messages of `generate_workspace` with the same arguments, in
    generation order rather than sorted by ts.
    """
    roster, rng = _start(users, days, seed, workspace_id, team_name)
    yield from _Generator(roster, rng, days).stream()


def _start(
    users: int, days: int, seed: int, workspace_id: str, team_name: str
) -> tuple[Roster, random.Random]:
    if users < 1 or days < 1:
        raise DoppelError(
            f"a synthetic workspace needs at least 1 user and 1 day (got {users} and {days})",
            "pass users >= 1 and days >= 1",
        )
    rng = random.Random(seed)
    return build_roster(users, workspace_id, team_name, rng), rng


class _Generator:
    """Turns a roster into a stream of messages, conversation by conversation."""

    def __init__(self, roster: Roster, rng: random.Random, days: int) -> None:
        self.roster = roster
        self.rng = rng
        self.days = days
        self.writer = MessageWriter(roster, rng)
        self.rooms = {room.spec.name: room for room in roster.rooms}

    def stream(self) -> Posted:
        yield from self._onboarding()
        for day in range(self.days):
            yield from self._bots(day)
            yield from self._day(day)

    # -- the day's rhythm

    def _onboarding(self) -> Posted:
        """Day 0: each channel's creator joins and sets purpose and topic, then the rest join."""
        for room in self.roster.rooms:
            info = room.info
            creator, created = info["creator"], info["created"]
            yield info["id"], self.writer.join(room, creator, created)
            for key in ("purpose", "topic"):
                value = info[key]["value"]
                yield (
                    info["id"],
                    self.writer.system(
                        room,
                        creator,
                        info[key]["last_set"],
                        f"channel_{key}",
                        f"<@{creator}> set the channel {key}: {escape(value)}",
                        **{key: value},
                    ),
                )
            for offset, user_id in enumerate(info["members"]):
                if user_id != creator:
                    yield info["id"], self.writer.join(room, user_id, created + 3 + 5 * offset)

    def _bots(self, day: int) -> Posted:
        """Weekdays: the standup reminder from the bot user, and a few deploy notices."""
        if day % 7 >= 5:
            return
        start = BASE_EPOCH + day * DAY
        general, engineering = self.rooms["general"], self.rooms["engineering"]
        yield general.info["id"], self.writer.reminder(general, start + 9 * 3600 + 50 * 60)
        for _ in range(self.rng.randint(1, 3)):
            yield engineering.info["id"], self.writer.deploy(engineering, start)

    def _day(self, day: int) -> Posted:
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

    def _run(self, room: Room, start: float, day: int) -> Posted:
        """People answering each other in the channel itself, minutes apart."""
        rng, channel_id = self.rng, room.info["id"]
        speakers = self._speakers(room, day)
        previous: str | None = None
        now = start
        for _ in range(rng.randint(2, 10)):
            user_id = self._next_speaker(previous, [], speakers)
            if previous is not None:
                now += rng.uniform(5, 40) if user_id == previous else rng.uniform(20, 360)
            yield channel_id, self.writer.say(room, user_id, now, previous)
            previous = user_id

    def _thread(self, room: Room, start: float, day: int) -> Posted:
        """A parent and 1-8 replies; some replies come a day or more later."""
        rng, channel_id = self.rng, room.info["id"]
        speakers = self._speakers(room, day)
        author = self._pick(speakers, avoid=None)
        parent = self.writer.say(room, author, start, None)
        participants, replies, previous, now = [author], [], author, start
        for _ in range(min(8, 1 + int(rng.expovariate(1 / 2.2)))):
            late = rng.random() < LATE_REPLY
            now += rng.uniform(6 * 3600, 30 * 3600) if late else rng.uniform(30, 900)
            user_id = self._next_speaker(previous, participants, speakers)
            reply = self.writer.say(room, user_id, now, previous)
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
                self.writer.system(
                    room,
                    author,
                    start + rng.uniform(60, 600),
                    "pinned_item",
                    f"<@{author}> pinned a message to this channel.",
                    item_type="C",
                ),
            )

    def _speakers(self, room: Room, day: int) -> Speakers:
        return room.everyone if day < max(1, self.days // 3) else room.stayers

    def _pick(self, speakers: Speakers, avoid: str | None) -> str:
        """A speaker by activity, preferably not `avoid` (few tries keep it linear)."""
        ids, cumulative = speakers
        for _ in range(4):
            user_id = self.rng.choices(ids, cum_weights=cumulative)[0]
            if user_id != avoid:
                break
        return user_id

    def _next_speaker(
        self, previous: str | None, participants: list[str], speakers: Speakers
    ) -> str:
        """Mostly someone else; sometimes the same person again; threads go back and forth."""
        rng = self.rng
        if previous is not None and rng.random() < DOUBLE_POST:
            return previous
        others = [user_id for user_id in participants if user_id != previous]
        if others and rng.random() < 0.5:
            return rng.choice(others)
        return self._pick(speakers, avoid=previous)
