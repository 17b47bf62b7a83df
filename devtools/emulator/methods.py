"""The Slack Web API methods the scraper, the bot and the demo call, as Slack answers them.

Each handler takes the live `Emulator`, the call's parameters and who the token speaks
for, and returns the answer without `ok`, or raises `SlackError` with Slack's error code.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left, bisect_right
from typing import Any

from devtools.emulator.paging import (
    cursor,
    flag,
    limit,
    page_by_id,
    read_ts_cursor,
    ts_range,
)
from devtools.emulator.state import (
    Conversation,
    Emulator,
    Identity,
    Params,
    SlackError,
    message_key,
    slack_method,
)
from doppel.types import SlackDict

APP_ID = "AEMULATOR"
TEAM_URL = "https://emulated.slack.com/"


@slack_method("api.test")
def api_test(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """Echo the arguments; `error=x` makes it fail with x, as on Slack."""
    if params.get("error"):
        raise SlackError(str(params["error"]))
    return {"args": {key: value for key, value in params.items() if key != "token"}}


@slack_method("auth.test")
def auth_test(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """The export's workspace id, so file imports and emulator scrapes land in one workspace."""
    answer = {
        "url": TEAM_URL,
        "team": emulator.config.team_name,
        "user": "doppelbot" if who.bot_id else (emulator.user(who.user_id) or {}).get("name"),
        "team_id": emulator.workspace_id,
        "user_id": who.user_id,
        "is_enterprise_install": False,
    }
    return {**answer, "bot_id": who.bot_id} if who.bot_id else answer


@slack_method("conversations.list")
def conversations_list(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    types = params.get("types") or "public_channel"
    wanted = set(types.split(",") if isinstance(types, str) else types)
    exclude_archived = flag(params, "exclude_archived")
    listed = [
        _channel_object(emulator, conversation, who)
        for conversation in emulator.conversations.values()
        if conversation.kind() in wanted
        and emulator.is_visible(conversation, who)
        and not (exclude_archived and conversation.info.get("is_archived"))
    ]
    page, metadata = page_by_id(listed, params, 100, emulator.config.max_page_size)
    return {"channels": page, "response_metadata": metadata}


@slack_method("conversations.info")
def conversations_info(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    return {"channel": _channel_object(emulator, emulator.conversation(params, who), who)}


@slack_method("conversations.join")
def conversations_join(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    conversation = emulator.conversation(params, who)
    if conversation.kind() != "public_channel":
        raise SlackError("method_not_supported_for_channel_type")
    if conversation.info.get("is_archived"):
        raise SlackError("is_archived")
    already = emulator.is_member(conversation, who)
    if who.bot_id:
        emulator.members.add(conversation.id)
    answer = {"channel": _channel_object(emulator, conversation, who)}
    return {**answer, "warning": "already_in_channel"} if already else answer


@slack_method("conversations.history")
def conversations_history(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """Newest first; a cursor holds the oldest ts handed out, so new posts never shift pages."""
    timeline = emulator.readable(params, who).timeline
    low, high = ts_range(timeline, params)
    before = read_ts_cursor(params, "before_ts")
    if before is not None:
        high = max(low, min(high, bisect_left(timeline, before, key=message_key)))
    start = max(low, high - limit(params, 100, emulator.config.max_page_size))
    page = timeline[start:high][::-1]
    more = start > low
    return {
        "messages": page,
        "has_more": more,
        "pin_count": 0,
        "response_metadata": {"next_cursor": cursor("before_ts", page[-1]["ts"] if more else None)},
    }


@slack_method("conversations.replies")
def conversations_replies(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """The parent first (first page only), then replies oldest first."""
    conversation = emulator.readable(params, who)
    message = conversation.by_ts.get(params.get("ts") or "")
    if message is None:
        raise SlackError("thread_not_found")
    root_ts = conversation.thread_root(message["ts"])
    parent = conversation.by_ts[root_ts]
    replies = conversation.threads.get(root_ts, [])
    low, high = ts_range(replies, params)
    after = read_ts_cursor(params, "after_ts")
    if after is not None:
        low = min(high, max(low, bisect_right(replies, after, key=message_key)))
    head = [parent] if after is None else []
    end = min(high, low + limit(params, 1000, emulator.config.max_page_size) - len(head))
    page = head + replies[low:end]
    more = end < high
    return {
        "messages": page,
        "has_more": more,
        "response_metadata": {"next_cursor": cursor("after_ts", page[-1]["ts"] if more else None)},
    }


@slack_method("users.list")
def users_list(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    most = emulator.config.max_page_size  # Slack returns everything when limit is 0
    page, metadata = page_by_id(emulator.users, params, most, most)
    return {"members": page, "cache_ts": int(time.time()), "response_metadata": metadata}


@slack_method("users.info")
def users_info(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    user = emulator.user(params.get("user"))
    if user is None:
        raise SlackError("user_not_found")
    return {"user": user}


@slack_method("chat.postMessage")
def chat_post_message(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """A user id as `channel` posts in the app's DM with that person, as on Slack."""
    if who.bot_id and emulator.user(params.get("channel")) is not None:
        params = {**params, "channel": emulator.direct_message(params["channel"]).id}
    conversation = emulator.readable(params, who)
    if conversation.info.get("is_archived"):
        raise SlackError("is_archived")
    text, blocks = params.get("text") or "", _blocks(params)
    if not text and not blocks:
        raise SlackError("no_text")
    username, icon_url = params.get("username"), params.get("icon_url")
    thread_ts = conversation.thread_root(params["thread_ts"]) if params.get("thread_ts") else None
    fields = {
        "type": "message",
        "subtype": "bot_message" if username else None,
        "user": who.user_id,
        "bot_id": who.bot_id,
        "app_id": APP_ID if who.bot_id else None,
        "text": text,
        "blocks": blocks,
        "ts": emulator.next_ts(),
        "team": emulator.workspace_id,
        "username": username,
        "icons": {"image_72": icon_url} if icon_url else None,
        "thread_ts": thread_ts,
    }
    message = {key: value for key, value in fields.items() if value is not None}
    conversation.add(message)
    if thread_ts:
        conversation.refresh_parent(thread_ts)
    return {"channel": conversation.id, "ts": message["ts"], "message": message}


@slack_method("chat.update")
def chat_update(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    conversation = emulator.readable(params, who)
    message = conversation.by_ts.get(params.get("ts") or "")
    if message is None:
        raise SlackError("message_not_found")
    text, blocks = params.get("text") or "", _blocks(params)
    if not text and not blocks:
        raise SlackError("no_text")
    message.update(text=text, edited={"user": who.user_id, "ts": emulator.next_ts()})
    if blocks:
        message["blocks"] = blocks
    return {"channel": conversation.id, "ts": message["ts"], "text": text, "message": message}


@slack_method("chat.delete")
def chat_delete(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """A bot token deletes only the app's own messages, as on Slack."""
    conversation = emulator.readable(params, who)
    message = conversation.by_ts.get(params.get("ts") or "")
    if message is None:
        raise SlackError("message_not_found")
    if who.bot_id and message.get("bot_id") != who.bot_id:
        raise SlackError("cant_delete_message")
    conversation.remove(message)
    return {"channel": conversation.id, "ts": message["ts"]}


@slack_method("chat.postEphemeral")
def chat_post_ephemeral(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """A message only `user` sees. Slack keeps no copy, so neither does the emulator: the
    request log holds it."""
    conversation = emulator.readable(params, who)
    if emulator.user(params.get("user")) is None:
        raise SlackError("user_not_found")
    if not params.get("text") and not _blocks(params):
        raise SlackError("no_text")
    return {"channel": conversation.id, "message_ts": emulator.next_ts()}


@slack_method("oauth.v2.access")
def oauth_v2_access(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """Exchange a consent-screen code for a bot token (and a user token if asked for)."""
    if params.get("client_id") != emulator.config.client_id:
        raise SlackError("invalid_client_id")
    if params.get("client_secret") != emulator.config.client_secret:
        raise SlackError("bad_client_secret")
    grant = emulator.oauth_codes.pop(params.get("code") or "", None)
    if grant is None:
        raise SlackError("invalid_code")
    if params.get("redirect_uri") not in (None, "", grant.redirect_uri):
        raise SlackError("bad_redirect_uri")
    authed_user: SlackDict = {"id": emulator.installer}
    if grant.user_scope:
        authed_user.update(
            scope=grant.user_scope, access_token=emulator.issue_token("xoxp"), token_type="user"
        )
    return {
        "app_id": APP_ID,
        "authed_user": authed_user,
        "scope": grant.scope,
        "token_type": "bot",
        "access_token": emulator.issue_token("xoxb"),
        "bot_user_id": emulator.config.bot_user,
        "team": {"id": emulator.workspace_id, "name": emulator.config.team_name},
        "enterprise": None,
        "is_enterprise_install": False,
    }


def _channel_object(emulator: Emulator, conversation: Conversation, who: Identity) -> SlackDict:
    """Slack's conversation object, built from the export's channel entry."""
    info = conversation.info
    kind = conversation.kind()
    members = set(info.get("members") or [])
    if conversation.id in emulator.members:
        members.add(emulator.config.bot_user)
    empty_text = {"value": "", "creator": "", "last_set": 0}
    return {
        **{key: value for key, value in info.items() if key not in ("members", "pins")},
        "is_channel": kind in ("public_channel", "private_channel"),
        "is_group": kind == "private_channel",
        "is_private": kind != "public_channel",
        "is_im": kind == "im",
        "is_mpim": kind == "mpim",
        "is_archived": bool(info.get("is_archived")),
        "is_member": emulator.is_member(conversation, who),
        "created": info.get("created", 0),
        "topic": info.get("topic") or empty_text,
        "purpose": info.get("purpose") or empty_text,
        "num_members": len(members),
    }


def _blocks(params: Params) -> Any:
    """Blocks arrive as a list in JSON bodies and as a JSON string in form bodies."""
    blocks = params.get("blocks")
    if not isinstance(blocks, str):
        return blocks or None
    try:
        return json.loads(blocks) if blocks else None
    except json.JSONDecodeError:
        raise SlackError("invalid_blocks") from None
