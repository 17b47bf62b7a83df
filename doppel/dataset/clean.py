"""Slack markup to plain text, shared by training, evaluation and serving.

Slack stores `<@U1>` mentions, `<#C1|eng>` channel links, `<url|label>` links and
`<!here>` broadcasts, and escapes `& < >`. A model should see what people saw.

Chat-template control strings typed in Slack (`<|im_end|>`, `<|eot_id|>`, any `<|…|>`,
and DeepSeek's, whose bars are fullwidth) are neutralised: a zero-width space goes between
the `<` and the bar. People still read what was typed, but no tokenizer sees a control
token, so a message can neither end a turn in training nor forge one in a live prompt.
This runs after unescaping, because Slack stores `<|im_end|>` as `&lt;|im_end|&gt;`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MARKUP = re.compile(r"<([^<>\n]*)>")
ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&"))
CONTROL_TOKEN = re.compile(r"<(?=[|\uff5c])")  # the "<" before a bar, plain or fullwidth
ZERO_WIDTH_SPACE = "\u200b"

# Subtypes that are a person talking; everything else (joins, leaves, topic/purpose/name
# changes, archives, pins, bot posts, file comments, ...) is dropped from datasets.
SPOKEN_SUBTYPES = frozenset({None, "file_share", "thread_broadcast", "me_message"})


class TextCleaner:
    """Renders Slack markup with this workspace's user and channel names."""

    def __init__(self, user_names: Mapping[str, str], channel_names: Mapping[str, str]) -> None:
        self.user_names = user_names
        self.channel_names = channel_names

    def __call__(self, text: str) -> str:
        if "<" in text:
            text = MARKUP.sub(self._render, text)
        if "&" in text:
            for entity, char in ENTITIES:
                text = text.replace(entity, char)
        if "<" in text:
            text = CONTROL_TOKEN.sub("<" + ZERO_WIDTH_SPACE, text)
        return text.strip()

    def _render(self, match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            uid = target[1:]
            return "@" + self.user_names.get(uid, label.lstrip("@") or uid)
        if target.startswith("#"):
            cid = target[1:]
            return "#" + (label or self.channel_names.get(cid, cid))
        if target.startswith("!"):
            return _special(target[1:], label)
        if target.startswith("mailto:"):
            return label or target.removeprefix("mailto:")
        if not label or label in target:
            return target
        return f"{label} ({target})"


def _special(command: str, label: str) -> str:
    """`<!here>`, `<!channel>`, `<!subteam^S1|@team>`, `<!date^...|fallback>`."""
    keyword = command.split("^", 1)[0]
    if keyword in {"here", "channel", "everyone"}:
        return "@" + keyword
    if keyword == "subteam":
        return label if label.startswith("@") else "@" + (label or "team")
    return label
