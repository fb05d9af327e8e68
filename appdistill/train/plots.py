"""Training-curve plot (PNG): per-step loss and per-epoch validation AUC."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], steps: list[dict[str, float]], path: str | Path,
                title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from appdistill.io import atomic_write_bytes

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if steps:
        a.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1)
    a.set(xlabel="step", ylabel="training loss (sum of terms)", title="loss")
    if history:
        b.plot([h["epoch"] for h in history], [h["valid_auc"] for h in history], marker="o")
    b.set(xlabel="epoch", ylabel="AUC", title="validation AUC")
    fig.suptitle(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
