"""Progress display for long jobs, on stderr so that `--json` output stays clean."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
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


def counting_bar(description: str, total: int | None = None) -> Progress:
    """A plain bar for steps with a known number of items."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    progress.add_task(description, total=total)
    return progress


def channel_reporter(progress: Progress, name: str) -> tuple[Callable[[int], None], Callable]:
    """A callback that advances a new channel bar, and one that marks it finished."""
    task = progress.add_task(name, total=None)

    def advance(count: int) -> None:
        progress.advance(task, count)

    def finish() -> None:
        done = progress.tasks[task].completed
        progress.update(task, total=max(done, 1), completed=max(done, 1))

    return advance, finish
