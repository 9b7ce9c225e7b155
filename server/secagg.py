"""The server's side of SecAgg+: one train round as four message rounds, and only the sum ever unmasked.

`train` replaces a plain round's send-and-screen (server/app.py `play_round`) when the run sets
`secure-aggregation = secaggplus`. The strategy samples the sites and builds their train messages as
usual; then, as in Flower's legacy `SecAggPlusWorkflow` (whose stages and checks this follows):

1. setup: the protocol settings out, two public keys per site back;
2. share keys: every site gets its neighbours' public keys and sends each of them, encrypted, a
   Shamir share of its self-mask seed and of its first secret key (the server only forwards them);
3. masked vectors: the train message plus the shares addressed to the site; the site trains and
   answers w·q(Δ) plus masks, mod 2**62 (client/secagg.py). A site that refuses (budget, policy) or
   fails here is a dropout;
4. unmask: each survivor sends the shares that remove the survivors' self masks and the dropouts'
   pairwise masks; with `secagg-threshold` shares per secret the masks cancel, and the weighted
   mean update Δ̄ = Σ w·Δ / Σ w is all that is ever decoded.

Every neighbour is every other sampled site (the complete graph: at a consortium's size SecAgg+'s
sparse graph saves little). What can still be checked on a sum is: the masked replies' form (names,
shapes, the field's dtype and range), the unmasked mean's shape, finiteness and norm (at most
max-update-norm, which each site's clipping guarantees for its own update). The strategy then
aggregates the survivors' replies, each carrying global + Δ̄, so FedAvg's weighted mean of equal
arrays is global + Δ̄ and the server optimizers (FedAdam & co.) see the same pseudo-gradient. A round
interrupted mid-protocol (the server stopped) holds nothing in the checkpoint: resume redoes it from setup.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid

from common import secagg
from common.config import RunConfig
from common.protocol import (
    SECAGG,
    SECAGG_MASKED,
    SECAGG_REPLY_FIELDS,
    SECAGG_SCHEMA,
    STATUS,
    STATUS_SCHEMA,
    TRAIN_SCHEMA,
)
from server import validation
from server.validation import Rejected, Screened

log = logging.getLogger(__name__)
TRAIN = "train"
_WIRE = {"bytes": lambda v: isinstance(v, bytes),
         "ints": lambda v: isinstance(v, list) and all(type(x) is int for x in v),
         "bytes-list": lambda v: isinstance(v, list) and all(isinstance(x, bytes) for x in v)}


@dataclass
class Protocol:
    """One round's server-side state: who is still in after each stage, and what they sent."""

    settings: secagg.Settings
    server_round: int
    timeout: float
    train_messages: dict[int, Message]
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # after setup
    shared_to: dict[int, set[int]] = field(default_factory=dict)  # after share keys: owner -> holders of its shares
    forward: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # dst -> (src, ciphertext)
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)  # the masked vectors (never decoded alone)
    screened: Screened = field(default_factory=Screened)

    @property
    def sampled(self) -> list[int]:
        return sorted(self.train_messages)


def train(grid: Grid, messages: Iterable[Message], global_arrays: ArrayRecord, cfg: RunConfig,
          server_round: int) -> tuple[Screened, str]:
    """One SecAgg+ train round: (the screened replies, as `validation.screen_train` gives them, each
    accepted one carrying global + the mean update; why the round failed, or "")."""
    train_messages = {m.metadata.dst_node_id: m for m in messages}
    settings = secagg.Settings.of(cfg)
    settings.check(len(train_messages))
    if 2 * settings.threshold <= len(train_messages):
        log.warning("round %d: secagg-threshold = %d is not above half the %d sites: a server lying about who "
                    "dropped could collect both secrets of one site (docs/secure-aggregation.md)", server_round,
                    settings.threshold, len(train_messages))
    p = Protocol(settings, server_round, cfg.round_timeout_s, train_messages)
    names = list(global_arrays)
    for stage in (_setup, _share_keys, _collect):
        why = stage(grid, p, names)
        if why:
            return p.screened, _failed(server_round, why)
    try:
        mean = _unmask(grid, p, names)
    except Rejected as bad:
        return p.screened, _failed(server_round, bad.reason)
    why = _check_mean(mean, names, cfg)
    if why:
        return p.screened, _failed(server_round, why)
    aggregate = ArrayRecord({k: Array((global_arrays[k].numpy() + mean[i]).astype(global_arrays[k].numpy().dtype))
                             for i, k in enumerate(names)})
    for msg in p.screened.accepted:
        if not msg.has_error():  # num-examples capped as in a plain round: the metrics' weights too
            metrics = msg.content["metrics"]
            metrics["num-examples"] = min(int(metrics["num-examples"]), cfg.max_site_weight)
            msg.content = RecordDict({"arrays": copy.deepcopy(aggregate), "metrics": metrics})
    log.info("round %d: SecAgg+ sum of %d sites unmasked (%d dropped after sharing keys)", server_round,
             len(p.masked), len(p.shared_to) - len(p.masked))
    return p.screened, ""


def _failed(server_round: int, why: str) -> str:
    log.error("round %d: secure aggregation failed, the global model stays as it was: %s", server_round, why)
    return f"secure aggregation failed: {why}"


def _request(p: Protocol, nid: int, stage: str, values: dict[str, Any]) -> Message:
    content = RecordDict({SECAGG: ConfigRecord({secagg.STAGE: stage, secagg.ROUND: p.server_round, **values})})
    return Message(content=content, message_type=TRAIN, dst_node_id=nid, group_id=str(p.server_round))


def _exchange(grid: Grid, p: Protocol, stage: str, requests: list[Message]) -> dict[int, Message]:
    """Send one stage, return the well-formed replies by site; the others are dropouts (logged, and
    rejections when malformed). A refusal is a dropout too, kept with the round's refusals."""
    good = {}
    for msg in grid.send_and_receive(requests, timeout=p.timeout):
        nid = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("round %d: site %s dropped out at SecAgg+ %s: %s", p.server_round, nid, stage,
                        msg.error.reason)
            if stage == secagg.COLLECT:
                p.screened.accepted.append(msg)  # counted as a failed site, as a plain round counts it
            continue
        try:
            if STATUS in msg.content:
                validation.check_schema(msg.content, STATUS_SCHEMA)
                p.screened.refusals.append(msg)
                continue
            _check_reply(msg.content, stage, p)
        except Rejected as bad:
            _reject(p, nid, bad.check, f"SecAgg+ {stage}: {bad.reason}")
            continue
        good[nid] = msg
    return good


def _reject(p: Protocol, nid: int, check: str, reason: str) -> None:
    """A malformed reply: that site is left out of the rest of the round, as validation.py records it."""
    p.screened.rejected.append({"node": nid, "phase": TRAIN, "class": check, "reason": reason[:300]})


def _check_reply(content: RecordDict, stage: str, p: Protocol) -> None:
    unknown = sorted(set(content.keys()) - set(SECAGG_SCHEMA.records))
    if unknown or SECAGG not in content or not isinstance(content[SECAGG], ConfigRecord):
        raise Rejected("schema", f"records {sorted(content.keys())} are not a SecAgg+ reply")
    record = content[SECAGG]
    wanted = SECAGG_REPLY_FIELDS[stage]
    if record.get(secagg.STAGE) != stage or set(record) != {secagg.STAGE, *wanted}:
        raise Rejected("schema", f"fields {sorted(record)} are not the {stage} reply's")
    for key, wire in wanted.items():
        if not _WIRE[wire](record[key]):
            raise Rejected("schema", f"'{key}' is not {wire}")
    if stage == secagg.COLLECT:
        if set(content.keys()) != {SECAGG, SECAGG_MASKED, "metrics"}:
            raise Rejected("schema", "a masked-vector reply holds the stage, the masked vector and the metrics")
        validation.check_fields(content["metrics"], TRAIN_SCHEMA)
    elif set(content.keys()) != {SECAGG}:
        raise Rejected("schema", f"a {stage} reply holds the stage record only")


def _setup(grid: Grid, p: Protocol, names: list[str]) -> str:
    s = p.settings
    values = {secagg.Key.SAMPLE_NUMBER: len(p.sampled), secagg.Key.SHARE_NUMBER: len(p.sampled),
              secagg.Key.THRESHOLD: s.threshold, secagg.Key.CLIPPING_RANGE: s.clipping_range,
              secagg.Key.TARGET_RANGE: s.quantization_range, secagg.Key.MOD_RANGE: secagg.MOD_RANGE,
              secagg.Key.MAX_WEIGHT: s.max_weight}
    replies = _exchange(grid, p, secagg.SETUP, [_request(p, nid, secagg.SETUP, values) for nid in p.sampled])
    seen: set[bytes] = set()
    for nid, msg in replies.items():
        record = msg.content[SECAGG]
        keys = (record[secagg.Key.PUBLIC_KEY_1], record[secagg.Key.PUBLIC_KEY_2])
        why = _bad_keys(keys, seen)
        if why:  # left out here, or every other site would fail on its keys in the next stage
            _reject(p, nid, "schema", f"SecAgg+ setup: {why}")
            continue
        seen.update(keys)
        p.keys[nid] = keys
    return _enough(p, p.keys, "setup")


def _bad_keys(keys: tuple[bytes, bytes], seen: set[bytes]) -> str:
    if keys[0] == keys[1] or seen & set(keys):
        return "a public key sent twice"
    try:
        if any(secagg.public_key(k).curve.name != "secp384r1" for k in keys):
            return "a public key not on SECP384R1"
    except ValueError:
        return "a public key that does not parse"
    return ""


def _enough(p: Protocol, alive: Any, stage: str) -> str:
    if len(alive) < p.settings.threshold:
        return f"{len(alive)} sites left after {stage}, fewer than secagg-threshold = {p.settings.threshold}"
    return ""


def _share_keys(grid: Grid, p: Protocol, names: list[str]) -> str:
    keyed = sorted(p.keys)
    listing = {str(nid): list(p.keys[nid]) for nid in keyed}
    replies = _exchange(grid, p, secagg.SHARE_KEYS, [_request(p, nid, secagg.SHARE_KEYS, listing) for nid in keyed])
    p.forward = {nid: [] for nid in replies}
    for src, msg in replies.items():
        record = msg.content[SECAGG]
        dsts, ciphertexts = record[secagg.Key.DESTINATION_LIST], record[secagg.Key.CIPHERTEXT_LIST]
        if len(dsts) != len(ciphertexts) or set(dsts) != set(keyed) - {src}:
            _reject(p, src, "schema", "SecAgg+ share_keys: shares not addressed to every other site")
            continue
        p.shared_to[src] = set(dsts) | {src}
        for dst, ciphertext in zip(dsts, ciphertexts, strict=True):
            if dst in p.forward:
                p.forward[dst].append((src, ciphertext))
    for dst in p.forward:  # a site's shares from sources that were themselves rejected never travel
        p.forward[dst] = [(s, c) for s, c in p.forward[dst] if s in p.shared_to]
    return _enough(p, p.shared_to, "share keys")


def _collect(grid: Grid, p: Protocol, names: list[str]) -> str:
    requests = []
    for nid in sorted(set(p.shared_to) & set(p.forward)):
        train_msg = p.train_messages[nid]
        content = RecordDict(dict(train_msg.content.items()))  # the strategy's messages share one RecordDict
        content[SECAGG] = ConfigRecord({
            secagg.STAGE: secagg.COLLECT, secagg.ROUND: p.server_round,
            secagg.Key.CIPHERTEXT_LIST: [c for _, c in p.forward[nid]],
            secagg.Key.SOURCE_LIST: [s for s, _ in p.forward[nid]]})
        requests.append(Message(content=content, message_type=train_msg.metadata.message_type, dst_node_id=nid,
                                group_id=str(p.server_round)))
    expected = [secagg.WEIGHT_NAME, *names]
    for nid, msg in _exchange(grid, p, secagg.COLLECT, requests).items():
        arrays = msg.content[SECAGG_MASKED]
        try:
            if list(arrays) != expected:
                raise Rejected("schema", "the masked vector's arrays are not the model's")
            vector = [arrays[k].numpy() for k in expected]
            shapes = [(1,)] + [tuple(p.train_messages[nid].content["arrays"][k].shape) for k in names]
            for v, shape in zip(vector, shapes, strict=True):
                if v.dtype != np.int64 or tuple(v.shape) != shape or (v.size and (v.min() < 0 or
                                                                                     v.max() >= secagg.MOD_RANGE)):
                    raise Rejected("schema", "a masked array is not the model's shape in the field")
        except Rejected as bad:
            _reject(p, nid, bad.check, f"SecAgg+ masked vector: {bad.reason}")
            continue
        p.masked[nid] = vector
        p.screened.accepted.append(msg)
    return _enough(p, p.masked, "the masked vectors")


def _unmask(grid: Grid, p: Protocol, names: list[str]) -> list[np.ndarray]:
    """Survivors' shares in, masks off the sum: each survivor's self mask, each dropout's pairwise masks
    with the survivors that masked against it. Raises Rejected when a secret cannot be recovered."""
    alive = set(p.masked)
    dead = set(p.shared_to) - alive  # shared keys, so the survivors masked against them
    requests = []
    for nid in sorted(alive):
        holds = {src for src, _ in p.forward[nid]} | {nid}  # whose shares this site holds
        requests.append(_request(p, nid, secagg.UNMASK, {
            secagg.Key.ACTIVE_NODE_ID_LIST: sorted(alive & holds), secagg.Key.DEAD_NODE_ID_LIST: sorted(dead & holds)}))
    shares: dict[int, list[bytes]] = {nid: [] for nid in alive | dead}
    for msg in _exchange(grid, p, secagg.UNMASK, requests).values():
        record = msg.content[SECAGG]
        for owner, share in zip(record[secagg.Key.NODE_ID_LIST], record[secagg.Key.SHARE_LIST], strict=False):
            if owner in shares:
                shares[owner].append(share)
    total = None
    for vector in p.masked.values():
        total = vector if total is None else secagg.add(total, vector)
    dims = secagg.shapes(total)
    for nid, owned in sorted(shares.items()):
        if len(owned) < p.settings.threshold:
            raise Rejected("secagg", f"{len(owned)} shares of site {nid}'s secret, fewer than secagg-threshold = "
                                     f"{p.settings.threshold}")
        secret = combine_shares(owned)
        if nid in alive:
            total = secagg.add(total, secagg.mask(secret, dims), -1)
            continue
        for peer in sorted(alive & p.shared_to[nid]):  # a survivor added +mask if peer > nid, else -mask
            shared = generate_shared_key(secagg.private_key(secret), secagg.public_key(p.keys[peer][0]))
            total = secagg.add(total, secagg.mask(shared, dims), -1 if peer > nid else 1)
    try:
        mean, weight = secagg.decode(total, p.settings)
    except ValueError as exc:  # a site's masked vector was not what it claimed: the masks did not cancel
        raise Rejected("secagg", str(exc)) from None
    log.debug("round %d: unmasked total weight %d", p.server_round, weight)
    return mean


def _check_mean(mean: list[np.ndarray], names: list[str], cfg: RunConfig) -> str:
    """What can be checked on a sum: finite, and the mean update's norm within max-update-norm (each site
    clipped its own to it before masking, so their mean cannot exceed it unless a site lied)."""
    if len(mean) != len(names):
        return "the unmasked sum does not have the model's arrays"
    bad = [k for k, a in zip(names, mean, strict=True) if not np.isfinite(a).all()]
    if bad:
        return f"non-finite mean update: {', '.join(bad[:3])}"
    norm = float(np.sqrt(sum(float(np.sum(np.square(a))) for a in mean)))
    if cfg.validate_updates and cfg.max_update_norm and norm > cfg.max_update_norm * (1 + 1e-6) + \
            secagg.Settings.of(cfg).step * np.sqrt(sum(a.size for a in mean)):
        return f"mean update norm {norm:.3g} > max-update-norm {cfg.max_update_norm:g}"
    return ""
