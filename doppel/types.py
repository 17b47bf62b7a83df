"""The two shapes that cross every layer: a chat message and a raw Slack object.

`ChatMessage` is what training samples, prompts and the model API's requests are made
of; pydantic validates it at the API. `SlackDict` is a message, user or channel exactly
as Slack's Web API or an export gives it, before the store makes it typed.
"""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import TypedDict  # pydantic validates only this one on Python < 3.12

Role = Literal["system", "user", "assistant"]


class ChatMessage(TypedDict):
    role: Role
    content: str


SlackDict = dict[str, Any]
