"""What the flows share: resolving a person, and which failures deserve a retry."""

from __future__ import annotations

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.store.database import database
from doppel.store.lookup import find_person


def person_ids(settings: Settings, user: str, workspace: str | None) -> tuple[str, str]:
    """(workspace_id, user_id) for a user named by id, name, display or real name."""
    with database(settings.db_url).session() as session:
        ws, person = find_person(session, user, workspace)
    return ws.id, person.id


def transient(_task: object, _task_run: object, state: object) -> bool:
    """Retry network trouble, never a problem the user must fix (bad token, bad input)."""
    try:
        state.result()  # type: ignore[attr-defined]
    except DoppelError:
        return False
    except Exception:
        return True
    return False
