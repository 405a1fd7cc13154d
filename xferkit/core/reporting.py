"""How library code reports progress and notes without printing: a reporter the caller owns.

Library functions take ``reporter=``; the default, :class:`Reporter`, drops everything. The CLI
passes one that draws rich progress bars on stderr. Estimators (heads, trainers) take a plain
``progress(done, total, info)`` callable instead, made by :meth:`Reporter.callback`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: ``progress(done, total, info)``: the callback an estimator's ``fit`` accepts.
ProgressCallback = Callable[[int, int, str], None]


class Task:
    """A running piece of work: ``advance`` by a step, or ``update`` to an absolute position."""

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Record *n* more units done; ``info`` shows live numbers such as loss or accuracy."""

    def update(self, completed: int | None = None, total: int | None = None,
               info: str | None = None) -> None:
        """Set how much is done (and the total, when it becomes known or changes)."""


class Reporter:
    """Receives notes, warnings and progress; this base class ignores them (a silent library)."""

    def note(self, message: str) -> None:
        """Something the user should know before or while the work runs (weights source, split)."""

    def warn(self, message: str) -> None:
        """Something that may make the result worse than expected."""

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "img") -> Iterator[Task]:
        """A task of *total* units (``None``: unknown); yields a :class:`Task` to advance."""
        yield Task()

    @contextmanager
    def callback(self, description: str, unit: str = "step") -> Iterator[ProgressCallback]:
        """A ``progress(done, total, info)`` callable for an estimator's ``fit``, drawn as a task."""
        with self.task(description, None, unit) as task:
            def progress(done: int, total: int, info: str = "") -> None:
                task.update(done, total, info)
            yield progress


#: The default reporter: library calls are silent unless the caller asks otherwise.
SILENT = Reporter()
