"""Progress bars on long work: one look for every command and library stage."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdrt_cli import distributed


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "examples", completed: int = 0) -> Iterator[Any]:
    """A Rich progress bar with rate and ETA on rank 0; a silent stand-in on other ranks.
    ``completed`` starts a resumed run's bar where it stopped."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not distributed.is_main(),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed, rate="")

        class Bar:
            def advance(self, n: int = 1) -> None:
                progress.advance(task, n)
                speed = progress.tasks[0].speed
                if speed:
                    progress.update(task, rate=f"{speed:.2f} {unit}/s")

        yield Bar()
