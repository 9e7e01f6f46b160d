"""``CKPT/curves.png``: loss, accuracy (train and validation) and learning rate over the steps."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(records: list[dict]) -> bytes:
    """PNG bytes of the curves in ``records`` (metrics.jsonl lines)."""
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "masked-token accuracy")):
        ax.plot(steps, [r[key] for r in records], label="train", lw=0.8)
        for prefix, label in (("val_", "val"), ("val_ema_", "val (EMA)")):
            val = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
            if val:
                ax.plot(*zip(*val), "o-", label=label, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    axes[2].plot(steps, [r["lr"] for r in records])
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
