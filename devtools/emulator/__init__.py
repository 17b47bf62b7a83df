"""A Slack Web API emulator that serves a workspace export over HTTP.

The scraper, the bot and the demo talk to it with the unchanged `slack_sdk.WebClient`
(`base_url="http://HOST:PORT/api/"`), so everything that reaches real Slack can be
exercised offline: cursor pagination, threads, posting, OAuth installs, and the faults
real Slack throws at clients (rate limits with Retry-After, 5xx answers, slow replies).

`state` holds the live workspace, `paging` Slack's cursors, `methods` the Web API
methods and `app` the HTTP layer.
"""

from __future__ import annotations

from devtools.emulator.app import create_app, run_emulator, serve_in_thread
from devtools.emulator.state import Emulator, EmulatorConfig

__all__ = ["Emulator", "EmulatorConfig", "create_app", "run_emulator", "serve_in_thread"]
