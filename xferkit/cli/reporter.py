"""The CLI's reporter: notes and warnings on stderr, rich progress bars (plain lines when not a terminal)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from xferkit.core.reporting import Reporter, Task

#: stderr: progress and messages never mix with stdout, which --json keeps for one document.
console = Console(stderr=True)
#: Without a terminal, a long task prints a line at most this often (seconds).
PLAIN_EVERY = 30.0


class _RateColumn(ProgressColumn):
    """Items per second, only while the total is known and something has been done."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed and task.total else "", style="progress.data.speed")


class _RichTask(Task):
    def __init__(self, progress: Progress, task_id):
        self.progress, self.id = progress, task_id

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.progress.update(self.id, advance=n, **({"info": escape(info)} if info is not None else {}))

    def update(self, completed=None, total=None, info=None) -> None:
        fields = {"completed": completed, "total": total, "info": escape(info) if info is not None else None}
        self.progress.update(self.id, **{k: v for k, v in fields.items() if v is not None})


class _PlainTask(Task):
    """Progress as a few plain lines (a log file or a CI job has no use for a redrawn bar)."""

    def __init__(self, console: Console, description: str, total: int | None, unit: str):
        self.console, self.description, self.total, self.unit = console, description, total, unit
        self.done, self.info, self.start, self.printed = 0, "", time.perf_counter(), time.perf_counter()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.update(self.done + n, None, info)

    def update(self, completed=None, total=None, info=None) -> None:
        self.done = self.done if completed is None else completed
        self.total = self.total if total is None else total
        self.info = self.info if info is None else info
        if time.perf_counter() - self.printed >= PLAIN_EVERY:
            self.printed = time.perf_counter()
            self.console.print(self.line(), markup=False, highlight=False)

    def line(self) -> str:
        seconds = time.perf_counter() - self.start
        of = f"/{self.total}" if self.total else ""
        rate = f", {self.done / seconds:.1f} {self.unit}/s" if self.total and self.done and seconds else ""
        return f"{self.description}: {self.done}{of} {self.unit} in {seconds:.1f}s{rate}" + (
            f" ({self.info})" if self.info else "")


class RichReporter(Reporter):
    """Draws the library's notes, warnings and tasks on *console* (stderr)."""

    def __init__(self, console: Console = console):
        self.console = console
        self._live: Progress | None = None

    def note(self, message: str) -> None:
        self.console.print(escape(message), highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "img") -> Iterator[Task]:
        if not self.console.is_terminal:
            task = _PlainTask(self.console, description, total, unit)
            yield task
            self.console.print(task.line(), markup=False, highlight=False)
            return
        if self._live is not None:  # a task inside a task: one more line in the same display
            task_id = self._live.add_task(escape(description), total=total, info="")
            yield _RichTask(self._live, task_id)
            return
        columns = [SpinnerColumn(finished_text=" "), TextColumn("[bold]{task.description}"), BarColumn(),
                   MofNCompleteColumn(), _RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=self.console, transient=False) as progress:
            self._live = progress
            try:
                yield _RichTask(progress, progress.add_task(escape(description), total=total, info=""))
            finally:
                self._live = None
