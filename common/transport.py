"""Optional float16 transport of a site's update (run setting `update-dtype`): half the bytes upstream.

With `update-dtype = "float16"` a site sends its new weights minus the global weights it
received, in float16; the server adds them back onto the global weights, in the model's
own dtypes, as the reply arrives, so validation, aggregation and checkpoints never see
float16. Updates rather than weights: float16 keeps about three significant digits,
enough for one round's change but not for a weight near 1 plus a change a thousand
times smaller (a GroupNorm gain would stop learning). Integer arrays travel unchanged.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

UPDATE_DTYPES = ("float32", "float16")


def encode(new: ArrayRecord, base: ArrayRecord, dtype: str) -> ArrayRecord:
    """What a site sends: `new` itself (float32), or `new - base` in float16 for its floating arrays."""
    if dtype == "float32":
        return new
    sent = {}
    for key in new:
        value = new[key].numpy()
        if np.issubdtype(value.dtype, np.floating) and key in base:
            value = (value - base[key].numpy().astype(value.dtype)).astype(dtype)
        sent[key] = Array(value)
    return ArrayRecord(sent)


def decode(sent: ArrayRecord, base: ArrayRecord) -> ArrayRecord:
    """The weights a site sent: float16 arrays are updates to `base`, in base's dtypes; the rest are as sent."""
    weights = {}
    for key in sent:
        value = sent[key].numpy()
        if value.dtype == np.float16 and key in base:
            reference = base[key].numpy()
            value = reference + value.astype(reference.dtype)
        weights[key] = Array(value)
    return ArrayRecord(weights)
