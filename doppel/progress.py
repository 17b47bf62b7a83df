"""Progress display for long jobs, on stderr so that `--json` output stays clean."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(stderr=True, soft_wrap=True)  # errors stay one greppable line


def channel_progress() -> Progress:
    """One bar per channel; the total is unknown until the channel is done."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]#{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.completed:>7} messages"),
        TimeElapsedColumn(),
        console=console,
    )


def channel_reporter(
    progress: Progress, name: str
) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A callback that advances a new channel bar, and one that marks it finished."""
    task = progress.add_task(name, total=None)

    def advance(count: int) -> None:
        progress.advance(task, count)

    def finish() -> None:
        done = progress.tasks[task].completed
        progress.update(task, total=done, completed=done)

    return advance, finish
