"""What the Slack handlers share: settings, the database, the model, the trainer and the
mention limits."""

from __future__ import annotations

from dataclasses import dataclass

from doppel.config import Settings
from doppel.store.database import Database
from serving.slack.model_client import ChatModel
from serving.slack.ratelimit import MentionLimiter
from serving.slack.training import Trainer


@dataclass
class Services:
    settings: Settings
    db: Database
    model: ChatModel
    trainer: Trainer
    limiter: MentionLimiter
