"""The site's audit trail: what the ClientApp appends on the site's disk, and the per-run summary."""

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import audit
from client.app import app as client_app
from common import app_bundle
from common.config import RunConfig
from common.flower_compat.engine import acting_as
from common.models import build_model
from common.weights import plain_state_dict


def test_every_train_and_evaluate_is_appended_and_folded_per_run(tmp_path, hospitals):
    state = tmp_path / "state"
    node_config = {"data-path": str(hospitals / "site-000"), "state-dir": str(state), "device": "cpu",
                   "min-validation-images": 0}  # 6 validation images
    cfg = RunConfig(num_server_rounds=2, local_epochs=1, dp_target_epsilon=4.0, client_threads=1)
    weights = ArrayRecord(torch_state_dict=plain_state_dict(build_model("classification", "cnn", image_size=32)))
    for run_id, kinds in ((11, ("train", "evaluate", "train")), (12, ("evaluate",))):
        for server_round, kind in enumerate(kinds, start=1):
            with acting_as(run_id, 0, server_round):  # the server's message to node 5
                msg = Message(RecordDict({"arrays": weights, "config": ConfigRecord(
                    {**cfg.to_mapping(), "server-round": server_round})}), dst_node_id=5, message_type=kind)
            context = Context(run_id=run_id, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
            with acting_as(run_id, 5, server_round):  # node 5 answers it
                reply = client_app(msg, context)
            assert not reply.has_error(), reply.error if reply.has_error() else ""

    lines = [json.loads(line) for line in (state / audit.AUDIT_LOG).read_text().splitlines()]
    assert [(r["run-id"], r["event"], r["round"]) for r in lines] == [
        ("11", "train", 1), ("11", "evaluate", 2), ("11", "train", 3), ("12", "evaluate", 1)]
    assert all(r["node-id"] == 5 and len(r["code-sha256"]) == 64 for r in lines)
    assert lines[2]["epsilon"] > lines[0]["epsilon"] > 0  # ε accumulates over the run's rounds
    runs = audit.summary(state)
    assert [r["run-id"] for r in runs] == ["11", "12"]
    assert runs[0]["rounds"] == [1, 3] and runs[0]["evaluations"] == 1
    assert runs[0]["epsilon"] == lines[2]["epsilon"] and runs[1]["epsilon"] is None
    forbidden = str(hospitals)  # paths and file names stay out of the audit lines: only ids and numbers
    assert forbidden not in (state / audit.AUDIT_LOG).read_text()


def test_app_identity_hashes_the_site_code_and_carries_the_guards_verdict(tmp_path, monkeypatch):
    app_dir = tmp_path / "fedhosp.fedhosp.0.1.0.1a2b3c4d"
    for package in audit.CODE_PACKAGES:
        (app_dir / package).mkdir(parents=True)
        (app_dir / package / "x.py").write_text("A = 1\n")
    first = audit._code_hash(app_dir)
    (app_dir / "common" / "x.py").write_text("A = 2\n")
    assert audit._code_hash(app_dir) != first  # any change to the site's code shows
    verdict = app_bundle.judge(app_dir, app_dir)
    monkeypatch.setattr(app_bundle, "_current", verdict)
    audit.app_identity.cache_clear()
    try:
        identity = audit.app_identity()
    finally:
        audit.app_identity.cache_clear()
    assert identity["app-sha256"] == app_bundle.digest(app_dir) and identity["app-decision"] == verdict.decision


def test_summary_of_a_site_that_never_joined_is_empty(tmp_path):
    assert audit.summary(tmp_path) == []
