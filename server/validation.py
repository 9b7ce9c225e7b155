"""Every reply checked on its own before aggregation: one broken or hostile site must not ruin a round.

Each reply passes, inside its own guard, through:

1. the reply schema of common/protocol.py: which records, of which kind; the metrics' keys, types
   and ranges (numbers only, finite; `num-examples` a positive integer up to MAX_EXAMPLES); for a
   train reply exactly one model ArrayRecord whose names, shapes and dtypes are the global model's
   (float16 ones for floating arrays when update-dtype is float16), and SCAFFOLD's delta c, of the
   model's shapes, only under SCAFFOLD. A reply the packed wire could not unpack fails here too; an
   evaluate reply's two-class confusion grid (common/decision.py) must be one: complete, each count
   within its class's share and non-increasing as the threshold rises;
2. (validate-updates) the weights: finite, and an L2 distance from the global model no larger than
   max-update-norm (when set) and than update-norm-ratio x the others' (the median of all updates with
   3 or more, the other update with 2: of two sites the one moving the model ten times further is
   dropped; a site sending almost no change can so drop an honest one, which stalls a round but
   poisons nothing);
3. across the round's replies: the same metric keys as most replies (Flower's FedAvg refuses to
   aggregate otherwise: one site's extra key would end the run).

A reply that fails becomes a rejection, {node, phase, class, reason} with class one of REASONS, and is
left out of the round; nothing here raises for a reply, whatever it holds (an unexpected exception
in one reply's check rejects that reply, class "error"). An accepted reply's `num-examples` is capped
at max-site-weight: the weighted mean gives no site more say than that. Sign-flipped or subtly
poisoned updates pass these checks by design: that is what the robust strategies are for.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import decision, transport
from common.config import RunConfig
from common.protocol import (
    EVALUATE_SCHEMA,
    SCAFFOLD_DELTA,
    STATUS,
    STATUS_SCHEMA,
    TRAIN_SCHEMA,
    UNREADABLE,
    Field,
    Number,
    ReplySchema,
)

log = logging.getLogger(__name__)
REASONS = ("unpack", "schema", "non-finite", "norm", "error")
WEIGHT_KEY = "num-examples"
_KINDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "config": ConfigRecord}
T = TypeVar("T")


class Rejected(Exception):
    """Raised inside one reply's check; becomes that reply's rejection."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check, self.reason = check, reason


@dataclass(frozen=True)
class Limits:
    """The run settings the checks need."""

    ratio: float = 10.0
    max_norm: float = 0.0
    max_weight: int = 1_000_000
    validate: bool = True
    float16: bool = False
    scaffold: bool = False

    @classmethod
    def of(cls, cfg: RunConfig) -> Limits:
        return cls(cfg.update_norm_ratio, cfg.max_update_norm, cfg.max_site_weight, cfg.validate_updates,
                   cfg.update_dtype == "float16", cfg.strategy == "scaffold")


@dataclass
class Screened:
    accepted: list[Message] = field(default_factory=list)  # error replies included: the strategy counts them
    refusals: list[Message] = field(default_factory=list)  # well-formed refusal statuses
    rejected: list[dict[str, Any]] = field(default_factory=list)


def screen_train(replies: list[Message], global_arrays: ArrayRecord, limits: Limits) -> Screened:
    """Split a round's train replies into accepted updates, refusals and rejections."""
    reference = {k: a.numpy() for k, a in global_arrays.items()}
    out, norms = Screened(), {}
    for msg in replies:
        if msg.has_error():
            out.accepted.append(msg)
            continue
        outcome = _guarded(out, msg, "train", lambda m: _train_reply(m, global_arrays, reference, limits))
        if outcome == "refusal":
            out.refusals.append(msg)
        elif outcome is not None:
            out.accepted.append(msg)
            norms[id(msg)] = outcome
    _drop_inconsistent(out, "train")
    if limits.validate:
        _drop_outliers(out, norms, limits.ratio)
    _cap_weights(out.accepted, limits.max_weight)
    return out


def screen_evaluate(replies: list[Message], limits: Limits) -> Screened:
    """The round's evaluate replies that keep to the schema; the rest rejected."""
    out = Screened()
    for msg in replies:
        outcome = None if msg.has_error() else _guarded(out, msg, "evaluate", _evaluate_reply)
        if outcome == "refusal":
            out.refusals.append(msg)
        elif msg.has_error() or outcome is not None:
            out.accepted.append(msg)
    _drop_inconsistent(out, "evaluate")
    _cap_weights(out.accepted, limits.max_weight)
    return out


def _guarded(out: Screened, msg: Message, phase: str, check: Callable[[Message], T]) -> T | None:
    """`check(msg)`, or None with the reply recorded as rejected: nothing one reply holds raises past here."""
    try:
        return check(msg)
    except Rejected as bad:
        _reject(out, msg, phase, bad.check, bad.reason)
    except Exception as exc:  # a check that breaks on a reply rejects that reply only
        log.exception("checking a %s reply from site %s failed", phase, msg.metadata.src_node_id)
        _reject(out, msg, phase, "error", f"{type(exc).__name__}: {exc}")
    return None


def _reject(out: Screened, msg: Message, phase: str, check: str, reason: str) -> None:
    out.rejected.append({"node": msg.metadata.src_node_id, "phase": phase, "class": check, "reason": reason[:300]})


def _train_reply(msg: Message, global_arrays: ArrayRecord, reference: dict[str, np.ndarray],
                 limits: Limits) -> str | float:
    """"refusal" for a well-formed refusal status; else the update's norm (0.0 without validation)."""
    content = _readable(msg)
    if STATUS in content:
        check_schema(content, STATUS_SCHEMA)
        return "refusal"
    check_schema(content, TRAIN_SCHEMA, extra=frozenset({SCAFFOLD_DELTA}) if limits.scaffold else frozenset())
    if SCAFFOLD_DELTA in content and not limits.scaffold:
        raise Rejected("schema", f"record '{SCAFFOLD_DELTA}' is only sent under strategy = scaffold")
    check_arrays(content["arrays"], model_form(reference, limits.float16))
    if SCAFFOLD_DELTA in content:
        check_arrays(content[SCAFFOLD_DELTA], model_form(reference), finite=True, what="delta c: ")
    if limits.float16:
        content["arrays"] = transport.decode(content["arrays"], global_arrays)
    if not limits.validate:
        return 0.0
    check_arrays(content["arrays"], model_form(reference), finite=True)
    norm = update_norm(content["arrays"], reference)
    if limits.max_norm and norm > limits.max_norm:
        raise Rejected("norm", f"update norm {norm:.3g} > max-update-norm {limits.max_norm:g}")
    return norm


def _evaluate_reply(msg: Message) -> str:
    """"refusal" for a well-formed refusal status (a site's policy may decline to evaluate), else "ok"."""
    content = _readable(msg)
    if STATUS in content:
        check_schema(content, STATUS_SCHEMA)
        return "refusal"
    check_schema(content, EVALUATE_SCHEMA)
    why = decision.inconsistent(next(iter(content.metric_records.values())))
    if why:
        raise Rejected("schema", why)
    return "ok"


def _readable(msg: Message) -> RecordDict:
    content = msg.content
    if UNREADABLE in content:
        reason = content[UNREADABLE].get("reason", "") if isinstance(content[UNREADABLE], ConfigRecord) else ""
        raise Rejected("unpack", f"the reply could not be unpacked: {reason}")
    return content


def check_schema(content: RecordDict, schema: ReplySchema, extra: frozenset[str] = frozenset()) -> None:
    """Records by name and kind, then the fields of the schema's one MetricRecord or ConfigRecord."""
    names = set(content.keys())
    unknown = sorted(names - set(schema.records))
    if unknown:
        raise Rejected("schema", f"record(s) {', '.join(map(repr, unknown))} not in the protocol")
    missing = sorted((schema.required_records | extra) - names)
    if missing:
        raise Rejected("schema", f"record(s) {', '.join(map(repr, missing))} missing")
    for name, kind in schema.records.items():
        if name in names and not isinstance(content[name], _KINDS[kind]):
            raise Rejected("schema", f"record '{name}' is a {type(content[name]).__name__}, not {kind}")
    for name, kind in schema.records.items():
        if kind != "arrays" and name in names:
            check_fields(content[name], schema)


def check_fields(values: Mapping[str, Any], schema: ReplySchema) -> None:
    unknown = sorted(set(values) - set(schema.fields))
    if unknown:
        raise Rejected("schema", f"field(s) {', '.join(map(repr, unknown))} not in the protocol")
    missing = sorted(schema.required_fields - set(values))
    if missing:
        raise Rejected("schema", f"field(s) {', '.join(map(repr, missing))} missing")
    for key, value in values.items():
        check_value(key, value, schema.fields[key])


def check_value(key: str, value: Any, spec: Field) -> None:
    if not isinstance(spec, Number):
        if not isinstance(value, str) or value not in spec.values:
            raise Rejected("schema", f"'{key}' = {value!r:.40} is not one of {sorted(spec.values)}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected("schema", f"'{key}' is a {type(value).__name__}, not a number")
    if math.isnan(value) or (math.isinf(value) and not spec.inf_ok):
        raise Rejected("non-finite", f"'{key}' = {value}")
    if spec.integer and not isinstance(value, int):
        raise Rejected("schema", f"'{key}' = {value!r} is not an integer")
    if not spec.low <= value <= spec.high:
        raise Rejected("schema", f"'{key}' = {value!r} is outside [{spec.low:g}, {spec.high:g}]")


Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]


def model_form(reference: dict[str, np.ndarray], float16: bool = False) -> Shapes:
    """Each array's shape and dtype as a site sends it: float16 floating arrays on float16 transport."""
    half = np.dtype(np.float16)
    return {k: (v.shape, half if float16 and np.issubdtype(v.dtype, np.floating) else v.dtype)
            for k, v in reference.items()}


def check_arrays(arrays: ArrayRecord, expected: Shapes, finite: bool = False, what: str = "") -> None:
    """The names, shapes and dtypes of `expected`; with `finite`, no NaN or inf."""
    if set(arrays.keys()) != set(expected):
        raise Rejected("schema", f"{what}weights do not match the model's names")
    for key, (shape, dtype) in expected.items():
        value = arrays[key].numpy()
        if value.shape != shape or value.dtype != dtype:
            raise Rejected("schema", f"{what}{key}: {value.dtype}{list(value.shape)} instead of {dtype}{list(shape)}")
        if finite and not np.isfinite(value).all():
            raise Rejected("non-finite", f"{what}{key}: non-finite values")


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """The L2 distance of the sent weights from the global model's, over every array."""
    total = sum(float(np.square(arrays[k].numpy().astype(np.float64) - ref).sum()) for k, ref in reference.items())
    return math.sqrt(total)


def _drop_outliers(out: Screened, norms: dict[int, float], ratio: float) -> None:
    """An update far larger than the others: 3+ updates against their median, 2 against each other."""
    norms = {id(m): norms[id(m)] for m in out.accepted if id(m) in norms}
    if len(norms) < 2:
        return
    for msg in [m for m in out.accepted if id(m) in norms]:
        others = [n for i, n in norms.items() if i != id(msg)] if len(norms) == 2 else list(norms.values())
        median = float(np.median(others))
        if norms[id(msg)] > ratio * max(median, 1e-12):
            out.accepted.remove(msg)
            _reject(out, msg, "train", "norm", f"update norm {norms[id(msg)]:.3g} > {ratio:g} x "
                                                f"{'the other' if len(norms) == 2 else 'median'} {median:.3g}")


def _drop_inconsistent(out: Screened, phase: str) -> None:
    """Keep the replies with the most common metric keys (ties: the first site's): FedAvg needs one key set."""
    keyed = [(m, frozenset(next(iter(m.content.metric_records.values())).keys()))
             for m in out.accepted if not m.has_error()]
    if not keyed:
        return
    counts = Counter(keys for _, keys in keyed)
    best = max(counts.values())
    common = next(keys for _, keys in keyed if counts[keys] == best)
    for msg, keys in keyed:
        if keys != common:
            out.accepted.remove(msg)
            differ = sorted(keys ^ common)
            _reject(out, msg, phase, "schema", f"metric keys differ from the other sites': {', '.join(differ)}")


def _cap_weights(replies: list[Message], cap: int) -> None:
    """At most `cap` for any site's `num-examples`: its say in the weighted mean is bounded."""
    for msg in replies:
        if msg.has_error():
            continue
        metrics = next(iter(msg.content.metric_records.values()))
        if metrics[WEIGHT_KEY] > cap:
            log.info("site %s: num-examples %s counted as %d (max-site-weight)", msg.metadata.src_node_id,
                     metrics[WEIGHT_KEY], cap)
            metrics[WEIGHT_KEY] = cap
