"""The Slack app: Bolt handlers for mentions and `/doppel`, mounted in FastAPI.

`mount_slack(app, settings, model)` adds it to the model server's FastAPI app;
`standalone_app(settings, serving_url)` runs it alone (`doppel slack-app`).
"""

from serving.slack.app import SlackApp, mount_slack, standalone_app

__all__ = ["SlackApp", "mount_slack", "standalone_app"]
