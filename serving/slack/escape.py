"""What the model wrote, made safe to post in Slack.

A persona learned from cleaned text, but nothing stops it from writing Slack markup:
`<!channel>` would notify everyone, `<@U123>` would ping someone, and
`<https://evil|https://bank>` would show a bank's address over another link. So a reply is
1. rendered as plain text by the training cleaner (`TextCleaner`): a mention becomes
   "@Display Name", a link "label (url)", a broadcast "@here";
2. escaped (`&`, `<`, `>`), so nothing left in it is markup;
3. defused: "@here", "@channel" and "@everyone" get a zero-width space after the "@";
4. capped at `slack_app.max_reply_chars`, on a word boundary, with "…".
It is then posted with `parse="none"`, `link_names=False` and as `verbatim` mrkdwn
(`serving/slack/mentions.py`), so Slack itself links and notifies nothing either.
"""

from __future__ import annotations

import re

from doppel.dataset.clean import ZERO_WIDTH_SPACE, TextCleaner

SLACK_ENTITIES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))  # "&" first
BROADCAST = re.compile(r"@(?=(?:here|channel|everyone)\b)", re.IGNORECASE)
PARTIAL_ENTITY = re.compile(r"&[a-z]*$")  # "&am" left by a cut through "&amp;"
ELLIPSIS = "…"


def escape(text: str) -> str:
    """Plain text as Slack shows it literally: `& < >` escaped, broadcasts defused."""
    for char, entity in SLACK_ENTITIES:
        text = text.replace(char, entity)
    return BROADCAST.sub("@" + ZERO_WIDTH_SPACE, text)


def cap(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters on a word boundary, ending in "…".

    It cuts escaped text, so it never splits an entity: entities hold no spaces, and a cut
    through one long word drops the partial entity at its end.
    """
    if len(text) <= limit:
        return text
    head = text[: limit - len(ELLIPSIS)]
    if not text[len(head)].isspace() and re.search(r"\s", head):
        head = head.rsplit(maxsplit=1)[0]
    return PARTIAL_ENTITY.sub("", head).rstrip() + ELLIPSIS


def slack_safe(reply: str, cleaner: TextCleaner, limit: int) -> str:
    """A model's reply, ready for `chat.postMessage`: plain, escaped, defused and capped."""
    return cap(escape(cleaner(reply)), limit)
