"""Secrets and personal data never reach a dataset, MLflow, a generated reply or a live
prompt: planted in a real export, ingested into the real store, built, trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from hypothesis import given, settings
from hypothesis import strategies as st

from doppel.config import get_settings
from doppel.dataset.build import build_dataset
from doppel.dataset.live import thread_prompt
from doppel.dataset.samples import SampleRules
from doppel.dataset.scrub import Scrubber
from doppel.evaluate.run import evaluate_version
from doppel.ingest import ingest_export
from doppel.store.database import Database
from doppel.train.config import load_train_config
from doppel.train.run import train_user
from tests.helpers import TINY, write_export_folder

# Made up, in each kind's real shape (not detect-secrets' documented examples).
AWS_KEY = "AKIAZ7QK4M2XJ5T3W9HB"
SLACK_TOKEN = "xoxb-2718281828-3141592653589-Zq8nRt4WvXy2Lm6Pk0Jd7Hs1"
GITHUB_TOKEN = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
PASSWORD = "Tr0ub4dor-and-3"
EMAIL = "ann.lee@example.org"
PHONE = "(713) 555-0142"
KEY_BODY = "MIIEowIBAAKCAQEAx7PqLm3Zr9Tn2Wv5Kd8Hs4Jf6Gb1Nc0Qp" * 4
PRIVATE_KEY = f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}\n-----END RSA PRIVATE KEY-----"
PLANTED = [AWS_KEY, SLACK_TOKEN, GITHUB_TOKEN, PASSWORD, EMAIL, "555-0142", KEY_BODY[:40]]

TEAM, ANN, BOB = "T1", "U1", "U2"
THREADS = 12
EPOCH = 1_704_103_200  # 2024-01-01 10:00 UTC


def secret_export(root: Path) -> Path:
    """12 threads: Bob asks with secrets in his message, Ann answers with more of them."""
    messages = []
    for i in range(THREADS):
        parent = f"{EPOCH + i * 7200}.000100"
        reply = f"{EPOCH + i * 7200 + 60}.000100"
        question = (
            f"thread {i}: staging is at https://deploy:{PASSWORD}@db.internal.example.com, "
            f"the key is {AWS_KEY}; ask {EMAIL} or call {PHONE}"
        )
        if i == 0:
            question += f"\nand the deploy key:\n{PRIVATE_KEY}"
        answer = (
            f"re {i}: please rotate {SLACK_TOKEN} and {GITHUB_TOKEN} today, never paste "
            f"{AWS_KEY} in a channel again; mail {EMAIL} or call {PHONE} if it breaks"
        )
        messages += [
            {"type": "message", "user": BOB, "ts": parent, "thread_ts": parent, "text": question},
            {"type": "message", "user": ANN, "ts": reply, "thread_ts": parent, "text": answer},
        ]
    return write_export_folder(
        root,
        {"general": {"2024-01-01": messages}},
        channels=[{"id": "C1", "name": "general"}],
        users=[
            {"id": ANN, "team_id": TEAM, "name": "ann"},
            {"id": BOB, "team_id": TEAM, "name": "bob"},
        ],
    )


@pytest.fixture
def dataset_path(db: Database, tmp_path: Path) -> Path:
    ingest_export(db, secret_export(tmp_path / "export"), max_bytes=2**26)
    return build_dataset(get_settings(), ANN).path


def leaked(folder: Path, planted: list[str] = PLANTED) -> list[str]:
    """Each planted value found in the bytes of any file below `folder`, as `path: value`."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            name = path.relative_to(folder).as_posix()
            found += [f"{name}: {value}" for value in planted if value.encode() in data]
    return found


# -- the scrubber itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        (f"key {AWS_KEY}.", "key [AWS_KEY]."),
        ("aws_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYQ3k9Z2m7Pw'", "aws_key = '[AWS_KEY]'"),
        (f"token {SLACK_TOKEN} ok", "token [SLACK_TOKEN] ok"),
        (f"use {GITHUB_TOKEN}", "use [GITHUB_TOKEN]"),
        (
            f"https://deploy:{PASSWORD}@db.example.com/x",
            "https://deploy:[PASSWORD]@db.example.com/x",
        ),
        (f"the key:\n{PRIVATE_KEY}\nthanks", "the key:\n[PRIVATE_KEY]\nthanks"),
        (f"cut off: {PRIVATE_KEY[:90]}", "cut off: [PRIVATE_KEY]"),
        (f"mail {EMAIL}, or ping @ann", "mail [EMAIL], or ping @ann"),
        (f"call {PHONE} or +44 20 7946 0958", "call [PHONE] or [PHONE]"),
        ("glpat-Xy7Zq2Lm9Pk4Rt8Wv1Nb3c", "[GITLAB_TOKEN]"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9P",
            "jwt [JWT]",
        ),
    ],
)
def test_each_kind_becomes_its_placeholder(text: str, scrubbed: str) -> None:
    assert Scrubber()(text) == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "honestly, the deploy is fine :rocket: @bob see https://example.com/docs/a-long-page",
        "shipped v3.11.4 on 2024-01-01 at 10:30, PR #12345, 42 tests",
        "not a token: eyJnotajwt.foo.bar, nor xoxb-, nor https://host/@user",
    ],
)
def test_clean_text_is_left_alone(text: str) -> None:
    scrubber = Scrubber()
    assert scrubber(text) == text and not scrubber.replaced


def test_emails_and_phones_can_be_kept_but_secrets_cannot() -> None:
    scrubber = Scrubber(emails=False, phones=False)
    text = f"{EMAIL} {PHONE} {AWS_KEY}"
    assert scrubber(text) == f"{EMAIL} {PHONE} [AWS_KEY]"
    assert scrubber.replaced == {"aws_key": 1}


@settings(max_examples=80, deadline=None, database=None)
@given(
    before=st.text(max_size=60),
    secret=st.sampled_from([AWS_KEY, SLACK_TOKEN, GITHUB_TOKEN, PRIVATE_KEY, EMAIL]),
    after=st.text(max_size=60),
)
def test_a_planted_secret_never_survives_whatever_surrounds_it(
    before: str, secret: str, after: str
) -> None:
    assert secret not in Scrubber()(f"{before} {secret} {after}")


# -- datasets, training and live prompts --------------------------------------------------


def test_the_dataset_on_disk_holds_placeholders_not_secrets(dataset_path: Path) -> None:
    assert leaked(dataset_path) == []
    stats = json.loads((dataset_path / "stats.json").read_text())
    per_thread = {"aws_key": 2, "email": 2, "phone": 2, "password": 1}
    expected = {kind: n * THREADS for kind, n in per_thread.items()}
    expected |= {"slack_token": THREADS, "github_token": THREADS, "private_key": 1}
    assert stats["scrubbed"] == expected
    assert stats["settings"]["scrub_emails"] and stats["settings"]["scrub_phones"]
    dataset = load_from_disk(str(dataset_path))
    rows = [*dataset["train"], *dataset["validation"]]
    assert len(rows) == THREADS
    for row in rows:
        question, answer = (m["content"] for m in row["messages"][1:])
        assert "[PASSWORD]" in question and "[AWS_KEY]" in question
        assert "[SLACK_TOKEN]" in answer and "[GITHUB_TOKEN]" in answer and "[EMAIL]" in answer


def test_emails_and_phones_stay_when_the_settings_say_so(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOPPEL_DATASET__SCRUB_EMAILS", "false")
    monkeypatch.setenv("DOPPEL_DATASET__SCRUB_PHONES", "false")
    get_settings.cache_clear()
    ingest_export(db, secret_export(tmp_path / "export"), max_bytes=2**26)
    path = build_dataset(get_settings(), ANN).path
    kept = {hit.split(": ", 1)[1] for hit in leaked(path, [EMAIL, PHONE, AWS_KEY])}
    assert kept == {EMAIL, PHONE}


def test_a_context_cut_to_fit_never_keeps_the_tail_of_a_secret(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The turn before a reply is cut from its start when over budget: were it cut before
    scrubbing, the private key's header would go and its body would stay."""
    monkeypatch.setenv("DOPPEL_DATASET__MAX_CONTEXT_CHARS", "100")
    get_settings.cache_clear()
    ingest_export(db, secret_export(tmp_path / "export"), max_bytes=2**26)
    path = build_dataset(get_settings(), ANN).path
    assert leaked(path, [KEY_BODY[-40:], "END RSA PRIVATE KEY"]) == []


def test_a_live_thread_reaches_the_model_scrubbed() -> None:
    messages = [
        {"ts": "1704103200.000100", "user": BOB, "text": f"deploy with {AWS_KEY}, ask {EMAIL}"},
        {"ts": "1704103260.000100", "user": BOB, "text": f"key:\n{PRIVATE_KEY}\n" + "x" * 50},
    ]
    rules = SampleRules(max_context_chars=150)
    chat = thread_prompt(
        "C1", messages, ANN, {BOB: "bob"}, {}, bots=set(), rules=rules, gap_minutes=30
    )
    (prompt,) = chat
    assert "[AWS_KEY]" in prompt["content"] and "[PRIVATE_KEY]" in prompt["content"]
    assert not any(value in prompt["content"] for value in PLANTED)


@pytest.mark.slow
def test_nothing_planted_reaches_mlflow_or_a_generated_reply(settings, dataset_path: Path):
    """Train (one step) and evaluate: every artifact MLflow keeps, the dataset copy and the
    evaluation's replies included, is free of what was planted."""
    config = load_train_config(None, max_steps=1, **TINY)
    trained = train_user(settings, TEAM, ANN, dataset_path, config)
    evaluate_version(settings, TEAM, ANN, trained.version, gate=False)
    home = settings.home.resolve()
    table = json.loads(next((home / "mlartifacts").rglob("replies.json")).read_text())
    contexts = [row[table["columns"].index("context")] for row in table["data"]]
    assert contexts and all("[AWS_KEY]" in context for context in contexts)
    assert leaked(home / "mlartifacts") == []  # the dataset copy, adapter, card, replies
    # Only the message store keeps what people wrote, as they wrote it.
    assert [hit for hit in leaked(home) if not hit.startswith("doppel.db")] == []
