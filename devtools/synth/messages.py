"""Single messages in Slack's export shapes: what one person, bot or system event posts.

The generator decides who speaks where and when; this module decides what the message
looks like: the writer's style, mentions, links, files and edits.
"""

from __future__ import annotations

import random
from typing import Any

from devtools.synth.roster import BOT_ID, BOT_USER_ID, Room, Roster
from devtools.synth.styles import WriterStyle, dress
from devtools.synth.templates import load_templates
from doppel.types import SlackDict

MENTION_RATE = 0.12  # a reply names the person it answers
EDIT_RATE = 0.04
FILE_RATE = 0.015
DESIGN_FILE_RATE = 0.08
OWN_TOPIC = 0.75  # the rest of the time people talk about the channel's subject


class _Vocab:
    """A format_map mapping that fills every {slot} with a random word of its kind."""

    def __init__(self, rng: random.Random) -> None:
        self.choice = rng.choice
        self.words = load_templates().vocab

    def __getitem__(self, slot: str) -> str:
        return self.choice(self.words[slot])


class MessageWriter:
    """Builds messages from the shared seeded generator, so their order fixes their text."""

    def __init__(self, roster: Roster, rng: random.Random) -> None:
        self.roster = roster
        self.rng = rng
        self.vocab = _Vocab(rng)
        self.templates = load_templates()
        self.files = 0  # files shared so far: their ids count up

    def base(self, room: Room, now: float) -> SlackDict:
        """A message whose ts is unique in its channel.

        The microseconds count the channel's messages, so two could only clash beyond a
        million messages in one channel.
        """
        room.seq += 1
        return {"type": "message", "ts": f"{int(now)}.{room.seq % 1_000_000:06d}"}

    def system(
        self, room: Room, user_id: str, now: float, subtype: str, text: str, **extra: Any
    ) -> SlackDict:
        message = self.base(room, now)
        message.update(subtype=subtype, user=user_id, text=text, **extra)
        return message

    def join(self, room: Room, user_id: str, now: float) -> SlackDict:
        return self.system(
            room, user_id, now, "channel_join", f"<@{user_id}> has joined the channel"
        )

    def reminder(self, room: Room, now: float) -> SlackDict:
        """The bot user's standup reminder."""
        message = self.base(room, now)
        message.update(
            user=BOT_USER_ID,
            bot_id=BOT_ID,
            text="Reminder: standup starts in 10 minutes <!here>",
            team=self.roster.workspace_id,
        )
        return message

    def deploy(self, room: Room, day_start: int) -> SlackDict:
        """A deploy notice from an integration: a bot_message with no user."""
        rng, vocab = self.rng, self.vocab
        pull = rng.randint(100, 4000)
        message = self.base(room, day_start + rng.uniform(9 * 3600, 18 * 3600))
        message.update(
            subtype="bot_message",
            bot_id=BOT_ID,
            username="deploybot",
            text=f"Deployed `{vocab['service']}` v{vocab['ver']} to production &amp; "
            f"staging: <https://github.com/{self.roster.team_name}/api/pull/{pull}|#{pull}>",
        )
        return message

    def say(self, room: Room, user_id: str, now: float, previous: str | None) -> SlackDict:
        """A human message in the speaker's style, sometimes edited or with a file."""
        rng, workspace_id = self.rng, self.roster.workspace_id
        style = self.roster.styles[user_id]
        message = self.base(room, now)
        message.update(
            user=user_id,
            text=self._text(style, room, self._head(room, previous, user_id)),
            team=workspace_id,
            user_team=workspace_id,
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
        pattern, mimetype = self.rng.choice(self.templates.files)
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

    def _head(self, room: Room, previous: str | None, user_id: str) -> str:
        """Markup at the start: <!here> on some announcements, <@U..> on some replies."""
        if previous is None:
            return "<!here>" if room.spec.is_general and self.rng.random() < 0.05 else ""
        if previous != user_id and self.rng.random() < MENTION_RATE:
            return f"<@{previous}>"
        return ""

    def _text(self, style: WriterStyle, room: Room, head: str) -> str:
        """Sentences on the writer's topics (or the channel's) until their usual length."""
        rng, sentences_by_topic = self.rng, self.templates.sentences
        target = rng.gauss(style.typical_words, style.typical_words * 0.3)
        sentences: list[str] = []
        words = 0
        while words < target:
            topics = style.topics if rng.random() < OWN_TOPIC else room.spec.topics
            sentence = rng.choice(sentences_by_topic[rng.choice(topics)]).format_map(self.vocab)
            if sentence in sentences:
                continue
            words += sentence.count(" ") + 1
            sentences.append(sentence)
        signed = rng.random() < style.signature_rate
        emoji = f" {rng.choice(style.emoji)}" if rng.random() < style.emoji_rate else ""
        return dress(style, sentences, signed, head, self._link(room) + emoji)

    def _link(self, room: Room) -> str:
        """Now and then a bare URL, a labelled URL or a link to another channel."""
        rng, roll = self.rng, self.rng.random()
        if roll < 0.04:
            return (
                f" <https://github.com/{self.roster.team_name}/api/pull/{rng.randint(100, 4000)}>"
            )
        if roll < 0.07:
            return f" see {rng.choice(self.templates.links)}"
        if roll < 0.09:
            other = rng.choice(self.roster.rooms)
            if other is not room:
                return f" (see <#{other.info['id']}|{other.spec.name}>)"
        return ""
