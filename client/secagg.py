"""The site's side of SecAgg+: one handler per stage, its secrets kept between messages in `context.state`.

Flower recreates the ClientApp for every message, so what a site must remember between the four stages
of a round (its two secret keys, its self-mask seed, the shares the others sent it) lives in Flower's
`context.state` (a RecordDict Flower keeps per run on the SuperNode, in memory), as Flower's own
`secaggplus_mod` keeps it, not in the site's state folder: those secrets are worth nothing after the
round, must not outlive it on the hospital's disk, and a round interrupted mid-protocol is redone from
its first stage with fresh keys anyway. They are deleted once the site has answered the unmask stage.

The stage order is enforced (setup, share keys, masked vector, unmask; setup restarts), so a server
cannot ask twice for one round's masked vector, nor for both secrets of one site: an unmask request
naming a site as both alive and dropped, or fewer live sites than the threshold, is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate

from common import secagg
from common.protocol import SECAGG, SECAGG_MASKED

log = logging.getLogger(__name__)
STATE = "secagg-state"  # the site's ConfigRecord in context.state


class ProtocolError(ValueError):
    """A SecAgg+ request this site will not answer (out of order, or asking for what would unmask it)."""


@dataclass
class SiteSecrets:
    """One round's protocol state at a site (ConfigRecord-friendly: dicts become key and value lists)."""

    stage: str = secagg.UNMASK  # the last stage answered: a new round starts with setup
    server_round: int = 0
    nid: int = 0
    share_num: int = 0
    threshold: int = 0
    clipping_range: float = 0.0
    quantization_range: int = 0
    max_weight: int = 0
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    rd_seed: bytes = b""
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> its self-mask seed's share
    sk1_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> its first secret key's share

    @classmethod
    def load(cls, state: RecordDict) -> SiteSecrets:
        if STATE not in state:
            return cls()
        r = state[STATE]
        peers = list(r["peers"])
        return cls(
            str(r["stage"]), int(r["server_round"]), int(r["nid"]), int(r["share_num"]), int(r["threshold"]),
            float(r["clipping_range"]), int(r["quantization_range"]), int(r["max_weight"]),
            bytes(r["sk1"]), bytes(r["pk1"]), bytes(r["sk2"]), bytes(r["pk2"]), bytes(r["rd_seed"]),
            dict(zip(peers, zip(r["pk1s"], r["pk2s"], strict=True), strict=True)),
            dict(zip(r["seed_owners"], r["seed_shares"], strict=True)),
            dict(zip(r["sk1_owners"], r["sk1_share_list"], strict=True)),
        )

    def save(self, state: RecordDict) -> None:
        state[STATE] = ConfigRecord({
            "stage": self.stage, "server_round": self.server_round, "nid": self.nid, "share_num": self.share_num,
            "threshold": self.threshold, "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range, "max_weight": self.max_weight,
            "sk1": self.sk1, "pk1": self.pk1, "sk2": self.sk2, "pk2": self.pk2, "rd_seed": self.rd_seed,
            "peers": list(self.public_keys), "pk1s": [k[0] for k in self.public_keys.values()],
            "pk2s": [k[1] for k in self.public_keys.values()],
            "seed_owners": list(self.seed_shares), "seed_shares": list(self.seed_shares.values()),
            "sk1_owners": list(self.sk1_shares), "sk1_share_list": list(self.sk1_shares.values()),
        })

    @property
    def settings(self) -> secagg.Settings:
        return secagg.Settings(self.threshold, self.clipping_range, self.quantization_range, self.max_weight)


def stage_of(request: ConfigRecord) -> str:
    stage = request.get(secagg.STAGE)
    if stage not in secagg.STAGES:
        raise ProtocolError(f"unknown SecAgg+ stage {stage!r}")
    return str(stage)


def check_order(secrets: SiteSecrets, stage: str, server_round: int) -> None:
    """Setup may always start a round afresh; every other stage must follow the one before, same round."""
    if stage == secagg.SETUP:
        if secrets.stage != secagg.UNMASK:
            log.warning("SecAgg+ restarted from setup in round %d (the last round stopped at %s)", server_round,
                        secrets.stage)
        return
    expected = secagg.STAGES[secagg.STAGES.index(secrets.stage) + 1] if secrets.stage != secagg.UNMASK else None
    if stage != expected or server_round != secrets.server_round:
        raise ProtocolError(f"SecAgg+ stage {stage} of round {server_round} out of order: this site last "
                            f"answered {secrets.stage} of round {secrets.server_round}")


def answer(request: ConfigRecord, state: RecordDict, nid: int) -> RecordDict:
    """Setup, share-keys and unmask requests (the masked-vector stage is `masked_update`)."""
    stage, server_round = stage_of(request), int(request[secagg.ROUND])
    secrets = SiteSecrets.load(state)
    check_order(secrets, stage, server_round)
    if stage == secagg.SETUP:
        secrets, reply = _setup(request, nid, server_round)
    elif stage == secagg.SHARE_KEYS:
        reply = _share_keys(secrets, request)
    elif stage == secagg.UNMASK:
        reply = _unmask(secrets, request)
    else:
        raise ProtocolError("the masked-vector stage needs an update: client/app.py trains first")
    secrets.stage = stage
    if stage == secagg.UNMASK:
        state.pop(STATE, None)  # the round is over: its secrets go
    else:
        secrets.save(state)
    return RecordDict({SECAGG: ConfigRecord({secagg.STAGE: stage, **reply})})


def check_collect(request: ConfigRecord, state: RecordDict) -> None:
    """Before training: the masked-vector stage is the one this site expects now."""
    check_order(SiteSecrets.load(state), stage_of(request), int(request[secagg.ROUND]))


def _setup(request: ConfigRecord, nid: int, server_round: int) -> tuple[SiteSecrets, dict]:
    secrets = SiteSecrets(
        secagg.SETUP, server_round, nid, int(request[secagg.Key.SHARE_NUMBER]), int(request[secagg.Key.THRESHOLD]),
        float(request[secagg.Key.CLIPPING_RANGE]), int(request[secagg.Key.TARGET_RANGE]),
        int(request[secagg.Key.MAX_WEIGHT]))
    if int(request[secagg.Key.MOD_RANGE]) != secagg.MOD_RANGE:
        raise ProtocolError(f"SecAgg+ field 2**{secagg.MOD_BITS} expected")
    if secrets.threshold < 2 or secrets.threshold > secrets.share_num:
        raise ProtocolError(f"threshold {secrets.threshold} of {secrets.share_num} shares: a secret would be "
                            "given away or never recovered")
    secrets.sk1, secrets.pk1 = secagg.key_pair()
    secrets.sk2, secrets.pk2 = secagg.key_pair()
    return secrets, {secagg.Key.PUBLIC_KEY_1: secrets.pk1, secagg.Key.PUBLIC_KEY_2: secrets.pk2}


def _share_keys(secrets: SiteSecrets, request: ConfigRecord) -> dict:
    """Every neighbour's public keys in; out: Shamir shares of this site's self-mask seed and first secret
    key, each encrypted for its neighbour under their ECDH key (the server only forwards them)."""
    keys = {int(k): (bytes(v[0]), bytes(v[1])) for k, v in request.items() if k not in (secagg.STAGE, secagg.ROUND)}
    if len(keys) < secrets.threshold:
        raise ProtocolError(f"{len(keys)} neighbours, fewer than the threshold {secrets.threshold}")
    if len(keys) > secrets.share_num:
        raise ProtocolError(f"{len(keys)} neighbours, more than the {secrets.share_num} shares agreed at setup")
    flat = [k for pair in keys.values() for k in pair]
    if len(set(flat)) != len(flat):
        raise ProtocolError("two public keys are identical")
    if keys.get(secrets.nid) != (secrets.pk1, secrets.pk2):
        raise ProtocolError("this site's own public keys were not forwarded as sent")
    secrets.public_keys = keys
    secrets.rd_seed = os.urandom(32)
    seed_shares = create_shares(secrets.rd_seed, secrets.threshold, len(keys))
    sk1_shares = create_shares(secrets.sk1, secrets.threshold, len(keys))
    dsts, ciphertexts = [], []
    for idx, (peer, (_, pk2)) in enumerate(keys.items()):
        if peer == secrets.nid:
            secrets.seed_shares[peer], secrets.sk1_shares[peer] = seed_shares[idx], sk1_shares[idx]
            continue
        shared = generate_shared_key(secagg.private_key(secrets.sk2), secagg.public_key(pk2))
        plaintext = share_keys_plaintext_concat(secrets.nid, peer, seed_shares[idx], sk1_shares[idx])
        dsts.append(peer)
        ciphertexts.append(encrypt(shared, plaintext))
    return {secagg.Key.DESTINATION_LIST: dsts, secagg.Key.CIPHERTEXT_LIST: ciphertexts}


def masked_update(request: ConfigRecord, state: RecordDict, update: Mapping[str, np.ndarray], weight: int,
                  metrics: Mapping[str, int | float]) -> RecordDict:
    """The masked-vector stage: the shares forwarded to this site decrypted and kept; out goes
    w·q(update) + the self mask + a pairwise mask per neighbour that shared keys, mod 2**62."""
    secrets = SiteSecrets.load(state)
    check_order(secrets, stage_of(request), int(request[secagg.ROUND]))
    ciphertexts = list(request[secagg.Key.CIPHERTEXT_LIST])
    srcs = [int(s) for s in request[secagg.Key.SOURCE_LIST]]
    if len(ciphertexts) + 1 < secrets.threshold:
        raise ProtocolError("fewer neighbours left than the threshold")
    if not 1 <= weight <= secrets.max_weight:
        raise ProtocolError(f"weight {weight} outside [1, max-site-weight {secrets.max_weight}]")
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        if src not in secrets.public_keys or src == secrets.nid:
            raise ProtocolError(f"a share from site {src}, which is no neighbour")
        shared = generate_shared_key(secagg.private_key(secrets.sk2), secagg.public_key(secrets.public_keys[src][1]))
        actual, dst, seed_share, sk1_share = share_keys_plaintext_separate(decrypt(shared, ciphertext))
        if actual != src or dst != secrets.nid:
            raise ProtocolError(f"a share from site {actual} for site {dst} arrived as from {src} for this site")
        secrets.seed_shares[src], secrets.sk1_shares[src] = seed_share, sk1_share
    names = list(update)
    vector = secagg.encode([update[k] for k in names], weight, secrets.settings)
    dims = secagg.shapes(vector)
    vector = secagg.add(vector, secagg.mask(secrets.rd_seed, dims))
    for peer in srcs:
        shared = generate_shared_key(secagg.private_key(secrets.sk1), secagg.public_key(secrets.public_keys[peer][0]))
        vector = secagg.add(vector, secagg.mask(shared, dims), 1 if secrets.nid > peer else -1)
    secrets.stage = secagg.COLLECT
    secrets.save(state)
    masked = ArrayRecord(dict(zip([secagg.WEIGHT_NAME, *names], (Array(np.ascontiguousarray(v)) for v in vector),
                                  strict=True)))
    return RecordDict({SECAGG: ConfigRecord({secagg.STAGE: secagg.COLLECT}), SECAGG_MASKED: masked,
                       "metrics": MetricRecord(dict(metrics))})


def _unmask(secrets: SiteSecrets, request: ConfigRecord) -> dict:
    """For each live neighbour its self-mask seed's share, for each dropped one its first key's share;
    never both for one site, or the server could strip every mask off that site's vector."""
    active = [int(n) for n in request[secagg.Key.ACTIVE_NODE_ID_LIST]]
    dead = [int(n) for n in request[secagg.Key.DEAD_NODE_ID_LIST]]
    if set(active) & set(dead):
        raise ProtocolError("a site named both alive and dropped: answering would unmask it")
    if len(set(active)) < secrets.threshold:
        raise ProtocolError(f"{len(set(active))} live sites, fewer than the threshold {secrets.threshold}")
    if secrets.nid not in active:
        raise ProtocolError("this site is named dropped but is answering")
    unknown = [n for n in (*active, *dead) if n not in secrets.seed_shares]
    if unknown:
        raise ProtocolError(f"no share held for site(s) {unknown}")
    return {secagg.Key.NODE_ID_LIST: active + dead,
            secagg.Key.SHARE_LIST: [secrets.seed_shares[n] for n in active] + [secrets.sk1_shares[n] for n in dead]}
