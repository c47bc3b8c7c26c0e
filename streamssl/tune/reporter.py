"""Tune's console for sweeps and studies: the trial table when it changes, one line per trial event.

Tune's own reporter (``RunConfig(verbose=1)``) prints the trial table every 30 s whether anything
happened or not, a table of each trial's configuration when it starts, and a table of all ~60
numbers of its last result when it ends: hundreds of lines for a sweep of a few trials. In a
quiet console session (:mod:`streamssl.console`) sweeps and studies use :class:`TrialTable`
instead, which prints

* Tune's experiment header once;
* the trial table (the sweep's metric, the SSL loss, kNN and linear accuracy as columns) when
  the trials' statuses change, once the change has settled, every 10 minutes when nothing
  changes, and at the end with the errored trials' error files;
* one line when a trial starts (its parameters), one per finished segment (the numbers of
  ``progress_metrics``) and one when it ends.

A trial's error is printed by Tune itself (its traceback, then the error file), once.
"""

from __future__ import annotations

import time
from typing import Any

from streamssl import console

try:  # the reporter base class of Ray Tune's console ("new output engine", Ray >= 2.5)
    from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter
except ImportError:  # pragma: no cover (an older or newer Ray: Tune's own reporter then)
    TuneTerminalReporter = None  # type: ignore[assignment,misc]

QUIET_TABLE_EVERY_S = 600.0  # the table even when nothing changed, so a long segment is no mystery
SETTLE_S = 5.0  # statuses unchanged this long before the table is printed


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if TuneTerminalReporter is not None:

    class TrialTable(TuneTerminalReporter):
        """Tune's trial table when the trials' statuses change; one line per trial event."""

        def __init__(self, *, metric: str | None, mode: str | None, param_space: dict[str, Any],
                     progress_metrics: list[str]) -> None:
            super().__init__(AirVerbosity.DEFAULT, metric=metric, mode=mode, config=param_space,
                             progress_metrics=progress_metrics)
            self._inferred_metric = [k for k in progress_metrics if not k.startswith("time/")][:4]  # table columns
            self._seen: list[tuple[str, str]] | None = None  # trial statuses at the last call
            self._seen_since = 0.0
            self._shown: list[tuple[str, str]] | None = None  # ... in the last table printed
            self._last_heartbeat_time = time.time()  # the first table: once the trials' start settled

        def print_heartbeat(self, trials: list[Any], *sys_args: Any, force: bool = False) -> None:
            now, state = time.time(), sorted((t.trial_id, t.status) for t in trials)
            if state != self._seen:
                self._seen, self._seen_since = state, now
            if force:  # the end: the table once more if it changed, or to list errored trials
                show = state != self._shown or any(t.error_file for t in trials)
            else:  # a change that has settled (one trial ends, the next starts), or a long quiet spell
                show = ((state != self._shown and now - self._seen_since >= SETTLE_S)
                        or now - self._last_heartbeat_time >= QUIET_TABLE_EVERY_S)
            if show:
                self._shown = state
                self._print_heartbeat(trials, *sys_args, force=force)
                self._last_heartbeat_time = now

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in (trial.config or {}).items())
            self._start_block(f"trial_{trial}_start")
            print(f"Trial {trial} started: {params}")

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            numbers = ", ".join(f"{k}={_fmt(result[k])}" for k in self._progress_metrics if k in result)
            self._start_block(f"trial_{trial}_result")
            print(f"Trial {trial}: {result.get('training_iteration')} segment(s) done: {numbers}")

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            done = (trial.last_result or {}).get("training_iteration", 0)
            self._start_block(f"trial_{trial}_complete")
            print(f"Trial {trial} ended after {done} segment(s)")

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            pass  # Tune's own reporter prints errors, at every verbosity

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            pass

else:  # pragma: no cover
    TrialTable = None  # type: ignore[assignment,misc]


def tune_console(param_space: dict[str, Any], progress_metrics: list[str], metric: str | None = None,
                 mode: str | None = None) -> dict[str, Any]:
    """``tune.RunConfig`` arguments for the console of the current session.

    Quiet session: Tune's reporter is silenced (it still prints trial errors) and a
    :class:`TrialTable` prints the rest. ``-v``: Tune's reporter at its most verbose (every
    result). Outside a session: Ray's defaults.
    """
    if not console.quiet() or TrialTable is None:
        return {"verbose": console.tune_verbosity()}
    return {"verbose": 0, "callbacks": [TrialTable(metric=metric, mode=mode, param_space=param_space,
                                                    progress_metrics=progress_metrics)]}
