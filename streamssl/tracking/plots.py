"""PNG plots of a stream: accuracy per segment, the accuracy-matrix (forgetting) heatmap, and the
training loss across the whole stream.

Figures are built with :class:`matplotlib.figure.Figure` on an explicit Agg canvas instead of
``pyplot``: no global figure registry or backend switch, so plotting is safe from the driver's
callback thread, inside Ray Tune trials, and on machines without a display.
Every function returns the written path, or None when there is nothing to plot yet.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.run.records import SegmentResult
from streamssl.storage import Location
from streamssl.tracking.report import accuracy_matrices, forgetting_and_accuracy

ACC_METRIC = re.compile(r"^eval/(?!.*_seg\d+$).+_acc$")  # eval/knn_acc, not eval/knn_acc_seg3


def is_held_out_accuracy(key: str) -> bool:
    """An accuracy on the held-out split for the whole stream (``eval/knn_acc``): not one segment's
    (``eval/knn_acc_seg3``), not a probe's fit on its own training features (``eval/linear_train_acc``)."""
    return bool(ACC_METRIC.match(key)) and not key.endswith("_train_acc")
PLOT_FILES = ("accuracy_per_segment.png", "forgetting_heatmap.png", "loss_curve.png")
BASELINE_STYLE = "--"  # line style of the random-init levels in the accuracy plot


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _accuracy_range(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    """Y limits around the drawn accuracies (a few points apart matter), in steps of 0.05 within [0, 1]."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo = max(0.0, math.floor(round((min(finite) - pad) * 20, 6)) / 20)
    hi = min(1.0, math.ceil(round((max(finite) + pad) * 20, 6)) / 20)
    return (lo, hi) if hi > lo else (0.0, 1.0)


def accuracy_figure(results: Sequence[SegmentResult], baseline: Mapping[str, float] | None = None) -> Any | None:
    """The figure behind :func:`plot_accuracy_per_segment` (None when there is no accuracy)."""
    ordered = sorted(results, key=lambda r: r.segment)
    keys = sorted({k for r in ordered for k in r.metrics if is_held_out_accuracy(k)})
    if not keys:
        return None
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    xs = [r.segment for r in ordered]
    shown_baseline = False
    drawn: list[float] = []
    for k in keys:
        ys = [r.metrics.get(k, float("nan")) for r in ordered]
        (line,) = ax.plot(xs, ys, marker="o", label=k.removeprefix("eval/"))
        drawn += ys
        base = (baseline or {}).get(k)
        if base is not None and math.isfinite(base):
            ax.axhline(base, color=line.get_color(), ls=BASELINE_STYLE, lw=1.2, alpha=0.8,
                       label=f"{k.removeprefix('eval/')} at random init")
            drawn.append(base)
            shown_baseline = True
    ax.set_xlabel("after segment")
    ax.set_ylabel("accuracy")
    ax.set_xticks(xs)
    ax.set_ylim(*_accuracy_range(drawn))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the lines
    ax.set_title("frozen-feature accuracy along the stream" + (" (dashed: random init)" if shown_baseline else ""))
    return fig


def plot_accuracy_per_segment(results: Sequence[SegmentResult], path: str | Path,
                              baseline: Mapping[str, float] | None = None) -> Path | None:
    """One line per held-out ``eval/*_acc`` metric over the segments (x = segment index).

    ``baseline``: the same metrics of the encoder at its random init
    (:mod:`streamssl.tracking.baseline`), drawn as a dashed horizontal line in each probe's colour:
    the level the stream has to beat.
    """
    fig = accuracy_figure(results, baseline)
    return None if fig is None else _save(fig, path)


def plot_forgetting_heatmap(source: Sequence[SegmentResult] | Mapping[str, Any] | np.ndarray | Sequence[Sequence[float]],
                            path: str | Path, title: str | None = None) -> Path | None:
    """Heatmap of ``A[t][i]`` (rows: after segment t, columns: evaluated on segment i), one panel
    per probe. ``source``: segment results (their accuracy rows), ``{probe: matrix}``, or one matrix.
    Each panel's title carries the average forgetting so the number sits next to its evidence.
    """
    if isinstance(source, np.ndarray) or (isinstance(source, Sequence) and source
                                          and not isinstance(source[0], SegmentResult)):
        mats = {"accuracy": np.asarray(source, dtype=np.float64)}
    elif isinstance(source, Mapping):
        mats = {k: np.asarray(v, dtype=np.float64) for k, v in source.items()}
    else:
        mats = accuracy_matrices(list(source))  # type: ignore[arg-type]
    mats = {k: A for k, A in mats.items() if A.ndim == 2 and A.size and not np.isnan(A).all()}
    if not mats:
        return None
    n = len(mats)
    T, W = max(A.shape[0] for A in mats.values()), max(A.shape[1] for A in mats.values())
    fig = _figure(max(4.0, 0.55 * W + 2.2) * n, max(3.2, 0.45 * T + 1.8))
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (name, A) in zip(axes, mats.items()):
        im = ax.imshow(np.ma.masked_invalid(A), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        f, _ = forgetting_and_accuracy(A) if A.shape[1] >= A.shape[0] else (float("nan"), None)
        ax.set_title(f"{name}" + (f" (avg forgetting {f:.3f})" if math.isfinite(f) else ""), fontsize="medium")
        ax.set_xlabel("evaluated on segment i")
        ax.set_ylabel("after training segment t")
        ax.set_xticks(range(A.shape[1]))
        ax.set_yticks(range(A.shape[0]))
        if A.size <= 144:  # annotate small matrices; large ones would be unreadable
            for t in range(A.shape[0]):
                for i in range(A.shape[1]):
                    if math.isfinite(A[t, i]):
                        ax.text(i, t, f"{A[t, i]:.2f}", ha="center", va="center", fontsize="x-small",
                                color="white" if A[t, i] < 0.6 else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.9, label="accuracy")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def read_step_metrics(files: Sequence[str | Path | None]) -> list[dict[str, Any]]:
    """Per-step records from JSONL files (local paths or URIs), ordered by (segment, step).

    A segment restarted from an in-segment checkpoint logs some steps twice: the later record
    wins. Unreadable lines are skipped (a killed writer can leave half a line).
    """
    recs: dict[tuple[int, int], dict[str, Any]] = {}
    for i, f in enumerate(files):
        if not f:
            continue
        loc = Location(str(f))
        try:
            text = loc.read_text() if loc.is_file() else ""
        except OSError:
            continue
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                key = (int(rec.get("segment", i)), int(rec["step"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            recs[key] = rec
    return [recs[k] for k in sorted(recs)]


def _trailing_mean(y: np.ndarray, w: int, starts: Sequence[int]) -> np.ndarray:
    """Mean of the last ``w`` values, restarted at every segment start so that the jump between
    segments (new data) is not smeared into the previous segment's curve."""
    out = np.empty_like(y, dtype=np.float64)
    edges = [0, *starts, len(y)]
    for a, b in zip(edges[:-1], edges[1:]):
        c = np.cumsum(np.concatenate([[0.0], y[a:b]]))
        n = np.arange(1, b - a + 1)
        k = np.minimum(n, w)
        out[a:b] = (c[n] - c[n - k]) / k
    return out


def plot_loss_curve(step_files: Sequence[str | Path | None], path: str | Path, key: str = "loss") -> Path | None:
    """``key`` over every step of the stream (segments laid end to end, boundaries dashed), with
    a moving average when the raw curve is noisy."""
    recs = [r for r in read_step_metrics(step_files) if isinstance(r.get(key), (int, float))]
    if not recs:
        return None
    xs, ys, bounds, starts, labels = [], [], [], [], []
    offset, prev_seg, first_step = 0, None, 0
    for r in recs:
        seg = int(r.get("segment", 0))
        if seg != prev_seg:
            if prev_seg is not None:
                offset = xs[-1] + 1
                bounds.append(offset)
                starts.append(len(xs))
            labels.append((offset, seg))
            prev_seg, first_step = seg, int(r["step"])
        xs.append(offset + int(r["step"]) - first_step)
        ys.append(float(r[key]))
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    y = np.asarray(ys)
    ax.plot(xs, y, lw=0.8, alpha=0.45 if len(y) > 50 else 1.0, label=key)
    if len(y) > 50:
        w = max(5, len(y) // 50)
        ax.plot(xs, _trailing_mean(y, w, starts), lw=1.6, label=f"{key} (mean of last {w} steps)")
    for b in bounds:
        ax.axvline(b - 0.5, color="gray", ls="--", lw=0.8)
    for x0, seg in labels:
        ax.annotate(f"seg {seg}", (x0, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -12),
                    textcoords="offset points", fontsize="x-small", color="gray")
    ax.set_xlabel("step (across the stream)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    ax.set_title(f"training {key} across segments")
    return _save(fig, path)


def render_plots(results: Sequence[SegmentResult], out_dir: str | Path,
                 baseline: Mapping[str, float] | None = None) -> list[Path]:
    """All three plots for the segments so far into the local directory ``out_dir`` (``baseline``:
    random-init metrics for the accuracy plot); returns what was written."""
    out = Path(out_dir)
    ordered = sorted(results, key=lambda r: r.segment)
    written = [
        plot_accuracy_per_segment(ordered, out / PLOT_FILES[0], baseline),
        plot_forgetting_heatmap(ordered, out / PLOT_FILES[1]) if ordered else None,
        plot_loss_curve([r.step_metrics_file for r in ordered], out / PLOT_FILES[2]),
    ]
    return [p for p in written if p is not None]
