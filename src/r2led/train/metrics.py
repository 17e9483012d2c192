"""CTR metrics on whole splits: AUC, LogLoss and GAUC (AUC averaged over users)."""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.metrics import log_loss, roc_auc_score


def gauc(user: np.ndarray, label: np.ndarray, score: np.ndarray) -> float:
    """Per-user AUC weighted by the user's sample count, over users with both classes.

    Vectorised: average ranks within each user (ties share a rank), then Mann-Whitney U.
    """
    df = pl.DataFrame({"u": user, "y": label.astype(np.int8), "s": score.astype(np.float64)})
    df = df.with_columns(pl.col("s").rank("average").over("u").alias("r"))
    g = df.group_by("u").agg(  # then sorted: a fixed summation order, the same GAUC every call
        pl.len().alias("n"),
        pl.col("y").sum().alias("pos"),
        pl.col("r").filter(pl.col("y") == 1).sum().alias("rank_pos"),
    )
    g = (
        g.sort("u")
        .with_columns((pl.col("n") - pl.col("pos")).alias("neg"))
        .filter((pl.col("pos") > 0) & (pl.col("neg") > 0))
    )
    if g.height == 0:
        return float("nan")
    pos, neg, n = g["pos"].to_numpy(), g["neg"].to_numpy(), g["n"].to_numpy()
    auc = (g["rank_pos"].to_numpy() - pos * (pos + 1) / 2) / (pos * neg)
    return float(np.sum(auc * n) / np.sum(n))


def ctr_metrics(label: np.ndarray, prob: np.ndarray, user: np.ndarray | None = None) -> dict[str, float]:
    """{"auc", "logloss", "gauc"} for labels in {0,1} and predicted probabilities."""
    label = np.asarray(label)
    prob = np.clip(np.asarray(prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    out = {
        "auc": float(roc_auc_score(label, prob)) if len(np.unique(label)) > 1 else float("nan"),
        "logloss": float(log_loss(label, prob, labels=[0, 1])),
    }
    if user is not None:
        out["gauc"] = gauc(np.asarray(user), label, prob)
    return out
