"""A rich progress bar showing loss, accuracy and tokens per second (a no-op when disabled)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressBar:
    """``update(step, metrics=None)``, ``note(text)``, ``close()``; silent when ``enabled`` is False."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        if not enabled:
            return
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, metrics: dict | None = None) -> None:
        if not self.enabled:
            return
        kw = {}
        if metrics:
            kw["info"] = (f"loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.3f}  "
                          f"{metrics['tokens_per_s']:.0f} tok/s")
        self.progress.update(self.task, completed=step, **kw)

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
