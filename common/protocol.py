"""What may travel between a site and the server, named once for both sides.

A site's replies carry only model weights and the aggregate metrics listed here;
the leakage test holds every reply of a simulated run to this list.
"""

STATUS = "status"  # a reply's ConfigRecord when a site declines a round: no arrays, no metrics
BUDGET_SPENT = "privacy-budget-spent"

TRAIN_METRICS = frozenset({
    "num-examples", "site-weight", "train-loss", "epsilon", "epsilon-total", "noise-multiplier",
})
EVALUATE_METRICS = frozenset({
    "num-examples", "site-weight", "loss", "accuracy", "auc", "auc-weight", "dice", "iou",
})
STATUS_FIELDS = frozenset({STATUS, "epsilon-total", "privacy-budget", "epsilon-next"})
