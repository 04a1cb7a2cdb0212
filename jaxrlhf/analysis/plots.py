"""PNG figures of the analysis results (matplotlib, optional: without it no figure is written)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger("jaxrlhf.analysis")


def pyplot(out_path: str):
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; not writing %s (pip install matplotlib)", out_path)
        return None
    return plt


def _save(fig, plt, out_path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def _positive(values) -> np.ndarray:
    """Float array with ``None`` and non-positive values as NaN (log-scale axes)."""
    v = np.asarray([np.nan if x is None else x for x in values], np.float64)
    return np.where(v > 0, v, np.nan)


def _log_y(ax) -> None:
    """Log y axis when the axis holds some positive finite data (else it stays linear)."""
    ys = [np.asarray(line.get_ydata(), np.float64) for line in ax.get_lines()]
    if any(np.isfinite(y).any() for y in ys):
        ax.set_yscale("log")


def divergence_layers(results: dict[str, dict[str, Any]], out_path: str) -> str | None:
    """Per-layer mean tensor MSE (weights, biases, norms), one line per model; log y."""
    plt = pyplot(out_path)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110, sharex=True)
    for name, res in results.items():
        layers = sorted(res["layers"], key=int)
        for ax, kind in zip(axes, ("weights", "biases", "norms"), strict=True):
            y = _positive([res["layers"][i][f"{kind}_mean"] for i in layers])
            ax.plot([int(i) for i in layers], y, "o-", label=name)
    for ax, kind in zip(axes, ("weights", "biases", "norms"), strict=True):
        _log_y(ax)
        ax.set_title(f"{kind}: mean per-tensor MSE to base")
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    return _save(fig, plt, out_path)


def divergence_curves(curves: dict[str, dict[str, Any]], out_path: str, xlabel: str = "step") -> str | None:
    """Mean per-tensor MSE of weights and of biases over training, one line per run; log y."""
    plt = pyplot(out_path)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for name, c in curves.items():
        for ax, key in zip(axes, ("weights_mean", "biases_mean"), strict=True):
            ax.plot(c["x"], _positive(c[key]), "o-", label=name)
    for ax, key in zip(axes, ("weights", "biases"), strict=True):
        _log_y(ax)
        ax.set_title(f"{key}: mean per-tensor MSE to base")
        ax.set_xlabel(xlabel)
    axes[0].legend(fontsize=7)
    return _save(fig, plt, out_path)


def activation_layers(results: dict[str, dict[str, Any]], out_path: str) -> str | None:
    """Per-layer cosine similarity and logit-lens KL, one line per (model, group)."""
    plt = pyplot(out_path)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for name, res in results.items():
        for group, g in res["groups"].items():
            x = np.arange(len(g["cosine"]))
            style = "-" if group == "all" else "--"
            axes[0].plot(x, g["cosine"], "o" + style, ms=3, label=f"{name} [{group}]")
            axes[1].plot(x, g["kl"], "o" + style, ms=3, label=f"{name} [{group}]")
    axes[0].set_title("residual cosine similarity to base")
    axes[1].set_title("logit-lens KL(model || base), nats/token")
    for ax in axes:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=7)
    return _save(fig, plt, out_path)


def head_heatmaps(results: dict[str, dict[str, Any]], out_path: str) -> str | None:
    """``[layer, head]`` heatmaps of the loss change and the reward change, one row per model."""
    plt = pyplot(out_path)
    if plt is None:
        return None
    keys = [
        k
        for k in ("delta_loss", "delta_reward")
        if any(r["base"][k[6:]] is not None for r in results.values())
    ]
    n = len(results)
    fig, axes = plt.subplots(n, len(keys), figsize=(4.2 * len(keys), 3.2 * n), dpi=110, squeeze=False)
    for row, (name, res) in enumerate(results.items()):
        for col, key in enumerate(keys):
            a = np.asarray([[np.nan if v is None else v for v in r] for r in res[key]], np.float64)
            lim = np.nanmax(np.abs(a)) if np.isfinite(a).any() else 1.0
            ax = axes[row, col]
            im = ax.imshow(
                a, cmap="RdBu_r" if key == "delta_loss" else "RdBu", vmin=-lim, vmax=lim, aspect="auto"
            )
            ax.set_title(f"{name}: {key} (ablated - base)", fontsize=8)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(a.shape[1]))
            ax.set_yticks(range(a.shape[0]))
            fig.colorbar(im, ax=ax)
    return _save(fig, plt, out_path)
