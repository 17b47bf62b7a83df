"""DoppelBot: learn how a person writes on Slack and answer in their voice."""

__version__ = "0.1.0"
