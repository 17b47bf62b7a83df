"""All DoppelBot configuration in one typed place.

Values come, lowest priority first, from the defaults below, a YAML file
(`DOPPEL_CONFIG`, default `configs/doppel.yaml` when it exists) and environment
variables. Nested values are overridden with `DOPPEL_<SECTION>__<KEY>`, e.g.
`DOPPEL_DATASET__MIN_CHARS=50`; the well-known names `DOPPEL_HOME`,
`DATABASE_URL`, `SLACK_BOT_TOKEN`, `SLACK_USER_TOKEN` and `SLACK_API_URL` are
read as they are.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from doppel.errors import DoppelError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Section(BaseModel):
    """A config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RateTiers(Section):
    """Requests per minute we allow ourselves per Slack method (all threads together).

    Slack's published tiers are Tier 2 ~20/min and Tier 3 ~50/min; we stay a little under.
    """

    lists_per_minute: float = 18.0  # Tier 2: conversations.list, users.list
    history_per_minute: float = 45.0  # Tier 3: conversations.history, conversations.replies
    join_per_minute: float = 45.0  # Tier 3: conversations.join


class SlackSettings(Section):
    """How we scrape the Slack Web API."""

    include_archived: bool = False
    include_private: bool = False  # private channels, DMs and group DMs
    join_channels: bool = False  # conversations.join public channels the bot is not in
    rates: RateTiers = RateTiers()
    # Apps outside the Slack Marketplace (since 2025) may get 1 request/min and
    # `limit` <= 15 for history and replies. This mode applies exactly that.
    non_marketplace_app: bool = False
    history_page_size: int = Field(200, ge=1, le=999)
    # Each incremental run re-reads this much history before the channel cursor so
    # that threads whose `latest_reply` moved are noticed. 0 turns it off.
    thread_lookback_days: float = Field(7.0, ge=0)
    max_retries: int = Field(5, ge=0)
    timeout_seconds: int = Field(30, ge=1)

    def history_rate(self) -> float:
        return 1.0 if self.non_marketplace_app else self.rates.history_per_minute

    def page_size(self) -> int:
        return (
            min(self.history_page_size, 15) if self.non_marketplace_app else self.history_page_size
        )


class ExportSettings(Section):
    """Limits that protect us from hostile or broken export files."""

    max_unzipped_mb: int = Field(2048, ge=1)


class DatasetSettings(Section):
    """How conversations become chat samples."""

    min_chars: int = Field(100, ge=1)
    gap_minutes: float = Field(30.0, gt=0)
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    max_context_chars: int = Field(3000, ge=100)
    max_context_turns: int = Field(12, ge=1)
    system_prompt: str = (
        "You are {name}, a member of the {workspace} Slack workspace. "
        "Reply to the conversation the way {name} would."
    )


class PipelineSettings(Section):
    """The nightly retraining: who is retrained, and how many trainings run at once."""

    min_new_samples: int = Field(20, ge=0)  # retrain a person only after this many new samples
    training_slots: int = Field(1, ge=1)  # Prefect concurrency limit "doppel-training"


def _yaml_path() -> Path | None:
    explicit = os.environ.get("DOPPEL_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise DoppelError(f"DOPPEL_CONFIG={explicit} does not exist", "point it at a YAML file")
        return path
    default = REPO_CONFIGS / "doppel.yaml"
    return default if default.is_file() else None


class Settings(BaseSettings):
    """The resolved configuration of one DoppelBot process."""

    model_config = SettingsConfigDict(
        env_prefix="DOPPEL_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    home: Path = Field(Path(".doppel"), validation_alias="DOPPEL_HOME")
    database_url: str | None = Field(None, validation_alias="DATABASE_URL")
    slack_api_url: str = Field("https://slack.com/api/", validation_alias="SLACK_API_URL")
    slack_bot_token: str | None = Field(None, validation_alias="SLACK_BOT_TOKEN")
    slack_user_token: str | None = Field(None, validation_alias="SLACK_USER_TOKEN")
    # Read once here: MLflow itself rewrites MLFLOW_TRACKING_URI in os.environ once in use.
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    model_cache: Path | None = None  # converted base models; default DOPPEL_HOME/models
    slack: SlackSettings = SlackSettings()
    export: ExportSettings = ExportSettings()
    dataset: DatasetSettings = DatasetSettings()
    pipeline: PipelineSettings = PipelineSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_path = _yaml_path()
        if yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)

    @property
    def db_url(self) -> str:
        """`DATABASE_URL`, or a SQLite file under `DOPPEL_HOME`."""
        return self.database_url or f"sqlite:///{self.home.resolve() / 'doppel.db'}"

    @property
    def models_dir(self) -> Path:
        return (self.model_cache or self.home / "models").resolve()

    def dataset_dir(self, workspace_id: str, user_id: str) -> Path:
        """Where a user's dataset lives unless `--out` says otherwise."""
        return self.home / "datasets" / workspace_id / user_id


def explain(error: ValidationError, root: type[BaseModel], source: str) -> DoppelError:
    """Turn pydantic's error into one that names the bad key and lists the valid ones."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            section = _section_for(root, item["loc"][:-1])
            valid = ", ".join(sorted(section.model_fields)) if section else "?"
            lines.append(f"unknown config key '{loc}'; valid keys here: {valid}")
        else:
            lines.append(f"{loc}: {item['msg']}")
    return DoppelError(f"invalid {source}: " + "; ".join(lines), "fix the key or value")


def _section_for(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    model = root
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return None
        if not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def load_settings(**overrides: object) -> Settings:
    """Build settings from defaults, YAML, environment and explicit overrides."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise explain(error, Settings, "configuration") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
