"""Writer styles: the distinct, learnable voice of each synthetic person.

A style is what a per-user model should pick up: signature phrases, message length,
punctuation, casing and emoji habits. Styles come from a few hand-written archetypes
in templates.yaml; users cycle through them, later cycles taking other variants.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from devtools.synth.templates import load_templates


@dataclass(frozen=True)
class WriterStyle:
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
class Archetype:
    """A hand-written style from templates.yaml; the defaults are what most share."""

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


@cache
def archetypes() -> tuple[Archetype, ...]:
    return tuple(Archetype(**entry) for entry in load_templates().archetypes)


def writer_style(index: int, user_id: str, real_name: str, rng: random.Random) -> WriterStyle:
    """The index-th style: archetypes in turn, other variants and a little jitter later."""
    kinds = archetypes()
    archetype = kinds[index % len(kinds)]
    variant = index // len(kinds)
    first_name = real_name.split()[0]
    return WriterStyle(
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


def dress(style: WriterStyle, sentences: list[str], signed: bool, head: str, tail: str) -> str:
    """Dress plain sentences in the writer's casing, punctuation and signature."""
    if style.casing == "lower":
        sentences = [sentence.lower() for sentence in sentences]
    if style.drop_commas:
        sentences = [sentence.replace(",", "") for sentence in sentences]
    opener = style.opener if signed else ""
    if style.casing == "sentence":
        flows_on = bool(opener) and style.joiner == " "  # "honestly, the pod..." stays lower
        sentences = [
            sentence if position == 0 and flows_on else sentence[:1].upper() + sentence[1:]
            for position, sentence in enumerate(sentences)
        ]
    body = style.joiner.join(sentence + style.sentence_end for sentence in sentences)
    lead = " ".join(part for part in (opener, head) if part)
    text = f"{lead}{style.joiner}{body}" if lead else body
    return text + tail + (style.closer if signed else "")
