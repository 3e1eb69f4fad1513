"""Loss-curve plot of a training run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """Write a PNG of the next-byte loss and the whole objective per step, marking the final held-out loss."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["byte_loss"] for h in history], lw=1, label="train next-byte loss (nats)")
    ax.plot(steps, [h["loss"] for h in history], lw=0.8, alpha=0.5, label="total objective (all terms)")
    last = history[-1] if history else {}
    if "held_out_bpb" in last:
        ax.axhline(last["held_out_bpb"] * 0.6931471805599453, color="C1", ls="--",
                   label=f"held-out {last['held_out_bpb']:.3f} bits/byte")
    return save_figure(fig, ax, "loss (nats/byte)", title, path)


def save_figure(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    """Label a per-step plot (x = step), add grid and legend, write it as PNG and close it."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
