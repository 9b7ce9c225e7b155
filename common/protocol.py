"""What may travel between a site and the server, named once for both sides.

A site's replies carry only model weights and the aggregate metrics listed here;
the leakage test holds every reply of a simulated run to this list.
"""

STATUS = "status"  # a reply's ConfigRecord when a site declines a round: no arrays, no metrics
BUDGET_SPENT = "privacy-budget-spent"
SCAFFOLD_CONTROL = "scaffold-c"  # server -> site: SCAFFOLD's server control variate
SCAFFOLD_DELTA = "scaffold-delta-c"  # site -> server: the change of the site's control variate

TRAIN_METRICS = frozenset({
    "num-examples", "site-weight", "train-loss", "epsilon", "epsilon-total", "noise-multiplier", "local-steps",
})
_SCORES = ("loss", "accuracy", "auc", "dice", "iou")
EVALUATE_METRICS = frozenset({
    "num-examples", "site-weight", "auc-weight", *_SCORES, *(f"personal-{k}" for k in _SCORES),
})
STATUS_FIELDS = frozenset({STATUS, "epsilon-total", "privacy-budget", "epsilon-next"})
