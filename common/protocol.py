"""What may travel between a site and the server, named once for both sides.

A site's replies carry only model weights and the aggregate metrics listed here;
the leakage test holds every reply of a simulated run to this list, and the server
rejects any reply that breaks it (server/validation.py). The lists are declarative:
a new metric is one line in TRAIN_SCHEMA or EVALUATE_SCHEMA, with its type and range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

STATUS = "status"  # a reply's ConfigRecord when a site declines a round: no arrays, no metrics
BUDGET_SPENT = "privacy-budget-spent"
POLICY_REFUSED = "site-policy-refused"  # the site's own policy (common/site_policy.py) does not accept the run
REFUSED_SETTING = "refused-setting"  # ... and names the run setting it refused, nothing else
# The run settings a site's policy may refuse (floors on protection, caps on what sizes memory or disk).
REFUSABLE = frozenset({"dp-enabled", "dp-target-delta", "dp-target-epsilon", "val-fraction", "image-size",
                       "num-classes", "batch-size", "local-epochs", "fine-tune-epochs", "num-server-rounds",
                       "client-threads",
                       "evaluations-per-round", "min-validation-images"})  # the site's evaluation allowance
SCAFFOLD_CONTROL = "scaffold-c"  # server -> site: SCAFFOLD's server control variate
SCAFFOLD_DELTA = "scaffold-delta-c"  # site -> server: the change of the site's control variate
# A record name no site sends: the server's packed wire (flower_compat/packed_grid.py) puts the reason
# here, in place of the content, when a reply cannot be unpacked, so the schema rejects that reply alone.
UNREADABLE = "fedhosp-unreadable"
# No hospital holds a billion images: a larger count is a broken or lying site, not a big one.
MAX_EXAMPLES = 10**9


@dataclass(frozen=True)
class Number:
    """One numeric field: int or float, within [low, high]; `inf_ok` where ±inf is an honest value."""

    integer: bool = False
    low: float = -math.inf
    high: float = math.inf
    inf_ok: bool = False


@dataclass(frozen=True)
class Text:
    """One string field, one of `values`."""

    values: frozenset[str]


Field = Number | Text
Kind = Literal["arrays", "metrics", "config"]


@dataclass(frozen=True)
class ReplySchema:
    """One kind of reply: its records (name -> kind), which must be there, and the fields of its
    one MetricRecord or ConfigRecord (`fields`; `required` of them always present)."""

    records: Mapping[str, Kind]
    required_records: frozenset[str]
    fields: Mapping[str, Field]
    required_fields: frozenset[str] = field(default_factory=frozenset)


COUNT = Number(integer=True, low=1, high=MAX_EXAMPLES)  # the aggregation weight: a positive bounded integer
ONE = Number(integer=True, low=1, high=1)  # site-weight: uniform weighting needs every site to send 1
STEPS = Number(integer=True, low=0, high=MAX_EXAMPLES)
EPSILON = Number(low=0)
SCORE = Number()

TRAIN_SCHEMA = ReplySchema(
    records=MappingProxyType({"arrays": "arrays", "metrics": "metrics", SCAFFOLD_DELTA: "arrays"}),
    required_records=frozenset({"arrays", "metrics"}),
    fields=MappingProxyType({
        "num-examples": COUNT,
        "site-weight": ONE,
        "train-loss": SCORE,
        "epsilon": EPSILON,
        "epsilon-total": EPSILON,
        "noise-multiplier": Number(low=0),
        "local-steps": STEPS,
    }),
    required_fields=frozenset({"num-examples", "site-weight"}),
)
_SCORES = ("loss", "accuracy", "auc", "dice", "iou")
EVALUATE_SCHEMA = ReplySchema(
    records=MappingProxyType({"metrics": "metrics"}),
    required_records=frozenset({"metrics"}),
    fields=MappingProxyType({
        "num-examples": Number(integer=True, low=0, high=MAX_EXAMPLES),  # an empty held-out split sends 0
        "site-weight": ONE,
        "auc-weight": Number(integer=True, low=0, high=MAX_EXAMPLES),
        **{k: SCORE for k in _SCORES},
        **{f"personal-{k}": SCORE for k in _SCORES},
    }),
    required_fields=frozenset({"num-examples", "site-weight"}),
)
# A refusal (of a train or an evaluate request): its budget spent (without DP a site with a budget would
# spend ε = inf, and says so in epsilon-next), or its policy refusing one setting.
STATUS_SCHEMA = ReplySchema(
    records=MappingProxyType({STATUS: "config"}),
    required_records=frozenset({STATUS}),
    fields=MappingProxyType({
        STATUS: Text(frozenset({BUDGET_SPENT, POLICY_REFUSED})),
        REFUSED_SETTING: Text(REFUSABLE),
        "epsilon-total": Number(low=0, inf_ok=True),
        "privacy-budget": Number(low=0, inf_ok=True),
        "epsilon-next": Number(low=0, inf_ok=True),
    }),
    required_fields=frozenset({STATUS}),
)

TRAIN_METRICS = frozenset(TRAIN_SCHEMA.fields)
EVALUATE_METRICS = frozenset(EVALUATE_SCHEMA.fields)
STATUS_FIELDS = frozenset(STATUS_SCHEMA.fields)
