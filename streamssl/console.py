"""What a person sees on the console of a Ray-running verb, and where everything else goes.

A stream run starts many Ray processes (Ray Train controllers and workers, Ray Data split
coordinators and read tasks, Tune trials, helper actors), each with its own logging. Inside a
:func:`session` (what ``streamssl train|resume|demo|tune|study`` open) the console shows only
streamssl's own output and errors:

* worker processes are not forwarded to the console (``ray.init(log_to_driver=False)``); Ray
  keeps their stdout/stderr in the session's log directory, which is linked into the run's
  ``logs/`` directory while the run goes and copied there when it ends, if this process started
  the Ray cluster;
* the driver's own log records (Ray, Ray Data, Ray Train, Tune, MLflow, Python warnings) go to
  ``logs/driver.log``; records at ERROR and above still reach stderr, and so do tracebacks;
* Ray Data progress bars are off, for the driver and (through the job's runtime env) for every
  worker, so the worker logs do not fill up with them either;
* two kinds of lines Ray prints on the driver's console whatever ``log_to_driver`` says are
  folded into ``logs/driver.log`` (:data:`FOLDED_LINES`): the raylet's "N PYTHON worker processes
  have been started" warnings, which reach the driver as error messages (the
  ``ray._private.worker.print_to_stdstream`` call of Ray's error listener thread is the one place
  they pass; it is wrapped for the session), and the driver core worker's "constructor arguments
  in the object store" line about actors of Ray Train / Ray Data that streamssl does not create,
  which its C++ logger writes straight to file descriptor 2 (filtered by :class:`NativeStderrFilter`
  from ``ray.init`` on; everything else on stderr passes through unchanged).

``verbose=True`` (the CLI's ``-v``) keeps Ray's own console behaviour: every worker's output is
forwarded to the terminal. Either way the workers get :func:`setup_ray_worker`, which logs Ray
Train's placement-group cleaner's "Failed to query Ray Train Controller actor state" warning once
instead of once a second (without the Ray dashboard the state API it polls never answers).

Code that never opens a session (the library API, the tests) gets Ray's defaults untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["DRIVER_LOG", "Session", "adopt_library_loggers", "current", "init_ray", "is_verbose",
           "logs_summary", "quiet", "ray_init_kwargs", "session", "setup_ray_worker", "tune_verbosity"]

DRIVER_LOG = "driver.log"
RAY_LOGS_PREFIX = "ray-"  # + the Ray session's name: logs/ray-session_2026-...
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# For the whole Ray job of a quiet session: in os.environ before ray.init (a cluster this process
# starts inherits them) and in the job's runtime env (a cluster it connects to).
QUIET_JOB_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# The driver only: MLflow logs its INFO lines (database set-up) before streamssl can route them.
QUIET_DRIVER_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING"}

# Ray's lines that a quiet console folds into the driver log (see the module docstring).
FOLDED_LINES = (
    re.compile(r"worker processes have been started on node"),  # raylet: worker pool start-up warning
    re.compile(r"core_worker\.cc:\d+.*constructor arguments in the object store"),  # driver core worker
)
FOLDED_LOGGER = "streamssl.console.folded"

PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PG_CLEANER_MESSAGE = "Failed to query Ray Train Controller actor state"


# --------------------------------------------------------------------------- Ray worker processes


class _FirstOnly(logging.Filter):
    """Lets the first record whose message starts with ``prefix`` through, and drops the rest."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.msg} (logged once per process by streamssl)"
        return True


def setup_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for the jobs streamssl starts (runs in every worker).

    Ray Train's placement-group cleaner polls the Ray state API once a second and warns every
    time it cannot reach it, which is always without the dashboard (streamssl starts Ray without
    it): one warning per second of training in the worker logs, or on the console with ``-v``.
    """
    logger = logging.getLogger(PG_CLEANER_LOGGER)
    if not any(isinstance(f, _FirstOnly) for f in logger.filters):
        logger.addFilter(_FirstOnly(PG_CLEANER_MESSAGE))


# --------------------------------------------------------------------------- the driver's log file


class _RunLog(logging.Handler):
    """Appends records to ``driver.log``; holds them in memory until the log directory is known."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.path: Path | None = None
        self._file: Any = None
        self._pending: list[logging.LogRecord] = []
        self._limit = limit

    def open(self, path: Path) -> None:
        with self.lock:
            if self._file is not None:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self.path = path
            pending, self._pending = self._pending, []
            for record in pending:
                self._write(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            if len(self._pending) < self._limit:
                self._pending.append(record)
            return
        self._write(record)

    def _write(self, record: logging.LogRecord) -> None:
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)

    def close(self) -> None:
        with self.lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._pending = []
        super().close()


def _is_console_handler(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)


# --------------------------------------------------------------------------- Ray's console lines


def is_folded(line: str) -> bool:
    """True for a line of Ray's that the quiet console keeps out (:data:`FOLDED_LINES`)."""
    return any(p.search(line) for p in FOLDED_LINES)


def _log_folded(line: str, source: str) -> None:
    logging.getLogger(FOLDED_LOGGER).warning("%s: %s", source, line.rstrip())


class NativeStderrFilter:
    """Keeps :func:`is_folded` lines written to a file descriptor (2: the process's stderr, where
    native code writes too) out of it, and logs them instead.

    The descriptor is pointed at a pipe; a thread copies what arrives to the original target,
    line by line, less the folded lines. A partial line (a progress bar's carriage returns) is
    passed on at once unless it looks like the start of a native log line (``[``). Start it after
    the Ray cluster's processes are up: a child process started while it runs inherits the pipe.
    """

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._saved is not None:
            return
        read_end, write_end = os.pipe()
        self._saved = os.dup(self.fd)
        os.dup2(write_end, self.fd)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end, self._saved), daemon=True,
                                        name="streamssl-stderr-filter")
        self._thread.start()

    @staticmethod
    def _pump(read_end: int, target: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                out = []
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    if is_folded(line):
                        _log_folded(line, "stderr")
                    else:
                        out.append(raw + b"\n")
                if pending and not pending.startswith(b"["):
                    out.append(pending)
                    pending = b""
                if out:
                    os.write(target, b"".join(out))
            if pending:
                os.write(target, pending)
        except OSError:
            pass
        finally:
            os.close(read_end)

    def stop(self) -> None:
        """Give the descriptor its original target back, once what was written is through."""
        if self._saved is None:
            return
        with contextlib.suppress(Exception):
            import sys

            sys.stderr.flush()
        os.dup2(self._saved, self.fd)  # the pipe's last write end closes: the thread drains and ends
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._saved)
        self._saved, self._thread = None, None


def _fold_ray_error_messages(s: Session) -> None:
    """Wrap the function Ray's driver-side error listener prints with, for the session."""
    try:
        from ray._private import worker as ray_worker

        original = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):  # an internal that moved: Ray prints as it does
        return
    if getattr(original, "_streamssl_folding", False):
        return

    def print_unless_folded(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        lines = list(data.get("lines") or [])
        kept = [ln for ln in lines if not is_folded(str(ln))]
        for ln in lines:
            if ln not in kept:
                _log_folded(str(ln), str(data.get("pid", "ray")))
        if kept:
            return original({**data, "lines": kept} if len(kept) < len(lines) else data, *args, **kwargs)
        return None

    print_unless_folded._streamssl_folding = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_unless_folded

    def undo() -> None:
        if ray_worker.print_to_stdstream is print_unless_folded:
            ray_worker.print_to_stdstream = original

    s._undo.append(undo)


# --------------------------------------------------------------------------- the session


class Session:
    """One CLI command's console settings; see the module docstring."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.log: _RunLog | None = None
        self.log_dir: Path | None = None
        self.ray_logs: Path | None = None  # the Ray session's log directory
        self.ray_link: Path | None = None  # its link (later: copy) inside log_dir
        self.own_cluster = False
        self._stderr_filter: NativeStderrFilter | None = None
        self._undo: list[Callable[[], None]] = []

    # -- set-up and tear-down
    def _set_env(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            if key not in os.environ:
                os.environ[key] = value
                self._undo.append(lambda key=key: os.environ.pop(key, None))

    def _quiet(self) -> None:
        self._set_env({**QUIET_JOB_ENV, **QUIET_DRIVER_ENV})
        root = logging.getLogger()
        self.log = _RunLog()
        errors = logging.StreamHandler()  # stderr
        errors.setLevel(logging.ERROR)
        errors.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        level = root.level
        root.addHandler(self.log)
        root.addHandler(errors)
        if level == logging.NOTSET or level > logging.INFO:
            root.setLevel(logging.INFO)
        logging.captureWarnings(True)

        def undo() -> None:
            logging.captureWarnings(False)
            root.removeHandler(errors)
            root.removeHandler(self.log)
            root.setLevel(level)

        self._undo.append(undo)
        adopt_library_loggers()

    def fold_ray_lines(self) -> None:
        """Keep Ray's :data:`FOLDED_LINES` off the console from now on (once Ray runs)."""
        if self._stderr_filter is not None:
            return
        _fold_ray_error_messages(self)
        stderr_filter = NativeStderrFilter()
        try:
            stderr_filter.start()
        except OSError:
            return
        self._stderr_filter = stderr_filter
        self._undo.append(stderr_filter.stop)

    def close(self) -> None:
        self._keep_ray_logs()
        for undo in reversed(self._undo):
            with contextlib.suppress(Exception):
                undo()
        self._undo.clear()
        if self.log is not None:
            self.log.close()

    # -- where the logs go
    def use_log_dir(self, log_dir: str | os.PathLike[str] | None) -> None:
        """Put the driver log (and, once Ray runs, a link to Ray's logs) in ``log_dir``."""
        if log_dir is None or self.log_dir is not None:
            return
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.log is not None:
            self.log.open(self.log_dir / DRIVER_LOG)

    def _found_ray(self) -> None:
        """Note the Ray session's log directory and link it into the log directory."""
        if self.ray_logs is not None:
            return
        try:
            import ray

            node = ray._private.worker._global_node  # the local Ray node this driver is attached to
            logs = Path(node.get_logs_dir_path())
            session_name = Path(node.get_session_dir_path()).name
        except Exception:  # noqa: BLE001 (Ray Client, or an internal API that moved: no link then)
            return
        self.ray_logs = logs
        if self.log_dir is None:  # a run directory on an object store: keep ours next to Ray's
            if self.log is not None:
                self.log.open(logs / f"streamssl-driver-{os.getpid()}.log")
            return
        link = self.log_dir / f"{RAY_LOGS_PREFIX}{session_name}"
        try:
            if not link.exists() and not link.is_symlink():
                link.symlink_to(logs, target_is_directory=True)
            self.ray_link = link
        except OSError:
            pass

    def _keep_ray_logs(self) -> None:
        """Replace the link to Ray's logs by a copy, when the Ray cluster dies with this process."""
        link = self.ray_link
        if not (self.own_cluster and link is not None and link.is_symlink() and self.ray_logs):
            return
        tmp = link.with_name(link.name + ".copying")
        try:
            shutil.copytree(self.ray_logs, tmp, symlinks=True, ignore_dangling_symlinks=True, dirs_exist_ok=True)
        except (OSError, shutil.Error):
            pass  # a file that vanished or could not be read: the rest of the copy is still kept
        if tmp.is_dir():
            link.unlink()
            tmp.rename(link)

    def summary(self) -> str | None:
        lines = []
        if self.log is not None and self.log.path is not None:
            lines.append(f"logs: {self.log.path} (Ray, Ray Data, Tune and MLflow messages of this process)")
        ray_logs = self.ray_link or self.ray_logs
        if ray_logs is not None:
            lines.append(f"{'      ' if lines else 'logs: '}{ray_logs} (every Ray worker's output: "
                         "Ray Train, DeepSpeed, Ray Data)")
        return "\n".join(lines) or None


_SESSION: Session | None = None


@contextlib.contextmanager
def session(verbose: bool = False) -> Iterator[Session]:
    """The console settings of one command; everything it changes is restored on exit."""
    global _SESSION
    s, previous = Session(verbose), _SESSION
    _SESSION = s
    try:
        if not verbose:
            s._quiet()
        yield s
    finally:
        _SESSION = previous
        s.close()


def current() -> Session | None:
    return _SESSION


def is_verbose() -> bool:
    """True in a ``-v`` session: Ray's output reaches the console."""
    return _SESSION is not None and _SESSION.verbose


def logs_summary() -> str | None:
    """Where this command's logs are (None outside a session, or before Ray ran)."""
    return _SESSION.summary() if _SESSION is not None else None


def adopt_library_loggers() -> None:
    """In a quiet session, send the records of libraries' own console handlers to the log file.

    Ray, Ray Data and MLflow give their loggers a stderr handler and ``propagate = False`` when
    they are imported; such a logger loses its console handlers and propagates to the root
    logger, where the session's handlers are. Called again whenever more libraries may have
    been imported (it only touches loggers that still have a console handler).
    """
    s = _SESSION
    if s is None or s.verbose:
        return
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        console = [h for h in logger.handlers if _is_console_handler(h)]
        # "ray" after ray.init(configure_logging=False): no handler, not propagating, so its
        # warnings would go to Python's last-resort stderr handler.
        if not console and (logger.propagate or logger.handlers):
            continue
        propagate = logger.propagate
        for h in console:
            logger.removeHandler(h)
        logger.propagate = True

        def undo(logger: logging.Logger = logger, console: list = console, propagate: bool = propagate) -> None:
            for h in console:
                logger.addHandler(h)
            logger.propagate = propagate

        s._undo.append(undo)


# --------------------------------------------------------------------------- Ray


def _job_runtime_env(verbose: bool) -> dict[str, Any] | None:
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # The driver of a Ray Job: the submitter's runtime env applies, and a key set both there
        # and here would be an error; worker output goes to the job's logs anyway.
        return None
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": f"{__name__}.setup_ray_worker"}
    if not verbose:
        runtime_env["env_vars"] = dict(QUIET_JOB_ENV)
    return runtime_env


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """The ``ray.init`` arguments of a streamssl driver in the current session (or outside one)."""
    kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "configure_logging": False,
                              "log_to_driver": True}
    s = _SESSION
    if s is not None:
        kwargs["log_to_driver"] = s.verbose
        runtime_env = _job_runtime_env(s.verbose)
        if runtime_env:
            kwargs["runtime_env"] = runtime_env
    return kwargs


def init_ray(address: str | None, log_dir: str | os.PathLike[str] | None = None) -> None:
    """Start or join Ray for a driver (a no-op when Ray is already up in this process).

    In a session, ``log_dir`` (a local directory, e.g. ``<run_dir>/logs``) receives the driver
    log and a link to Ray's logs; None keeps them in Ray's session directory.
    """
    import ray

    s = _SESSION
    if s is not None:
        s.use_log_dir(log_dir)
        if not s.verbose:
            import ray.data  # noqa: F401 (configures its loggers on import: adopt them now)

            adopt_library_loggers()
    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(address))
        if s is not None:
            node = getattr(ray._private.worker, "_global_node", None)
            s.own_cluster = bool(getattr(node, "head", False))
    if s is not None:
        s._found_ray()
        if not s.verbose:
            s.fold_ray_lines()
        if not s.verbose:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False


def tune_verbosity() -> int | None:
    """``tune.RunConfig(verbose=...)``: Tune's trial table and trial starts/ends in a quiet
    session (1), every reported result with ``-v`` (2), Ray's default outside a session (None)."""
    if _SESSION is None:
        return None
    return 2 if _SESSION.verbose else 1


def quiet() -> bool:
    """True in a session without ``-v``."""
    return _SESSION is not None and not _SESSION.verbose

