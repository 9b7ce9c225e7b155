"""The site's side of SecAgg+ (client/secagg.py, client/app.py): what it refuses to send, and to whom.

A site never sends an unmasked update in a run that asks for SecAgg+, refuses a plain run when its
policy requires SecAgg+, answers the stages only in order (one masked vector per round), and never
gives away both secrets of one site.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app as site_app
from client import secagg as site_secagg
from common import secagg
from common.config import RunConfig
from common.flower_compat import engine
from common.protocol import POLICY_REFUSED, REFUSED_SETTING, SECAGG, STATUS
from common.site_policy import SitePolicy, SitePolicyRefused

SETUP = {secagg.STAGE: secagg.SETUP, secagg.ROUND: 1, secagg.Key.SAMPLE_NUMBER: 3, secagg.Key.SHARE_NUMBER: 3,
         secagg.Key.THRESHOLD: 2, secagg.Key.CLIPPING_RANGE: 1.0, secagg.Key.TARGET_RANGE: 2**16,
         secagg.Key.MOD_RANGE: secagg.MOD_RANGE, secagg.Key.MAX_WEIGHT: 100}


@pytest.fixture(autouse=True)
def _as_site():
    with engine.acting_as(1, 0):
        yield


def _three_sites_through_share_keys() -> tuple[dict[int, RecordDict], dict[int, list]]:
    """Three sites' states after setup and share keys; and what the server would forward to each."""
    states = {n: RecordDict() for n in (1, 2, 3)}
    keys = {}
    for n, state in states.items():
        reply = site_secagg.answer(ConfigRecord(SETUP), state, n)[SECAGG]
        keys[str(n)] = [reply["pk1"], reply["pk2"]]
    forward: dict[int, list] = {n: [] for n in states}
    for n, state in states.items():
        reply = site_secagg.answer(ConfigRecord({secagg.STAGE: secagg.SHARE_KEYS, secagg.ROUND: 1, **keys}), state, n)
        for dst, ciphertext in zip(reply[SECAGG]["dsts"], reply[SECAGG]["ctxts"], strict=True):
            forward[dst].append((n, ciphertext))
    return states, forward


def _collect(forward, n) -> ConfigRecord:
    return ConfigRecord({secagg.STAGE: secagg.COLLECT, secagg.ROUND: 1,
                         secagg.Key.CIPHERTEXT_LIST: [c for _, c in forward[n]],
                         secagg.Key.SOURCE_LIST: [s for s, _ in forward[n]]})


def test_stages_out_of_order_are_refused_and_one_masked_vector_per_round():
    state = RecordDict()
    with pytest.raises(site_secagg.ProtocolError, match="out of order"):
        site_secagg.answer(ConfigRecord({secagg.STAGE: secagg.UNMASK, secagg.ROUND: 1,
                                         secagg.Key.ACTIVE_NODE_ID_LIST: [1, 2], secagg.Key.DEAD_NODE_ID_LIST: []}),
                           state, 1)
    states, forward = _three_sites_through_share_keys()
    update = {"w": np.zeros(4)}
    metrics = {"num-examples": 5, "site-weight": 1}
    site_secagg.masked_update(_collect(forward, 1), states[1], update, 5, metrics)
    with pytest.raises(site_secagg.ProtocolError, match="out of order"):  # a second masked vector: refused
        site_secagg.masked_update(_collect(forward, 1), states[1], update, 5, metrics)


def test_unmask_never_gives_both_secrets_of_one_site_and_the_secrets_go_after_it():
    states, forward = _three_sites_through_share_keys()
    for n in states:
        site_secagg.masked_update(_collect(forward, n), states[n], {"w": np.zeros(4)}, 5,
                                  {"num-examples": 5, "site-weight": 1})
    both = ConfigRecord({secagg.STAGE: secagg.UNMASK, secagg.ROUND: 1,
                         secagg.Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], secagg.Key.DEAD_NODE_ID_LIST: [2]})
    with pytest.raises(site_secagg.ProtocolError, match="both alive and dropped"):
        site_secagg.answer(both, states[1], 1)
    few = ConfigRecord({secagg.STAGE: secagg.UNMASK, secagg.ROUND: 1,
                        secagg.Key.ACTIVE_NODE_ID_LIST: [1], secagg.Key.DEAD_NODE_ID_LIST: [2, 3]})
    with pytest.raises(site_secagg.ProtocolError, match="fewer than the threshold"):
        site_secagg.answer(few, states[1], 1)
    fair = ConfigRecord({secagg.STAGE: secagg.UNMASK, secagg.ROUND: 1,
                         secagg.Key.ACTIVE_NODE_ID_LIST: [1, 2], secagg.Key.DEAD_NODE_ID_LIST: [3]})
    reply = site_secagg.answer(fair, states[1], 1)[SECAGG]
    assert list(reply["nids"]) == [1, 2, 3] and len(reply["shares"]) == 3
    assert site_secagg.STATE not in states[1]  # the round's secrets are gone


def test_a_site_that_requires_secagg_refuses_a_plain_run():
    strict = SitePolicy.from_mapping({"require-secure-aggregation": True, "allow-no-dp": True})
    with pytest.raises(SitePolicyRefused, match="require-secure-aggregation") as refused:
        strict.check_training(RunConfig(dp_enabled=False))
    assert refused.value.setting == "secure-aggregation"
    strict.check_training(RunConfig(dp_enabled=False, secure_aggregation="secaggplus"))
    SitePolicy.from_mapping({"allow-no-dp": True}).check_training(RunConfig(dp_enabled=False))  # default: off


def _train_request(run: RunConfig, secagg_record: ConfigRecord | None = None) -> Message:
    content = RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({**run.to_mapping(), "server-round": 1})})
    if secagg_record is not None:
        content[SECAGG] = secagg_record
    msg = Message(content=content, message_type="train", dst_node_id=1, group_id="1")
    engine.stamp_message_id(msg)
    return msg


def _context(tmp_path, **policy) -> Context:
    node = {"data-path": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"), **policy}
    return Context(1, 1, node, RecordDict(), {})


def test_the_clientapp_refuses_a_plain_train_request_in_a_secagg_run(tmp_path):
    """The run asks for SecAgg+ but the request is a plain train message: a status reply, no update."""
    run = RunConfig(dp_enabled=False, secure_aggregation="secaggplus")
    reply = site_app.app(_train_request(run), _context(tmp_path, **{"allow-no-dp": True}))
    assert set(reply.content.keys()) == {STATUS}
    assert reply.content[STATUS][STATUS] == POLICY_REFUSED
    assert reply.content[STATUS][REFUSED_SETTING] == "secure-aggregation"


def test_the_clientapp_refuses_a_plain_run_when_its_policy_requires_secagg(tmp_path):
    run = RunConfig(dp_enabled=False)
    context = _context(tmp_path, **{"allow-no-dp": True, "require-secure-aggregation": True})
    reply = site_app.app(_train_request(run), context)
    assert reply.content[STATUS][REFUSED_SETTING] == "secure-aggregation"


def test_the_clientapp_answers_setup_with_public_keys_only(tmp_path):
    run = RunConfig(dp_enabled=False, secure_aggregation="secaggplus")
    context = _context(tmp_path)
    reply = site_app.app(_train_request(run, ConfigRecord(SETUP)), context)
    assert set(reply.content.keys()) == {SECAGG}
    assert set(reply.content[SECAGG]) == {secagg.STAGE, "pk1", "pk2"}
    assert site_secagg.STATE in context.state  # its secret keys stay at the site, for the next stage


def test_a_site_refusing_the_masked_vector_stage_answers_with_a_status(hospitals, tmp_path):
    """A run the site's policy refuses (here a batch above its cap) is refused at the masked-vector stage
    with the same status as in a plain round, before any training: the server counts it as a dropout."""
    states, forward = _three_sites_through_share_keys()
    run = RunConfig(dp_enabled=False, secure_aggregation="secaggplus", batch_size=512)
    context = _context(tmp_path, **{"allow-no-dp": True})
    context.node_config["data-path"] = str(hospitals / "site-000")
    context.state = states[1]
    reply = site_app.app(_train_request(run, _collect(forward, 1)), context)
    assert set(reply.content.keys()) == {STATUS}
    assert reply.content[STATUS][STATUS] == POLICY_REFUSED
    assert reply.content[STATUS][REFUSED_SETTING] == "batch-size"
