"""Who is who in one workspace: the store first, Slack's `users.info` for anyone new.

Names must be the ones training used (display name, else real name, else account name),
so the store is read first; people who joined after the last ingest are asked of Slack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy import select
from sqlalchemy.orm import Session

from doppel.store.lookup import user_label
from doppel.store.models import User
from doppel.store.records import user_row

MENTION = re.compile(r"<@([UW][A-Z0-9]+)")


class Directory:
    """Names, avatars and bot flags of one workspace's people."""

    def __init__(self, session: Session, workspace_id: str, client: WebClient) -> None:
        self.workspace_id = workspace_id
        self.client = client
        rows = session.execute(
            select(
                User.id, User.name, User.display_name, User.real_name, User.is_bot, User.avatar_url
            ).where(User.workspace_id == workspace_id)
        )
        self.people: dict[str, dict[str, Any] | None] = {row.id: row._asdict() for row in rows}

    def person(self, user_id: str) -> dict[str, Any] | None:
        if user_id not in self.people:
            try:
                user = self.client.users_info(user=user_id)["user"]
            except SlackApiError:
                self.people[user_id] = None
            else:
                self.people[user_id] = user_row(self.workspace_id, user)
        return self.people[user_id]

    def label(self, user_id: str) -> str:
        person = self.person(user_id)
        if person is None:
            return user_id
        return user_label(person["display_name"], person["real_name"], person["name"], user_id)

    def avatar(self, user_id: str) -> str | None:
        person = self.person(user_id)
        return person["avatar_url"] if person else None

    def names(
        self, messages: Iterable[Mapping[str, Any]], known: Mapping[str, str]
    ) -> dict[str, str]:
        """The label of every author and every person mentioned in `messages`; `known`
        names some ids already (and wins)."""
        ids: set[str] = set()
        for message in messages:
            ids.update(MENTION.findall(message.get("text") or ""))
            if message.get("user"):
                ids.add(message["user"])
        return {uid: self.label(uid) for uid in ids - set(known)} | dict(known)

    def bots(self) -> set[str]:
        return {uid for uid, person in self.people.items() if person and person["is_bot"]}


def is_admin(client: WebClient, user_id: str, admins: Iterable[str]) -> bool:
    """Workspace admins and owners (asked of Slack each time), and the configured admins."""
    if user_id in set(admins):
        return True
    try:
        user = client.users_info(user=user_id)["user"]
    except SlackApiError:
        return False
    return any(user.get(flag) for flag in ("is_admin", "is_owner", "is_primary_owner"))
