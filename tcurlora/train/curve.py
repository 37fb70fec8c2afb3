"""The training curve: loss and validation Dice over the steps, as a PNG beside the adapter."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write


def write_curve(path: Path, history: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    steps, losses = zip(*history["loss"]) if history["loss"] else ((), ())
    ax.plot(steps, losses, color="tab:blue", lw=1, label="training loss (Dice+CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if history["val_dice"]:
        ax2 = ax.twinx()
        vs, vd = zip(*history["val_dice"])
        ax2.plot(vs, vd, "o-", color="tab:red", label="validation Dice")
        ax2.set_ylabel("validation Dice", color="tab:red")
        ax2.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
