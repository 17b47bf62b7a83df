"""All DoppelBot configuration in one typed place.

Values come, lowest priority first, from the defaults below, a YAML file
(`DOPPEL_CONFIG`, default `configs/doppel.yaml` when it exists) and environment
variables. Nested values are overridden with `DOPPEL_<SECTION>__<KEY>`, e.g.
`DOPPEL_DATASET__MIN_CHARS=50`; the well-known names `DOPPEL_HOME`,
`DATABASE_URL`, `SLACK_BOT_TOKEN`, `SLACK_USER_TOKEN`, `SLACK_API_URL`,
`SLACK_SIGNING_SECRET`, `SLACK_CLIENT_ID`, `SLACK_CLIENT_SECRET`, `DOPPEL_SECRET_KEY`,
`DOPPEL_SERVING_URL` and `PREFECT_API_URL` are read as they are.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
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
    max_file_mb: int = Field(256, ge=1)  # any one JSON file of the export
    max_compression_ratio: float = Field(100.0, ge=1)  # a ZIP member's unpacked/packed size
    max_json_depth: int = Field(64, ge=2)  # nesting of objects and lists in one file


class DatasetSettings(Section):
    """How conversations become chat samples."""

    min_chars: int = Field(100, ge=1)
    gap_minutes: float = Field(30.0, gt=0)
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    max_context_chars: int = Field(3000, ge=100)
    max_context_turns: int = Field(12, ge=1)
    # Secrets (keys, tokens, passwords in URLs) are always replaced by placeholders, in
    # datasets and live prompts; emails and phone numbers too, unless turned off here.
    scrub_emails: bool = True
    scrub_phones: bool = True
    phone_region: str = Field("US", pattern="^[A-Z]{2}$")  # for numbers without a +country code
    system_prompt: str = (
        "You are {name}, a member of the {workspace} Slack workspace. "
        "Reply to the conversation the way {name} would."
    )


class PipelineSettings(Section):
    """The nightly retraining: who is retrained, and how many trainings run at once."""

    min_new_samples: int = Field(20, ge=0)  # retrain a person only after this many new samples
    training_slots: int = Field(1, ge=1)  # Prefect concurrency limit "doppel-training"


class EvaluateSettings(Section):
    """How a candidate adapter is scored before the gate."""

    # The precision the base model is scored in. "serve": what the model API computes in
    # (on CUDA: bfloat16, float16 before Ampere; on CPU: bfloat16 with vLLM, float32 with
    # transformers), so the gate scores the model that is served. "nf4": the 4-bit base
    # QLoRA trained on.
    precision: Literal["serve", "bfloat16", "float16", "float32", "nf4"] = "serve"


class SlackAppSettings(Section):
    """The Slack app: installation, how it answers, and each workspace's default limits."""

    # OAuth (many workspaces): where Slack's consent screen is, and where it sends people back.
    authorization_url: str = "https://slack.com/oauth/v2/authorize"
    redirect_uri: str | None = None  # https://<your host>/slack/oauth_redirect
    scopes: list[str] = [
        "app_mentions:read",
        "channels:history",
        "channels:read",
        "chat:write",
        "chat:write.customize",
        "commands",
        "groups:history",
        "users:read",
    ]
    admins: list[str] = []  # user ids that may train others, beside Slack's admins and owners
    history_messages: int = Field(30, ge=1, le=200)  # context when a mention is not in a thread
    max_tokens: int = Field(200, ge=1)  # longest reply asked of the model API
    reply_timeout_seconds: float = Field(120.0, gt=0)
    # Trainings started with `/doppel train` (without a Prefect server): recipe and step cap.
    train_config: Path | None = None
    train_max_steps: int | None = Field(None, ge=1)
    deployment: str = "user-pipeline/train-user"  # run when PREFECT_API_URL is set
    # Defaults for every workspace; `doppel limits` overrides them per workspace.
    max_enrolled: int = Field(50, ge=0)  # people who may opt in
    trainings_per_day: int = Field(10, ge=0)  # `/doppel train` requests per 24 hours
    # Bounds under load: threads answering mentions and running /doppel, kept apart so one
    # cannot starve the other, and how much work may wait for them before "busy".
    mention_workers: int = Field(4, ge=1)
    command_workers: int = Field(2, ge=1)
    max_waiting: int = Field(16, ge=0)  # per pool; beyond this the requester is told "busy"
    # Mentions answered per sliding minute, in each replica's memory (not shared).
    mentions_per_user_per_minute: int = Field(5, ge=1)
    mentions_per_channel_per_minute: int = Field(20, ge=1)
    max_reply_chars: int = Field(3000, ge=100, le=3000)  # Slack's limit for a section block
    max_request_bytes: int = Field(65_536, ge=1024)  # `doppel slack-app`: bodies beyond get 413
    # The key sent to the model API as "Bearer <key>"; default: the first of serve.api_keys.
    model_api_key: SecretStr | None = None


class ServeSettings(Section):
    """The model API: which engine, how adapters are cached, and the limits that keep it up."""

    engine: str = Field("auto", pattern="^(auto|vllm|transformers)$")  # auto: vLLM if installed
    base_model: str = "smollm2-135m-instruct"  # adapters trained on another base are not served
    refresh_seconds: float = Field(30.0, gt=0)  # how often the `production` aliases are re-read
    # Adapters are downloaded on first use; after each refresh, up to `prefetch` production
    # adapters not on disk yet are fetched in the background, into free cache space only.
    prefetch: int = Field(32, ge=0)
    max_cache_gb: float = Field(20.0, gt=0)  # adapters on disk (10^9 bytes); LRU out, not in use
    keep_superseded_minutes: float = Field(60.0, ge=0)  # a version out of production, unasked
    # Who consents is re-read from the database at most this old: a revoke stops serving within.
    consent_cache_seconds: float = Field(1.0, ge=0, le=2)
    max_loaded_adapters: int = Field(16, ge=1)  # transformers: adapters in memory, LRU out
    max_gpu_loras: int = Field(4, ge=1)  # vLLM: distinct adapters in one batch
    max_lora_rank: int = Field(16, ge=1)  # vLLM: the largest adapter rank served
    # vLLM: host memory for adapters kept loaded (max_cpu_loras); None: a quarter of the
    # memory available at start.
    adapter_memory_gib: float | None = Field(None, gt=0)
    max_model_len: int = Field(2048, ge=64)
    max_prompt_tokens: int = Field(1536, ge=16)  # older turns dropped beyond this, as in training
    max_tokens_limit: int = Field(512, ge=1)  # the most a request may ask `max_tokens` for
    default_max_tokens: int = Field(128, ge=1)
    max_messages: int = Field(64, ge=1)
    max_message_chars: int = Field(8000, ge=1)
    max_request_bytes: int = Field(256_000, ge=1024)
    max_batch_size: int = Field(8, ge=1)  # transformers engine: requests decoded together
    max_inflight: int = Field(16, ge=1)  # beyond this, 429 with Retry-After
    request_timeout_seconds: float = Field(120.0, gt=0)
    kv_cache_gib: float = Field(1.0, gt=0)  # vLLM on CPU: VLLM_CPU_KVCACHE_SPACE
    enforce_eager: bool | None = None  # vLLM: None = eager on CPU, CUDA graphs on GPU
    # /admin/* and non-production versions need "Bearer <token>"; unset, they answer 403.
    admin_token: SecretStr | None = None
    # Clients send "Bearer <key>"; with any set, every route but /healthz and /slack/* needs
    # one. A YAML list, or comma-separated in DOPPEL_SERVE__API_KEYS (not JSON).
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    docs: bool = False  # serve /docs, /redoc and /openapi.json (behind the keys when set)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """The environment gives one string: split it on commas, blanks dropped."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value


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
    # The Slack app: one workspace with SLACK_BOT_TOKEN, or OAuth with the client id and secret.
    slack_signing_secret: str | None = Field(None, validation_alias="SLACK_SIGNING_SECRET")
    slack_client_id: str | None = Field(None, validation_alias="SLACK_CLIENT_ID")
    slack_client_secret: str | None = Field(None, validation_alias="SLACK_CLIENT_SECRET")
    secret_key: str | None = Field(None, validation_alias="DOPPEL_SECRET_KEY")  # Fernet key(s)
    # The model API `doppel slack-app` calls: one URL, or several replicas comma-separated,
    # taken in turn, an unreachable one skipped (serving/slack/model_client.py).
    serving_url: str = Field("http://127.0.0.1:8000", validation_alias="DOPPEL_SERVING_URL")
    prefect_api_url: str | None = Field(None, validation_alias="PREFECT_API_URL")
    # Read once here: MLflow itself rewrites MLFLOW_TRACKING_URI in os.environ once in use.
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    model_cache: Path | None = None  # converted base models; default DOPPEL_HOME/models
    slack: SlackSettings = SlackSettings()
    export: ExportSettings = ExportSettings()
    dataset: DatasetSettings = DatasetSettings()
    pipeline: PipelineSettings = PipelineSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    serve: ServeSettings = ServeSettings()
    slack_app: SlackAppSettings = SlackAppSettings()

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

    def run_dir(self, workspace_id: str, user_id: str, digest: str | None = None) -> Path:
        """A person's training runs; `digest` (data + recipe) names one resumable run."""
        runs = self.home.resolve() / "runs" / workspace_id / user_id
        return runs / digest if digest else runs


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


def load_settings(**overrides: Any) -> Settings:
    """Build settings from defaults, YAML, environment and explicit overrides."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise explain(error, Settings, "configuration") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
