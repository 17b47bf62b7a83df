"""The Slack app's view of the model API: one persona's reply to a chat.

The model API speaks OpenAI's `POST /v1/chat/completions`, with `model` set to
"<workspace_id>/<user_id>". It answers 404 with `{"error": {"type": "model_not_found"}}` when
the person has no production adapter, and it adds the persona's own system prompt when
the chat does not open with one. `DOPPEL_SERVING_URL` may name several replicas of it.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Protocol

import httpx

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.redact import redact, redact_url
from doppel.types import ChatMessage

KEY_HINT = "set DOPPEL_SLACK_APP__MODEL_API_KEY to one of the model API's DOPPEL_SERVE__API_KEYS"


class NoProductionAdapter(DoppelError):
    """The persona exists but nothing has been promoted to `production` yet."""


class ChatModel(Protocol):
    """Anything that writes a persona's next message: the HTTP client below, or an
    in-process model when the Slack app runs inside the model server."""

    def reply(self, workspace_id: str, user_id: str, messages: list[ChatMessage]) -> str: ...


def model_api_key(settings: Settings) -> str | None:
    """The key the Slack app sends: `slack_app.model_api_key`, else the first of
    `serve.api_keys` (one process, or one configuration, serving both)."""
    keys = [settings.slack_app.model_api_key, *settings.serve.api_keys]
    return next((key.get_secret_value() for key in keys if key and key.get_secret_value()), None)


class ModelClient:
    """The model API over HTTP (`DOPPEL_SERVING_URL`), with timeouts and clear errors.

    `base_url` is one URL, or several replicas comma-separated. Requests take the replicas
    in turn; one that cannot be reached (or answers 503) is skipped for `cooldown` seconds,
    and one that is busy (429) hands the request to the next. A completion that was sent
    but not answered in time is not sent again: its time budget is spent.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 120.0,
        max_tokens: int = 200,
        api_key: str | None = None,
        cooldown: float = 10.0,
    ) -> None:
        self.base_urls = model_api_urls(base_url)
        self.max_tokens = max_tokens
        self.cooldown = cooldown
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=5.0),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )
        self._lock = threading.Lock()
        self._turns = itertools.count()
        self._down_until: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings, base_url: str) -> ModelClient:
        """The client the Slack app uses, with its timeout, reply length and key."""
        return cls(
            base_url,
            timeout=settings.slack_app.reply_timeout_seconds,
            max_tokens=settings.slack_app.max_tokens,
            api_key=model_api_key(settings),
        )

    def reply(self, workspace_id: str, user_id: str, messages: list[ChatMessage]) -> str:
        model = f"{workspace_id}/{user_id}"
        body = {"model": model, "messages": messages, "max_tokens": self.max_tokens}
        order = self._order()
        failures = []
        for place, url in enumerate(order):
            try:
                response = self._http.post(f"{url}/v1/chat/completions", json=body)
            except UNREACHABLE as error:  # nothing was answered: another replica may
                self._mark_down(url)
                failures.append(f"{redact_url(url)}: {error!r}")
                continue
            except httpx.HTTPError as error:
                raise DoppelError(
                    f"the model API at {redact_url(url)} did not answer: {error!r}",
                    "check the model server's log (slack_app.reply_timeout_seconds bounds a reply)",
                ) from None
            if response.status_code in (429, 503) and place < len(order) - 1:
                if response.status_code == 503:  # starting or stopping
                    self._mark_down(url)
                failures.append(f"{redact_url(url)}: {response.status_code}")
                continue
            return _completion(response, url, model)
        raise DoppelError(
            "no model API replica answered: " + "; ".join(failures),
            "start them ('doppel serve') or fix DOPPEL_SERVING_URL",
        )

    def _order(self) -> list[str]:
        """Every replica, from the next in turn on; those that failed lately last."""
        with self._lock:
            start = next(self._turns) % len(self.base_urls)
            now = time.monotonic()
            down = {url for url, until in self._down_until.items() if until > now}
        turn = self.base_urls[start:] + self.base_urls[:start]
        return [url for url in turn if url not in down] + [url for url in turn if url in down]

    def _mark_down(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = time.monotonic() + self.cooldown

    def close(self) -> None:
        self._http.close()


# Failures where the request got no answer at all, so another replica may safely take it.
UNREACHABLE = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)


def model_api_urls(text: str) -> list[str]:
    """The replicas in `DOPPEL_SERVING_URL` (or `--serving-url`): comma-separated URLs."""
    urls = [url.strip().rstrip("/") for url in text.split(",") if url.strip()]
    for url in urls:
        try:
            valid = httpx.URL(url).scheme in ("http", "https") and bool(httpx.URL(url).host)
        except httpx.InvalidURL:
            valid = False
        if not valid:
            raise DoppelError(
                f"the model API URL {redact(url)!r} is not an http(s) URL",
                "set DOPPEL_SERVING_URL to http://host:port, or several comma-separated",
            )
    if not urls:
        raise DoppelError("no model API URL is set", "set DOPPEL_SERVING_URL=http://host:port")
    return urls


def _completion(response: httpx.Response, url: str, model: str) -> str:
    """The reply in a model API's answer, or the error it stands for."""
    if response.status_code == 404 and _error_type(response) == "model_not_found":
        raise NoProductionAdapter(
            f"{model} has no production adapter yet",
            "train one with '/doppel train'; the gate promotes it when it is good enough",
        )
    if response.status_code == 401:
        raise DoppelError(
            f"the model API at {redact_url(url)} refused our key (or lack of one)", KEY_HINT
        )
    if response.status_code != 200:
        raise DoppelError(
            f"the model API answered {response.status_code} for {model}: {response.text[:300]}",
            "check the model server's log",
        )
    try:
        return response.json()["choices"][0]["message"]["content"].strip()
    except (ValueError, KeyError, IndexError, TypeError):
        raise DoppelError(
            f"the model API's answer for {model} is not a chat completion: {response.text[:300]}",
            "check that DOPPEL_SERVING_URL points at DoppelBot's model API",
        ) from None


def _error_type(response: httpx.Response) -> str | None:
    try:
        error = response.json().get("error")
    except ValueError:
        return None
    return error.get("type") if isinstance(error, dict) else None
