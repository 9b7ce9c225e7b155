"""The Flower ClientApp each hospital runs: thin handlers around `client.site.Site`.

The run's settings arrive in every message's ConfigRecord (the server parsed them
once), and the site's own policy (common/site_policy.py) decides whether it accepts them:
a run asking for less protection or more resources than the site allows gets a STATUS
reply, never training. Errors are logged in full here, on the site, and leave it only as
a class name: an exception message may hold a file name. Every reply passes
`whitelisted` on its way out: only the records and fields common/protocol.py lists leave
a hospital, whatever the code above produced. Under SecAgg+ (`secure-aggregation = secaggplus`) a train
message is one of four stages: three go to client/secagg.py without touching data, the masked-vector
stage trains through the same `Site` and sends the update masked; a plain train request of such a run
is refused, so no unmasked update leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import audit, local_state
from client import secagg as site_secagg
from client.site import Site, site_from_context
from common import drift, secagg, transport
from common.config import RunConfig
from common.errors import PrivacyBudgetExceeded
from common.flower_compat import packing
from common.protocol import (
    BUDGET_SPENT,
    EVALUATE_SCHEMA,
    POLICY_REFUSED,
    REFUSED_SETTING,
    SECAGG,
    SECAGG_SCHEMA,
    STATUS,
    STATUS_SCHEMA,
    TRAIN_SCHEMA,
    ReplySchema,
)
from common.protocol import SCAFFOLD_CONTROL as CONTROL
from common.protocol import SCAFFOLD_DELTA as DELTA
from common.site_policy import SitePolicyRefused

log = logging.getLogger(__name__)
ROUND_KEY = "server-round"
AUDITED = ("num-examples", "epsilon", "epsilon-total", "noise-multiplier", "loss")  # into the site's audit log

app = ClientApp()


def _site(msg: Message, context: Context) -> tuple[Site, int]:
    settings = dict(msg.content["config"])
    server_round = int(settings.pop(ROUND_KEY, 0))
    return site_from_context(RunConfig.from_mapping(settings), context.node_config), server_round


def _guarded(handler: Callable[[Message, Context], RecordDict]) -> Callable[[Message, Context], Message]:
    """`handler` seeing plain records, answering in kind (packed when the request came packed), and failing
    with nothing but the exception's class name."""
    answer = packing.answering_in_kind(
        lambda msg, context: Message(content=whitelisted(handler(msg, context), msg.metadata.message_type),
                                     reply_to=msg))

    def run(msg: Message, context: Context) -> Message:
        try:
            return answer(msg, context)
        except Exception as exc:
            log.exception("site failed on a %s message", msg.metadata.message_type)
            raise RuntimeError(f"site failed: {type(exc).__name__} (details in the site's log)") from None

    run.__name__ = handler.__name__
    return run


def whitelisted(content: RecordDict, message_type: str) -> RecordDict:
    """`content` with only the records and fields common/protocol.py lets leave a site; anything else
    is dropped, and named in the site's log (never in the reply)."""
    schema = (STATUS_SCHEMA if STATUS in content else SECAGG_SCHEMA if SECAGG in content
              else EVALUATE_SCHEMA if "evaluate" in message_type else TRAIN_SCHEMA)
    kept = RecordDict()
    for name, record in content.items():
        if name not in schema.records:
            log.warning("dropped record %r from a %s reply: not on common/protocol.py's list", name, message_type)
            continue
        kept[name] = _fields(record, schema, name) if isinstance(record, MetricRecord | ConfigRecord) else record
    return kept


def _fields(record: MetricRecord | ConfigRecord, schema: ReplySchema, name: str) -> MetricRecord | ConfigRecord:
    dropped = sorted(k for k in record if k not in schema.fields)
    if dropped:
        log.warning("dropped %s from record %r of a reply: not on common/protocol.py's list", dropped, name)
    return type(record)({k: v for k, v in record.items() if k in schema.fields})


def _policy_refusal(site: Site, context: Context, server_round: int, refusal: SitePolicyRefused) -> RecordDict:
    """The site's policy turned the run down: one line in its log, a status reply, nothing trained."""
    log.warning("round %d refused by this site's policy: %s", server_round, refusal)
    _audit(site, context, "refused", server_round, {"policy": str(refusal)})
    return RecordDict({STATUS: ConfigRecord({STATUS: POLICY_REFUSED, REFUSED_SETTING: refusal.setting})})


@app.train()
@_guarded
def train(msg: Message, context: Context) -> RecordDict:
    request = msg.content.get(SECAGG)
    if request is not None and request.get(secagg.STAGE) != secagg.COLLECT:
        return site_secagg.answer(request, context.state, msg.metadata.dst_node_id)  # no data, no training
    site, server_round = _site(msg, context)
    try:
        if request is not None:
            return _train_masked(site, msg, context, server_round, request)
        if site.run.secure_aggregation != "off":
            raise SitePolicyRefused("secure-aggregation", "the run asks for secure aggregation but this train "
                                                          "request is not a SecAgg+ stage: no unmasked update leaves")
        return _train(site, msg, context, server_round)
    except SitePolicyRefused as refusal:
        return _policy_refusal(site, context, server_round, refusal)
    except PrivacyBudgetExceeded as refusal:
        return _budget_refusal(site, context, server_round, refusal)


def _budget_refusal(site: Site, context: Context, server_round: int, refusal: PrivacyBudgetExceeded) -> RecordDict:
    log.warning("round %d refused: %s", server_round, refusal)
    _audit(site, context, "refused", server_round, {"epsilon-total": refusal.spent, "privacy-budget": refusal.budget})
    return RecordDict({STATUS: ConfigRecord({
        STATUS: BUDGET_SPENT, "epsilon-total": refusal.spent, "privacy-budget": refusal.budget,
        "epsilon-next": refusal.would_be,
    })})


def _train_masked(site: Site, msg: Message, context: Context, server_round: int, request: ConfigRecord) -> RecordDict:
    """SecAgg+'s masked-vector stage (client/secagg.py): train as usual, then send only w·q(update) under
    masks. The update is clipped to max-update-norm first (when set): the bound the server cannot check
    on one site's update any more holds by construction."""
    site_secagg.check_collect(request, context.state)  # out of order: refused before any training
    site.admit()
    start = msg.content["arrays"]
    if site.run.dp_mode == "distributed":
        return _train_distributed(site, msg, context, server_round, request)
    arrays, metrics = site.train(start, server_round, _run_name(site, context))
    update = _update(arrays, start)
    norm = float(np.sqrt(sum(float(np.sum(np.square(u))) for u in update.values())))
    if site.run.max_update_norm and norm > site.run.max_update_norm:
        update = {k: u * (site.run.max_update_norm / norm) for k, u in update.items()}
    weight = min(int(metrics["num-examples"]), site.run.max_site_weight)
    _audit(site, context, "train", server_round, {k: metrics[k] for k in AUDITED if k in metrics})
    return site_secagg.masked_update(request, context.state, update, weight, metrics)


def _train_distributed(site: Site, msg: Message, context: Context, server_round: int,
                       request: ConfigRecord) -> RecordDict:
    """Distributed DP's masked-vector stage: one DP-SGD step carrying this site's share of the sum's noise
    (Site.train_distributed), sent as it is. No max-update-norm rescale: the step's sensitivity is bounded
    per sample by Opacus's clip, and scaling a share by its own noisy norm would change the mechanism the
    ledger accounts. The threshold and the sites sampled are the ones this site checked at setup."""
    secrets = site_secagg.SiteSecrets.load(context.state)
    site.policy.check_distributed(secrets.threshold, secrets.share_num)  # before any data is read
    start = msg.content["arrays"]
    arrays, metrics, weight = site.train_distributed(start, server_round, _run_name(site, context), secrets.threshold)
    update = _update(arrays, start)
    clipped = sum(int(np.count_nonzero(np.abs(u) > secrets.clipping_range)) for u in update.values())
    if clipped:  # the quantizer's ±c clip is not part of the mechanism: secagg-clipping-range is too small
        log.warning("round %d: %d update coordinate(s) beyond secagg-clipping-range = %g are clipped before "
                    "masking: raise it", server_round, clipped, secrets.clipping_range)
    _audit(site, context, "train", server_round,
           {**{k: metrics[k] for k in AUDITED if k in metrics}, "dp-mode": "distributed", "secagg-clipped": clipped})
    return site_secagg.masked_update(request, context.state, update, weight, metrics)


def _update(arrays: ArrayRecord, start: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arrays[k].numpy().astype(np.float64) - start[k].numpy().astype(np.float64) for k in start}


def _train(site: Site, msg: Message, context: Context, server_round: int) -> RecordDict:
    run_id = _run_name(site, context)
    control = msg.content.get(CONTROL)
    site.admit()  # before the SCAFFOLD state or the data is read
    correction, own = scaffold_correction(site, run_id, control) if control is not None else (None, None)
    arrays, metrics = site.train(msg.content["arrays"], server_round, run_id, correction)
    sent = transport.encode(arrays, msg.content["arrays"], site.run.update_dtype)
    reply = RecordDict({"arrays": sent, "metrics": MetricRecord(metrics)})
    _audit(site, context, "train", server_round, {k: metrics[k] for k in AUDITED if k in metrics})
    if control is not None:
        reply[DELTA] = scaffold_step(site, run_id, control, own, msg.content["arrays"], arrays, metrics["local-steps"])
    return reply


def scaffold_correction(site: Site, run_id: str, control: ArrayRecord) -> tuple[dict, dict]:
    """c - c_i for every parameter; c_i is this site's control variate, zero in its first round."""
    c = control.to_torch_state_dict()
    own = local_state.load(site.state, "scaffold", run_id) or {k: torch.zeros_like(v) for k, v in c.items()}
    return {k: c[k] - own[k] for k in c}, own


def scaffold_step(site: Site, run_id: str, control: ArrayRecord, own: dict, start: ArrayRecord, end: ArrayRecord,
                  steps: int) -> ArrayRecord:
    """Update c_i on the site's disk; the change delta c_i is what the server needs."""
    keys = list(own)
    c, x, y = control.to_torch_state_dict(), start.to_torch_state_dict(), end.to_torch_state_dict()
    new, delta = drift.scaffold_update([c[k] for k in keys], [own[k] for k in keys], [x[k] for k in keys],
                                       [y[k] for k in keys], steps, site.run.learning_rate)
    local_state.save(site.state, "scaffold", run_id, dict(zip(keys, new, strict=True)))
    return ArrayRecord(dict(zip(keys, delta, strict=True)))


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> RecordDict:
    site, server_round = _site(msg, context)
    try:
        metrics = site.evaluate(msg.content["arrays"], _run_name(site, context))
    except SitePolicyRefused as refusal:
        return _policy_refusal(site, context, server_round, refusal)
    _audit(site, context, "evaluate", server_round, {k: metrics[k] for k in AUDITED if k in metrics})
    return RecordDict({"metrics": MetricRecord(metrics)})


def _audit(site: Site, context: Context, event: str, server_round: int, values: dict) -> None:
    """The site's own record of what it did in which run (client/audit.py); it never leaves the site."""
    if site.run.run_name and site.run.run_name != str(context.run_id):
        values = {**values, "run-name": site.run.run_name}  # a resumed run: ε adds up under this name
    audit.record(site.state, str(context.run_id), context.node_id, event, server_round, values)


def _run_name(site: Site, context: Context) -> str:
    """The run's name in this site's ledger: the server's (kept across a resume), else Flower's run id."""
    return site.run.run_name or str(context.run_id)
