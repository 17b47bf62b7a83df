"""Secrets and personal data out of chat text, replaced by typed placeholders.

A model trained on a pasted AWS key can say it back to anyone who asks, so every text that
reaches a dataset or a live prompt goes through a `Scrubber` first. Secrets are found by
detect-secrets' plugins, phone numbers by `phonenumbers`, and each is replaced by a
placeholder naming its kind (`[AWS_KEY]`, `[PHONE]`), so the sentence around it still reads.
Secrets are always scrubbed; emails and phone numbers unless the settings say otherwise.

Most chat text holds none of these, so a cheap check skips each detector on text that
cannot contain what it looks for.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterator

import phonenumbers
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from doppel.dataset.samples import SampleRules

# Placeholder kind -> the detect-secrets plugin that finds it. Left out: the plugins that
# need a file's syntax (keyword assignments), guess by entropy, or whose patterns match
# ordinary words (Artifactory's `AP…` passwords); they would scrub prose, not secrets.
SECRET_DETECTORS: dict[str, RegexBasedDetector] = {
    "aws_key": AWSKeyDetector(),
    "slack_token": SlackDetector(),
    "github_token": GitHubTokenDetector(),
    "gitlab_token": GitLabTokenDetector(),
    "private_key": PrivateKeyDetector(),
    "password": BasicAuthDetector(),  # the password of https://user:password@host
    "openai_key": OpenAIDetector(),
    "stripe_key": StripeDetector(),
    "sendgrid_key": SendGridDetector(),
    "pypi_token": PypiTokenDetector(),
    "npm_token": NpmDetector(),
    "azure_storage_key": AzureStorageKeyDetector(),
    "square_oauth_secret": SquareOAuthDetector(),
    "twilio_key": TwilioKeyDetector(),
    "mailchimp_key": MailchimpDetector(),
    "telegram_token": TelegramBotTokenDetector(),
    "discord_token": DiscordBotTokenDetector(),
    "jwt": JwtTokenDetector(),
}
# Patterns that match some context around the secret (the URL around a password, the
# assignment around an AWS secret key, the registry before an npm token) capture the secret
# itself as their first group. Elsewhere a group is just part of the token's prefix.
SECRET_IN_GROUP = frozenset({"password", "aws_key", "npm_token"})

# The gates that let clean text, nearly all of it, skip the detectors. They scan UTF-8
# bytes with a table or a substring search, the fastest scans Python has. Every secret
# above holds a run of 20 token characters (every real key and token, JWTs and the lines
# of a private key included, is that long), or "aws" (an AWS secret key, whose "/" and "+"
# break the run), or "AccountKey" (Azure's, likewise), or "://" and "@" (a password in a
# URL), or "PRIVATE KEY" (a key's header).
TOKEN_RUN = bytes(
    ord("a") if chr(byte) in string.ascii_letters + string.digits + "_-" else ord(" ")
    for byte in range(256)
)
NOT_DIGITS = bytes(set(range(256)) - set(b"0123456789"))
# Some patterns stop before the end of the token they found (the JWT pattern before the
# signature, fixed-length patterns before a longer token's tail): the rest of it goes too.
TOKEN_TAIL = re.compile(r"[A-Za-z0-9_+/=-]*")
# detect-secrets finds a private key by its header; the key itself runs to its END line
# (or to the end of the message when it was cut off).
KEY_END = re.compile(r"-----END [A-Z0-9 ]*-----")
# No library finds emails in free text (`email-validator` checks one given address,
# presidio needs a spaCy model), and an address's shape is simple enough for one pattern:
# a local part, "@", dot-separated labels and a letters-only top-level domain. The gate
# starts at "@", which Python's regex engine finds fast, and skips `@name` mentions.
EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
EMAIL_GATE = re.compile(r"@(?<=[\w.%+-]@)[\w-]+\.")
# A phone number has at least 7 digits (country code included) with a few separators
# between them; only text with such a run is handed to phonenumbers' (slow) matcher.
PHONE_DIGITS = re.compile(r"\d(?:[^\d\n]{0,3}\d){6}")


class Scrubber:
    """Replaces secrets (always), emails and phone numbers (when asked) with placeholders,
    counting what it replaced by kind in `replaced`."""

    def __init__(self, *, emails: bool = True, phones: bool = True, phone_region: str = "US"):
        self.emails = emails
        self.phones = phones
        self.phone_region = phone_region  # how numbers without a +country code are read
        self.replaced: Counter[str] = Counter()

    @classmethod
    def for_rules(cls, rules: SampleRules) -> Scrubber:
        """The scrubbing of `dataset:` settings, the same for datasets and live prompts."""
        return cls(
            emails=rules.scrub_emails, phones=rules.scrub_phones, phone_region=rules.phone_region
        )

    def __call__(self, text: str) -> str:
        raw = text.encode("utf-8", "surrogatepass")
        found = list(_secrets(text)) if _may_hold_secret(raw) else []
        if self.emails and "@" in text and EMAIL_GATE.search(text):
            found += [(m.start(), m.end(), "email") for m in EMAIL.finditer(text)]
        if self.phones and _may_hold_phone(text, raw):
            matcher = phonenumbers.PhoneNumberMatcher(text, self.phone_region)
            found += [(m.start, m.end, "phone") for m in matcher]
        if not found:
            return text
        kept = _without_overlaps(found)
        self.replaced.update(kind for _, _, kind in kept)
        pieces, done = [], 0
        for start, end, kind in kept:
            pieces += [text[done:start], f"[{kind.upper()}]"]
            done = end
        pieces.append(text[done:])
        return "".join(pieces)


def _may_hold_secret(raw: bytes) -> bool:
    return (
        b"a" * 20 in raw.translate(TOKEN_RUN)
        or b"aws" in raw.lower()
        or (b"://" in raw and b"@" in raw)
        or b"PRIVATE KEY" in raw
        or b"AccountKey" in raw
    )


def _may_hold_phone(text: str, raw: bytes) -> bool:
    """Seven ASCII digits first (cheap), then close enough together (a regex that also
    sees other scripts' digits)."""
    if text.isascii() and len(raw.translate(None, NOT_DIGITS)) < 7:
        return False
    return PHONE_DIGITS.search(text) is not None


def _secrets(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, kind) of every secret the plugins find in `text`.

    A plugin's `denylist` patterns locate each secret; a match counts only when the
    plugin's own `analyze_string` reports it too (it drops malformed JWTs, say), and that
    never calls out to the network, unlike detect-secrets' verification.
    """
    for kind, plugin in SECRET_DETECTORS.items():
        reported: set[str] | None = None
        for pattern in plugin.denylist:
            for match in pattern.finditer(text):
                if reported is None:
                    reported = set(plugin.analyze_string(text))
                if not reported & {match.group(0), *match.groups()}:
                    continue
                if kind in SECRET_IN_GROUP and pattern.groups:
                    start, end = match.span(1)
                elif kind == "private_key":
                    start, end = _private_key_span(text, *match.span())
                else:  # the whole token, even where the pattern stopped short of its end
                    start, end = match.start(), _token_end(text, match.end())
                yield start, end, kind


def _token_end(text: str, end: int) -> int:
    tail = TOKEN_TAIL.match(text, end)
    return tail.end() if tail else end


def _private_key_span(text: str, start: int, end: int) -> tuple[int, int]:
    """From the header's `-----BEGIN` to the `-----END …-----` line, body included."""
    if text[max(0, start - 5) : start] == "-----":
        start -= 5
    ending = KEY_END.search(text, end)
    return start, ending.end() if ending else len(text)


def _without_overlaps(found: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Secrets first, then emails and phones where no secret is; longest first among equals,
    in text order."""
    kept: list[tuple[int, int, str]] = []
    order = sorted(found, key=lambda f: (f[2] in {"email", "phone"}, f[0], f[0] - f[1]))
    for start, end, kind in order:
        if all(end <= other_start or start >= other_end for other_start, other_end, _ in kept):
            kept.append((start, end, kind))
    return sorted(kept)
