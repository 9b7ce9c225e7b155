"""Update validation before aggregation: one broken or hostile site must not ruin a round.

A reply is rejected when its weights do not match the global model's names, shapes or
dtypes, hold a non-finite value, or move the model much further than the other sites
do (update norm above `ratio` x the median norm, with at least 3 updates to compare).
Rejected replies are left out of the round and counted in the run log; they never
raise. Sign-flipped or subtly poisoned updates pass these checks by design: that is
what the robust strategies (median, trimmed mean, Krum, Bulyan) are for.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message


def validate(replies: list[Message], global_arrays: ArrayRecord, ratio: float) -> tuple[list[Message], list[dict]]:
    """(accepted replies, [{node, reason}] for the rejected); error replies pass through untouched."""
    reference = {k: a.numpy() for k, a in global_arrays.items()}
    accepted, rejected, norms = [], [], {}
    for msg in replies:
        if msg.has_error() or "arrays" not in msg.content:
            accepted.append(msg)
            continue
        reason, norm = _check(msg.content["arrays"], reference)
        if reason:
            rejected.append({"node": msg.metadata.src_node_id, "reason": reason})
        else:
            accepted.append(msg)
            norms[id(msg)] = norm
    if len(norms) >= 3:
        median = float(np.median(list(norms.values())))
        outliers = [m for m in accepted if id(m) in norms and norms[id(m)] > ratio * max(median, 1e-12)]
        for msg in outliers:
            accepted.remove(msg)
            rejected.append({"node": msg.metadata.src_node_id,
                             "reason": f"update norm {norms[id(msg)]:.3g} > {ratio:g} x median {median:.3g}"})
    return accepted, rejected


def _check(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> tuple[str, float]:
    if set(arrays.keys()) != set(reference):
        return "weights do not match the model's names", 0.0
    total = 0.0
    for key, ref in reference.items():
        value = arrays[key].numpy()
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return f"{key}: {value.dtype}{list(value.shape)} instead of {ref.dtype}{list(ref.shape)}", 0.0
        if not np.isfinite(value).all():
            return f"{key}: non-finite values", 0.0
        total += float(np.square(value.astype(np.float64) - ref).sum())
    return "", math.sqrt(total)
