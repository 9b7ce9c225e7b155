"""What a site's evaluate reply says about a model: the same keys from every site, whatever its split holds.

Flower's FedAvg aggregates only replies with one key set, so a site whose validation split is empty or
holds one class must still send every key: an undefined value goes as 0 with zero weight (AUC's
`auc-weight`). Two classes: accuracy, AUC and the confusion grid of common/decision.py, from which the
server computes the pooled balanced accuracy, sensitivity, specificity and the decision threshold (a
single site's sensitivity is undefined without positives; the pooled one rarely is). More classes: the
site's own macro balanced accuracy, sensitivity and specificity (a mean over sites at the server).
"""

from __future__ import annotations

from typing import Any

from common import decision
from common.training import Evaluation

PER_SITE = ("balanced-accuracy", "sensitivity", "specificity")  # sent as they are for 3+ classes


def reply(result: Evaluation, task: str, num_classes: int, grid: bool = True) -> dict[str, Any]:
    """The scores of one evaluation; `grid`: with the two-class confusion grid (the global model's;
    a personalized model's reply leaves it out)."""
    if task != "classification":
        keys = ("dice", "iou")
        values = result.metrics if result.num_examples else dict.fromkeys(keys, 0.0)
        return {"loss": result.loss if result.num_examples else 0.0, **{k: values[k] for k in keys}}
    n = result.num_examples
    auc = result.metrics.get("auc") if n else None
    out: dict[str, Any] = {"loss": result.loss if n else 0.0,
                           "accuracy": result.metrics.get("accuracy") if n else 0.0,
                           "auc": auc if auc is not None else 0.0,
                           "auc-weight": n if auc is not None else 0}  # AUC undefined: 0 with zero weight
    if num_classes == 2:
        if grid:
            out.update(result.confusion if n else dict.fromkeys(decision.KEYS, 0.0))
    else:
        out.update({k: (result.metrics.get(k) if n else None) or 0.0 for k in PER_SITE})
    return out
