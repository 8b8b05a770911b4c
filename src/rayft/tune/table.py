"""The console view of a sweep: a live table of trials, a row added as each trial ends (a Tune
callback, run in the driver), and the table of all trials at the end."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from rayft.console import LOG_DIR
from rayft.train.runner import FINISHED_MARKER

RESULT_COLUMNS = ("eval_loss", "steps", "seconds")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def trials_table(title: str, keys: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for column in ["trial", "status", *keys, *RESULT_COLUMNS]:
        table.add_column(column, justify="left" if column in ("trial", "status") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


class _Display:
    """Where rows go: a rich Live on a terminal, else a line each (logs, CI). Module-level because
    Tune pickles its callbacks with the experiment state and, on --resume, runs the unpickled ones."""

    console = None
    live = None


class TrialTable(Callback):
    def __init__(self, space, base, planned: int, trials_dir: str):
        self.space, self.base, self.keys = space, base, space.keys
        self.planned, self.trials_dir = planned, trials_dir
        self.rows: list[list[str]] = []

    def render(self):
        return trials_table(f"trials ended: {len(self.rows)} of {self.planned}", self.keys, self.rows)

    @contextlib.contextmanager
    def live(self, console):
        _Display.console = console
        try:
            if console.is_terminal:
                from rich.live import Live

                with Live(self.render(), console=console, refresh_per_second=2, transient=True) as live:
                    _Display.live = live
                    yield
            else:
                yield
        finally:
            _Display.console = _Display.live = None

    def _add(self, trial, status: str) -> None:
        result = trial.last_result or {}
        if status != "error" and (Path(self.trials_dir) / trial.trial_id / FINISHED_MARKER).is_file():
            status = "completed"
        params = self.space.resolve(trial.config, self.base) if trial.config else {}
        row = [trial.trial_id, status, *[_fmt(params.get(k)) for k in self.keys],
               _fmt(result.get("eval_loss")), _fmt(result.get("step")), _fmt(result.get("time_total_s"))]
        self.rows.append(row)
        if _Display.live is not None:
            _Display.live.update(self.render())
        elif _Display.console is not None:
            cells = zip(["trial", "status", *self.keys, *RESULT_COLUMNS], row)
            _Display.console.print(f"trial ended ({len(self.rows)}/{self.planned}): " +
                                   "  ".join(f"{c}={v}" for c, v in cells), soft_wrap=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._add(trial, "stopped_early")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add(trial, "error")
        if _Display.console is not None:
            _Display.console.print(failure_line(trial, Path(self.trials_dir) / trial.trial_id), markup=False,
                                   highlight=False, soft_wrap=True)


def failure_line(trial, trial_dir: Path) -> str:
    """A failed trial as one line: its exception and where its logs (with the traceback) are."""
    import cloudpickle

    try:  # Tune pickles the error into the trial's local folder before it calls back
        with open(trial.pickled_error_file, "rb") as pickled:
            error = cloudpickle.load(pickled)
    except Exception:  # no error file (a lost actor): the logs still say it all
        error = None
    from rayft.errors import TrainingFailed, one_line

    error = getattr(error, "cause", None) or error  # a RayTaskError wraps the trial's own exception
    message = f": {one_line(error)}" if error else ""
    where = "" if isinstance(error, TrainingFailed) else f"; logs in {trial_dir / LOG_DIR}/"  # it names its log
    return f"error: trial {trial.trial_id} failed{message}{where}"


def print_summary(console, keys: list[str], rows: list[dict[str, Any]], best: Optional[dict[str, Any]]) -> None:
    cells = [[r["trial_id"] + (" *" if best and r["trial_id"] == best["trial_id"] else ""), r["status"],
              *[_fmt(r[k]) for k in keys], _fmt(r["final_eval_loss"]), _fmt(r["steps"]), _fmt(r["wall_seconds"])]
             for r in rows]
    console.print(trials_table("sweep trials (* best)", keys, cells))
