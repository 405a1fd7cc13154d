"""One rich progress bar style for every long loop (extraction, training epochs, trials)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)  # progress and messages on stderr keep stdout clean for --json


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else "", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, total: int, unit: str = "img", enabled: bool = True
                 ) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, info="")``; ``info`` shows live numbers such as loss or accuracy."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               _RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, disable=not enabled, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            progress.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance
