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
  ``progress_metrics``) and one when it ends;
* while a trial trains a segment, its progress in compact form every ``STREAMSSL_PROGRESS_EVERY``
  seconds (default 30): ``Trial X: seg 2/5 step 140/400, 812 img/s, loss 6.123, ETA 05:12``. The
  trial's :class:`TrialProgress` callback sends it over a :class:`ProgressBoard` (a Ray queue),
  since a trial's own output stays in the logs.

A trial's error is printed by Tune itself (its traceback, then the error file), once.
"""

from __future__ import annotations

import time
from typing import Any

from streamssl import console
from streamssl.train.callbacks import SegmentResult, StreamCallback, StreamContext
from streamssl.train.progress import SegmentProgress, progress_every_s

try:  # the reporter base class of Ray Tune's console ("new output engine", Ray >= 2.5)
    from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter
except ImportError:  # pragma: no cover (an older or newer Ray: Tune's own reporter then)
    TuneTerminalReporter = None  # type: ignore[assignment,misc]

QUIET_TABLE_EVERY_S = 600.0  # the table even when nothing changed, so a long segment is no mystery
SETTLE_S = 5.0  # statuses unchanged this long before the table is printed


# A trial sends its progress at most this often (a queue-actor call each time).
TRIAL_PROGRESS_SEND_EVERY_S = 5.0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressBoard:
    """Where trials post their in-segment progress and the driver's trial table reads it.

    ``every_s`` (default :func:`progress_every_s` of the driver) travels with the board to the
    trials, which post at most every ``min(every_s, TRIAL_PROGRESS_SEND_EVERY_S)`` seconds.
    """

    def __init__(self, every_s: float | None = None) -> None:
        from ray.util.queue import Queue

        self.every_s = progress_every_s() if every_s is None else every_s
        self._queue = Queue(actor_options={"num_cpus": 0})
        self._closed = False

    def post(self, trial_id: str, line: str) -> None:
        try:
            self._queue.put({"trial_id": trial_id, "line": line}, block=False)
        except Exception:  # noqa: BLE001 (progress must never stop a trial; the board may be gone)
            pass

    def latest(self) -> dict[str, str]:
        """The newest line of each trial that posted since the last call (none once the board is
        closed: a restored sweep's trial table still holds the board of the run before)."""
        from queue import Empty

        out: dict[str, str] = {}
        while not self._closed:
            try:
                msg = self._queue.get_nowait()
            except Empty:
                break
            except Exception:  # noqa: BLE001 (the queue actor is gone: ask no more)
                self._closed = True
                break
            out[msg["trial_id"]] = msg["line"]
        return out

    def close(self) -> None:
        self._closed = True
        self._queue.shutdown()


def progress_board() -> ProgressBoard | None:
    """A board when the console shows the trial table (a quiet session); else None."""
    return ProgressBoard() if console.quiet() and TrialTable is not None else None


class TrialProgress(StreamCallback):
    """A trial's stream callback: posts the current segment's progress to the board."""

    def __init__(self, board: ProgressBoard, trial_id: str, clock: Any = time.monotonic) -> None:
        self.board, self.trial_id, self._clock = board, trial_id, clock
        self.segment: SegmentProgress | None = None
        self._sent = 0.0

    def on_segment_start(self, ctx: StreamContext, segment: int) -> None:
        self.segment = SegmentProgress.of(ctx, segment)
        self._sent = self._clock()

    def on_train_steps(self, ctx: StreamContext, segment: int, records: list[dict[str, Any]]) -> None:
        if self.segment is None or self.segment.segment != segment:
            return
        self.segment.update(records)
        now = self._clock()
        if now - self._sent >= min(self.board.every_s, TRIAL_PROGRESS_SEND_EVERY_S):
            self._sent = now
            self.board.post(self.trial_id, self.segment.compact())

    def on_segment_end(self, ctx: StreamContext, result: SegmentResult) -> None:
        self.segment = None


if TuneTerminalReporter is not None:

    class TrialTable(TuneTerminalReporter):
        """Tune's trial table when the trials' statuses change; one line per trial event."""

        def __init__(self, *, metric: str | None, mode: str | None, param_space: dict[str, Any],
                     progress_metrics: list[str], board: ProgressBoard | None = None,
                     every_s: float | None = None) -> None:
            super().__init__(AirVerbosity.DEFAULT, metric=metric, mode=mode, config=param_space,
                             progress_metrics=progress_metrics)
            self._inferred_metric = [k for k in progress_metrics if not k.startswith("time/")][:4]  # table columns
            self._seen: list[tuple[str, str]] | None = None  # trial statuses at the last call
            self._seen_since = 0.0
            self._shown: list[tuple[str, str]] | None = None  # ... in the last table printed
            self._last_heartbeat_time = time.time()  # the first table: once the trials' start settled
            self.board = board
            self.every_s = progress_every_s() if every_s is None else every_s
            self._progress: dict[str, str] = {}  # trial id -> its newest progress line, not yet printed
            self._progress_at: dict[str, float] = {}  # trial id -> when its last line was printed

        def __getstate__(self) -> dict[str, Any]:
            """Tune pickles its callbacks into the experiment state; the board's queue actor dies with
            this process, and a restore in a new one could not unpickle its handle: leave it out."""
            state = self.__dict__.copy()
            state["board"] = None
            return state

        def print_progress(self, trials: list[Any], now: float) -> None:
            """Each running trial's newest in-segment progress, at most every ``every_s`` seconds."""
            if self.board is not None:
                self._progress.update(self.board.latest())
            for trial in trials:
                line = self._progress.get(trial.trial_id)
                if line is None or trial.status != "RUNNING":
                    continue
                if now - self._progress_at.get(trial.trial_id, 0.0) >= self.every_s:
                    self._progress_at[trial.trial_id] = now
                    del self._progress[trial.trial_id]
                    self._start_block(f"trial_{trial}_progress")
                    print(f"Trial {trial}: {line}")

        def print_heartbeat(self, trials: list[Any], *sys_args: Any, force: bool = False) -> None:
            now, state = time.time(), sorted((t.trial_id, t.status) for t in trials)
            self.print_progress(trials, now)
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
            numbers = ", ".join(f"{k}={_fmt(result[k])}" for k in self._progress_metrics
                                if k in result and k != "segment")
            self._start_block(f"trial_{trial}_result")
            # "segment" (0-based), not Tune's report count: a restored trial that only reads its
            # finished stream back reports once, for its last segment
            print(f"Trial {trial}: segment {result.get('segment', '?')} done: {numbers}")

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            last = (trial.last_result or {}).get("segment")
            self._start_block(f"trial_{trial}_complete")
            print(f"Trial {trial} ended" + (f" after segment {last}" if last is not None else " before its first segment"))

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            pass  # Tune's own reporter prints errors, at every verbosity

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            pass

else:  # pragma: no cover
    TrialTable = None  # type: ignore[assignment,misc]


def _tolerate_unset_start_time() -> None:
    """Keep Tune's own reporter from crashing the experiment on a trial error.

    Tune hands its start time to the *first* reporter among the callbacks only (``tune.run``); with
    :class:`TrialTable` first, Tune's own reporter (still installed, for trial errors) keeps the
    ``None`` its ``setup`` got, and on the first trial error or retry it raises ``TypeError`` in
    ``_get_time_str``, which ends the whole sweep or study instead of retrying the trial. Its
    elapsed-time string then counts from the error instead (docs/stack-notes.md).
    """
    from ray.tune.experimental import output

    get_time_str = output._get_time_str
    if getattr(get_time_str, "tolerates_unset_start", False):
        return

    def tolerant(start_time: float | None, current_time: float) -> tuple[str, str]:
        return get_time_str(current_time if start_time is None else start_time, current_time)

    tolerant.tolerates_unset_start = True  # type: ignore[attr-defined]
    output._get_time_str = tolerant


def tune_console(param_space: dict[str, Any], progress_metrics: list[str], metric: str | None = None,
                 mode: str | None = None, board: ProgressBoard | None = None) -> dict[str, Any]:
    """``tune.RunConfig`` arguments for the console of the current session.

    Quiet session: Tune's reporter is silenced (it still prints trial errors) and a
    :class:`TrialTable` prints the rest, with the trials' progress from ``board``
    (:func:`progress_board`). ``-v``: Tune's reporter at its most verbose (every result).
    Outside a session: Ray's defaults.
    """
    if not console.quiet() or TrialTable is None:
        return {"verbose": console.tune_verbosity()}
    _tolerate_unset_start_time()
    return {"verbose": 0, "callbacks": [TrialTable(metric=metric, mode=mode, param_space=param_space,
                                                    progress_metrics=progress_metrics, board=board,
                                                    every_s=board.every_s if board is not None else None)]}


def trial_progress(board: ProgressBoard | None) -> list[StreamCallback]:
    """The stream callbacks a trial adds for the console: its :class:`TrialProgress`, if a board is up."""
    if board is None:
        return []
    from ray import tune

    return [TrialProgress(board, tune.get_context().get_trial_id())]
