"""The demo's last steps: someone @mentions DoppelBot, Slack delivers the signed event,
and we read back what the bot posted in the thread.

A person (the emulator's installer, through their user token) asks a question in
#general; this script then sends the `app_mention` event to `/slack/events` exactly as
Slack would, signed with the signing secret, and waits for the bot's reply (posted as a
placeholder first, then replaced with `chat.update`).

    python scripts/demo_mention.py --slack-api URL --app URL --secret S [--question TEXT]
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier

USER_TOKEN, BOT_TOKEN = "xoxp-emulator", "xoxb-emulator"  # what the emulator issues


def ask(slack_api: str, app_url: str, secret: str, question: str, timeout: float) -> None:
    asker = WebClient(token=USER_TOKEN, base_url=slack_api)
    bot = WebClient(token=BOT_TOKEN, base_url=slack_api)
    me = asker.auth_test()
    bot_user = bot.auth_test()["user_id"]
    channels = bot.conversations_list(types="public_channel")["channels"]
    general = next((c for c in channels if c.get("is_general")), channels[0])
    text = f"<@{bot_user}> {question}"
    posted = asker.chat_postMessage(channel=general["id"], text=text)

    body = json.dumps(
        {
            "type": "event_callback",
            "team_id": me["team_id"],
            "api_app_id": "AEMULATOR",
            "event_id": f"Ev{posted['ts'].replace('.', '')}",
            "event_time": int(time.time()),
            "event": {
                "type": "app_mention",
                "user": me["user_id"],
                "text": text,
                "ts": posted["ts"],
                "channel": general["id"],
                "event_ts": posted["ts"],
            },
        }
    )
    stamp = str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    headers = {
        "content-type": "application/json",
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": signature,
    }
    started = time.monotonic()
    acked = httpx.post(f"{app_url}/slack/events", content=body, headers=headers, timeout=10)
    acked.raise_for_status()
    waited = time.monotonic() - started
    print(
        f"signed app_mention delivered; Slack got its ack ({acked.status_code}) in {waited:.2f} s"
    )

    while time.monotonic() - started < timeout:
        replies = bot.conversations_replies(channel=general["id"], ts=posted["ts"])["messages"]
        final = [m for m in replies if m.get("bot_id") and "edited" in m]
        if final:
            reply = final[0]
            print(f"\n  #{general['name']}  {me['user']}: {text}")
            print(f"  #{general['name']}  {reply.get('username')}: {reply['text']}\n")
            print(f"answered in {time.monotonic() - started:.1f} s")
            return
        time.sleep(1)
    raise SystemExit(f"no reply in the thread after {timeout:.0f} s; see the serve log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slack-api", required=True, help="the emulator's Web API URL")
    parser.add_argument("--app", required=True, help="where /slack/events is served")
    parser.add_argument("--secret", required=True, help="the Slack signing secret")
    parser.add_argument("--question", default="what do you think we should do about the release?")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    ask(args.slack_api, args.app, args.secret, args.question, args.timeout)


if __name__ == "__main__":
    main()
