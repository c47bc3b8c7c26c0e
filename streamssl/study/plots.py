"""The study's figures: accuracy along the stream, gap to joint, CKA to joint, compute against
accuracy (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.study.spec import JOINT, RANDOM_INIT, REFERENCES
from streamssl.study.table import CellOutcome

PLOT_FILES = ("accuracy_along_stream.png", "gap_to_joint.png", "cka_to_joint.png", "compute_vs_accuracy.png")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_along_stream(outcomes: Sequence[CellOutcome], path: str | Path, probe: str = "linear") -> Path | None:
    """One panel per protocol: the probe's accuracy after each segment, mean over the strategy's seeds
    (their number is in the legend: strategies run with fewer seeds are noisier), and the
    random-init encoder as a dashed line (the floor every SSL curve has to clear)."""
    protocols = list(dict.fromkeys(o.protocol for o in outcomes))
    if not protocols:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        mine = [o for o in outcomes if o.protocol == protocol]
        for strategy in dict.fromkeys(o.strategy for o in mine):
            cells = [o for o in mine if o.strategy == strategy]
            if strategy in REFERENCES:
                level = np.nanmean([o.final.get(probe, np.nan) for o in cells])
                if math.isfinite(level):
                    ax.axhline(100 * level, color="grey" if strategy == RANDOM_INIT else "black",
                               linestyle="--" if strategy == RANDOM_INIT else ":",
                               label="random init" if strategy == RANDOM_INIT else "raw pixels")
                continue
            curves = [o.curve.get(probe, []) for o in cells if o.curve.get(probe)]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            y = 100 * np.nanmean(np.array([c[:n] for c in curves], dtype=float), axis=0)
            ax.plot(np.arange(1, n + 1), y, marker="o", label=f"{strategy} ({len(curves)} seed{'s' * (len(curves) > 1)})",
                    linewidth=2.2 if strategy == JOINT else 1.4, color="black" if strategy == JOINT else None)
        ax.set_title(protocol)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("segments trained")
        ax.set_ylabel(f"{probe} probe accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")  # per panel: seed counts differ between protocols
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _heatmap(rows: Sequence[dict[str, Any]], key: str, path: str | Path, title: str, scale: float, fmt: str,
             skip: tuple[str, ...]) -> Path | None:
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] not in skip))
    if not protocols or not strategies:
        return None
    values = np.full((len(protocols), len(strategies)), np.nan)
    for r in rows:
        if r["strategy"] in strategies:
            values[protocols.index(r["protocol"]), strategies.index(r["strategy"])] = scale * r[key]
    if np.isnan(values).all():
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(strategies) + 2.0, 0.7 * len(protocols) + 1.6))
    finite = values[np.isfinite(values)]
    lim = max(abs(finite).max(), 1e-9)
    im = ax.imshow(values, cmap="RdBu" if scale != 1.0 else "viridis",
                   vmin=-lim if scale != 1.0 else None, vmax=lim if scale != 1.0 else None)
    ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
    ax.set_yticks(range(len(protocols)), protocols)
    for i in range(len(protocols)):
        for j in range(len(strategies)):
            v = values[i, j]
            dark = math.isfinite(v) and (abs(v) > 0.6 * lim if scale != 1.0 else v < 0.5 * (finite.min() + finite.max()))
            ax.text(j, i, "n/a" if not math.isfinite(v) else format(v, fmt), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_compute_vs_accuracy(rows: Sequence[dict[str, Any]], path: str | Path, probe: str = "linear") -> Path | None:
    """One panel per protocol: each strategy's final accuracy (mean over seeds) against the images
    it processed over the stream (training, replay and importance passes; joint retrains from
    scratch at every segment), on a log scale; the reference rows as horizontal lines."""
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    if not protocols:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.4), squeeze=False)
    drawn = False
    for ax, protocol in zip(axes[0], protocols):
        for r in (r for r in rows if r["protocol"] == protocol):
            acc = r.get(f"{probe}_mean", float("nan"))
            if not math.isfinite(acc):
                continue
            if r["strategy"] in REFERENCES:
                ax.axhline(100 * acc, color="grey" if r["strategy"] == RANDOM_INIT else "black",
                           linestyle="--" if r["strategy"] == RANDOM_INIT else ":", label=r["strategy"])
                continue
            images = r.get("images_processed", float("nan"))
            if math.isfinite(images) and images > 0:
                ax.scatter([images], [100 * acc], s=40 if r["strategy"] == JOINT else 25,
                           color="black" if r["strategy"] == JOINT else None, label=r["strategy"])
                drawn = True
        ax.set_xscale("log")
        ax.set_title(protocol)
        ax.set_xlabel("images processed over the stream")
        ax.set_ylabel(f"final {probe} probe accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def render_study_plots(rows: Sequence[dict[str, Any]], outcomes: Sequence[CellOutcome], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    made = [
        plot_accuracy_along_stream(outcomes, out / PLOT_FILES[0]),
        _heatmap(rows, "gap_to_joint_linear", out / PLOT_FILES[1], "linear probe: gap to joint (pp)", 100.0,
                 "+.1f", (JOINT, *REFERENCES)),
        _heatmap(rows, "cka_to_joint", out / PLOT_FILES[2],
                 "final encoder: linear CKA to joint (joint: to other seeds)", 1.0, ".3f", REFERENCES),
        plot_compute_vs_accuracy(rows, out / PLOT_FILES[3]),
    ]
    return [p for p in made if p is not None]
