"""Finding workspaces and users in the store by what people call them."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from doppel.errors import DoppelError
from doppel.store.models import Channel, Message, User, Workspace


def user_label(display_name: str | None, real_name: str | None, name: str | None, uid: str) -> str:
    """The name people see: display name, else real name, else account name."""
    return display_name or real_name or name or uid


def resolve_workspace(session: Session, query: str | None) -> Workspace:
    """The workspace named by id or name; with no query, the only one in the store."""
    workspaces = list(session.scalars(select(Workspace).order_by(Workspace.id)))
    if not workspaces:
        raise DoppelError(
            "no workspace has been ingested yet",
            "run 'doppel ingest export PATH' or 'doppel ingest slack' first",
        )
    if query is None:
        if len(workspaces) == 1:
            return workspaces[0]
        listing = ", ".join(f"{w.id} ({w.name})" for w in workspaces)
        raise DoppelError(f"the store holds several workspaces: {listing}", "pass --workspace")
    for workspace in workspaces:
        if query in (workspace.id, workspace.name):
            return workspace
    raise DoppelError(
        f"unknown workspace '{query}'",
        "known workspaces: " + ", ".join(f"{w.id} ({w.name})" for w in workspaces),
    )


@dataclass(frozen=True)
class Person:
    id: str
    name: str | None
    display_name: str | None
    real_name: str | None
    is_bot: bool
    deleted: bool

    @property
    def label(self) -> str:
        return user_label(self.display_name, self.real_name, self.name, self.id)


def people(session: Session, workspace_id: str) -> dict[str, Person]:
    rows = session.execute(
        select(
            User.id, User.name, User.display_name, User.real_name, User.is_bot, User.deleted
        ).where(User.workspace_id == workspace_id)
    )
    return {row.id: Person(*row) for row in rows}


def channel_names(session: Session, workspace_id: str) -> dict[str, str]:
    rows = session.execute(
        select(Channel.id, Channel.name).where(Channel.workspace_id == workspace_id)
    )
    return {key: value for key, value in rows}


def message_counts(session: Session, workspace_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Message.user_id, func.count())
        .where(Message.workspace_id == workspace_id, Message.user_id.is_not(None))
        .group_by(Message.user_id)
    )
    return {key: value for key, value in rows}


def resolve_user(known: dict[str, Person], query: str) -> Person:
    """A user by id, name, display name or real name (case-insensitive, '@' optional)."""
    wanted = query.strip().removeprefix("@").casefold()
    if query in known:
        return known[query]
    matches = [
        person
        for person in known.values()
        if wanted
        in {
            (value or "").casefold()
            for value in (person.name, person.display_name, person.real_name)
        }
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listing = ", ".join(f"{p.id} ({p.label})" for p in matches)
        raise DoppelError(f"'{query}' matches several users: {listing}", "pass the user id")
    names = {
        value.casefold(): (value, person)
        for person in known.values()
        for value in (person.id, person.name, person.display_name, person.real_name)
        if value
    }
    close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.5)
    hint = (
        "did you mean: " + ", ".join(f"{names[c][0]} ({names[c][1].id})" for c in close)
        if close
        else "run 'doppel users' to list the users"
    )
    raise DoppelError(f"unknown user '{query}'", hint)


def find_person(session: Session, user: str, workspace: str | None) -> tuple[Workspace, Person]:
    """The workspace and the person a CLI or flow argument names."""
    ws = resolve_workspace(session, workspace)
    return ws, resolve_user(people(session, ws.id), user)
