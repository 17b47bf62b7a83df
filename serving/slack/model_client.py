"""The Slack app's view of the model API: one persona's reply to a chat.

The model API speaks OpenAI's `POST /v1/chat/completions`, with `model` set to
"<workspace_id>/<user_id>". It answers 404 with `{"error": {"type": "model_not_found"}}` when
the person has no production adapter, and it adds the persona's own system prompt when
the chat does not open with one.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from doppel.config import Settings
from doppel.errors import DoppelError
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
    """The model API over HTTP (`DOPPEL_SERVING_URL`), with timeouts and clear errors."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 120.0,
        max_tokens: int = 200,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_tokens = max_tokens
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

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
        try:
            response = self._http.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as error:
            raise DoppelError(
                f"the model API at {self.base_url} did not answer: {error!r}",
                "start it ('doppel serve') or fix DOPPEL_SERVING_URL",
            ) from None
        if response.status_code == 404 and _error_type(response) == "model_not_found":
            raise NoProductionAdapter(
                f"{model} has no production adapter yet",
                "train one with '/doppel train'; the gate promotes it when it is good enough",
            )
        if response.status_code == 401:
            raise DoppelError(
                f"the model API at {self.base_url} refused our key (or lack of one)", KEY_HINT
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
                f"the model API's answer for {model} is not a chat completion: "
                f"{response.text[:300]}",
                "check that DOPPEL_SERVING_URL points at DoppelBot's model API",
            ) from None

    def close(self) -> None:
        self._http.close()


def _error_type(response: httpx.Response) -> str | None:
    try:
        error = response.json().get("error")
    except ValueError:
        return None
    return error.get("type") if isinstance(error, dict) else None
