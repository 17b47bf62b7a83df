"""Credentials out of whatever is shown: errors, log lines, `/readyz`, Slack messages.

Database and MLflow URIs may carry a password (`postgresql://user:pw@host/db`). A URL is
rendered by SQLAlchemy, which parses every dialect's URL; free text (an exception's
message) only needs its embedded `scheme://user:password@` found, which a regex does.
"""

from __future__ import annotations

import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

HIDDEN = "***"
USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*):[^\s@]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its password, if any, shown as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not one URL SQLAlchemy reads: "databricks", a bad port
        return redact(url)


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` in it shown as ***."""
    return USERINFO.sub(rf"\1:{HIDDEN}@", text)
