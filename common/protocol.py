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

from common import decision

STATUS = "status"  # a reply's ConfigRecord when a site declines a round: no arrays, no metrics
BUDGET_SPENT = "privacy-budget-spent"
POLICY_REFUSED = "site-policy-refused"  # the site's own policy (common/site_policy.py) does not accept the run
REFUSED_SETTING = "refused-setting"  # ... and names the run setting it refused, nothing else
# The run settings a site's policy may refuse (floors on protection, caps on what sizes memory or disk).
REFUSABLE = frozenset({"dp-enabled", "dp-target-delta", "dp-target-epsilon", "val-fraction", "image-size",
                       "num-classes", "batch-size", "local-epochs", "fine-tune-epochs", "num-server-rounds",
                       "client-threads", "secure-aggregation", "secagg-threshold",
                       "evaluations-per-round", "min-validation-images"})  # the site's evaluation allowance
SCAFFOLD_CONTROL = "scaffold-c"  # server -> site: SCAFFOLD's server control variate
SCAFFOLD_DELTA = "scaffold-delta-c"  # site -> server: the change of the site's control variate
# SecAgg+ (common/secagg.py): the stage record of every SecAgg+ message and reply, and the masked
# update (int64 field elements, indistinguishable from uniform) that replaces "arrays" in a site's reply.
SECAGG = "secagg"
SECAGG_MASKED = "secagg-masked"
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
RATE = Number(low=0, high=1)
_SCORES = ("loss", "accuracy", "auc", "dice", "iou")
_RATES = ("balanced-accuracy", "sensitivity", "specificity")  # a site's own, 3+ classes (common/scores.py)
EVALUATE_SCHEMA = ReplySchema(
    records=MappingProxyType({"metrics": "metrics"}),
    required_records=frozenset({"metrics"}),
    fields=MappingProxyType({
        "num-examples": Number(integer=True, low=0, high=MAX_EXAMPLES),  # an empty held-out split sends 0
        "site-weight": ONE,
        "auc-weight": Number(integer=True, low=0, high=MAX_EXAMPLES),
        **{k: SCORE for k in _SCORES},
        **{f"personal-{k}": SCORE for k in _SCORES},
        **{k: RATE for k in _RATES},
        **{f"personal-{k}": RATE for k in _RATES},
        **{k: RATE for k in decision.KEYS},  # two classes: the confusion grid, fractions of the split
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

# A SecAgg+ stage reply: the stage record (its fields' wire types, per stage, are SECAGG_REPLY_FIELDS:
# public keys, encrypted shares for other sites, key shares; checked by server/secagg.py) and, in the
# masked-vector stage, the masked update and the train metrics. Never an "arrays" record. Its `fields`
# name what the site's whitelist lets out; the stage fields' values are bytes and lists, checked by
# server/secagg.py against SECAGG_REPLY_FIELDS (validation.check_value speaks numbers and text only).
SECAGG_REPLY_FIELDS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "setup": MappingProxyType({"pk1": "bytes", "pk2": "bytes"}),
    "share_keys": MappingProxyType({"dsts": "ints", "ctxts": "bytes-list"}),
    "collect_masked_vectors": MappingProxyType({}),
    "unmask": MappingProxyType({"nids": "ints", "shares": "bytes-list"}),
})
SECAGG_SCHEMA = ReplySchema(
    records=MappingProxyType({SECAGG: "config", SECAGG_MASKED: "arrays", "metrics": "metrics"}),
    required_records=frozenset({SECAGG}),
    fields=MappingProxyType({**TRAIN_SCHEMA.fields, "stage": Text(frozenset(SECAGG_REPLY_FIELDS)),
                             **{k: Text(frozenset()) for f in SECAGG_REPLY_FIELDS.values() for k in f}}),
)

TRAIN_METRICS = frozenset(TRAIN_SCHEMA.fields)
EVALUATE_METRICS = frozenset(EVALUATE_SCHEMA.fields)
STATUS_FIELDS = frozenset(STATUS_SCHEMA.fields)
