"""Serving side of DoppelBot: the Slack-facing apps."""
