"""A simulated run with privacy budgets and recognisable fake identifiers in every header.

One simulation: site-000 has already spent most of its budget in an earlier study, so it
refuses once its next round would pass the budget; the others train to the end. A spy on
the server's receive path records every reply; nothing but model weights and whitelisted
numeric aggregates may be in them. The client's code is also run in-process with every
logger at DEBUG, and nothing it logs or prints may hold a header value. The simulation runs on
the in-process engine: the replies are the Messages each site's ClientApp returned, as on Ray
(test_harness.py shows the two engines give the same numbers), without 15 s of Ray start-up.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.site import Site
from common import privacy
from common.config import RunConfig, SiteConfig
from common.data import synthetic
from common.flower_compat import engine
from common.ledger import PrivacyLedger
from common.logs import PACKAGES
from common.models import build_model
from common.protocol import BUDGET_SPENT, EVALUATE_METRICS, STATUS, STATUS_FIELDS, TRAIN_METRICS
from common.weights import plain_state_dict, to_record

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SITES, ROUNDS, IMAGES = 3, 3, 60
CAPTURE = Path(__file__).with_name("capture_run.py")
SETTINGS = {"num-server-rounds": ROUNDS, "local-epochs": 1, "batch-size": 16, "dp-target-epsilon": 4.0,
            "dp-target-delta": 1e-3, "min-available-sites": SITES, "seed": 0}


def _write_hospitals(root: Path) -> None:
    synthetic.write_hospitals(root, SITES, seed=5, images_per_site=IMAGES)
    broken = root / "site-001" / "broken.dcm"  # a corrupt file: skipped and reported on site only
    good = (root / "site-001" / "img_00000.dcm").read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    with open(root / "site-001" / "labels.csv", "a", newline="") as f:
        csv.writer(f).writerow(["broken.dcm", 1])


def paths(root: Path) -> set[str]:
    """Every path, folder and file name under the hospitals' root."""
    return {str(root), *(p.name for p in root.rglob("*"))}


def header_values(root: Path) -> set[str]:
    """Every identifying header value in the hospitals' DICOM files."""
    found = set()
    for path in root.rglob("*.dcm"):
        if path.name == "broken.dcm":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in (*synthetic.fake_identifiers(0, 0, 0), "SOPInstanceUID", "StudyInstanceUID",
                        "SeriesInstanceUID"):
            value = str(ds.get(keyword, ""))
            if len(value) >= 4:  # PatientSex "F" is no identifier on its own
                found.add(value)
    return found


def _run_config(out: Path, hospitals: Path, budget: float) -> dict:
    return {**RunConfig().to_mapping(), **SETTINGS, "data-root": str(hospitals), "state-root": str(out / "sites"),
            "out-dir": str(out), "site-privacy-budget": budget}


def _earlier_study(hospitals: Path, out: Path) -> RunConfig:
    """site-000 joined an earlier study with the same settings: 2 rounds spent."""
    run = RunConfig.from_mapping(_run_config(out, hospitals, 0.0))
    site = Site(run, SiteConfig(str(hospitals / "site-000"), str(out / "sites" / "site-000"), "cpu"))
    arrays = to_record(build_model("classification", "cnn"))
    for server_round in (1, 2):
        site.train(arrays, server_round, "earlier-study")
    return run


def _budget_between_rounds(hospitals: Path, out: Path, run: RunConfig) -> tuple[float, float]:
    """A budget site-000 can afford one more round under, not two."""
    n = len(Site(run, SiteConfig(str(hospitals / "site-000"), str(out / "x"), "cpu")).data()[0])
    dp = privacy.plan(run.dp_target_epsilon, run.dp_target_delta, n, run.batch_size, run.local_epochs,
                      run.num_server_rounds, run.dp_max_grad_norm)
    history = PrivacyLedger(out / "sites" / "site-000").history()
    one = privacy.epsilon(history + dp.round_history(), run.dp_target_delta)
    two = privacy.epsilon(history + 2 * dp.round_history(), run.dp_target_delta)
    return one, (one + two) / 2


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    hospitals, out = root / "hospitals", root / "run"
    _write_hospitals(hospitals)
    run = _earlier_study(hospitals, out)
    one, budget = _budget_between_rounds(hospitals, out, run)
    assert budget > run.dp_target_epsilon * 1.02  # a fresh site never reaches it in this run
    dump = root / "replies.json"
    settings = " ".join(f"{k}={v}" for k, v in SETTINGS.items() if k != "min-available-sites")
    proc = subprocess.run(
        [sys.executable, str(CAPTURE), str(dump), "simulate", "--sites", str(SITES), "--data", str(hospitals),
         "--out", str(out), "--engine", "inprocess", "--run-config", f"{settings} site-privacy-budget={budget}"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"hospitals": hospitals, "out": out, "replies": json.loads(dump.read_text()), "proc": proc,
            "budget": budget, "one": one}


def test_spent_site_refuses_and_the_run_completes_with_the_others(budget_run):
    out = budget_run["out"]
    results = json.loads((out / "results.json").read_text())
    assert [r["sites_ok"] for r in results["rounds"]] == [3, 2, 2]
    assert [r["sites_refused"] for r in results["rounds"]] == [0, 1, 1]
    refused = results["privacy"]["refused"]
    assert [r["round"] for r in refused] == [2, 3] and all(r[STATUS] == BUDGET_SPENT for r in refused)
    assert refused[0]["epsilon-total"] == pytest.approx(budget_run["one"], rel=1e-9)
    assert refused[0]["epsilon-next"] > budget_run["budget"]
    # the ledger holds the earlier study and round 1 of this run: the refused rounds spent nothing
    entries = PrivacyLedger(out / "sites" / "site-000").entries()
    assert [(e.run, e.round) for e in entries[:2]] == [("earlier-study", 1), ("earlier-study", 2)]
    assert [e.round for e in entries[2:]] == [1]
    assert "2 site-round(s) refused" in budget_run["proc"].stderr
    assert (out / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_site = results["privacy"]["per-site"]
    assert sorted(len(v) for v in per_site.values()) == [1, 3, 3]
    assert max(p["epsilon"] for v in per_site.values() for p in v) <= SETTINGS["dp-target-epsilon"] * 1.01


def _check_reply(reply: dict, names: set[str], shapes: dict[str, list[int]]) -> None:
    assert reply["error"] is None, reply["error"]
    records = reply["records"]
    if reply["type"].startswith("train") and STATUS in records:
        assert set(records) == {STATUS} and set(records[STATUS]["items"]) <= STATUS_FIELDS
        return
    expected = {"arrays", "metrics"} if reply["type"].startswith("train") else {"metrics"}
    assert set(records) == expected
    allowed = TRAIN_METRICS if reply["type"].startswith("train") else EVALUATE_METRICS
    metrics = records["metrics"]["items"]
    assert set(metrics) <= allowed, set(metrics) - allowed
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), metrics
    if "arrays" in records:
        assert records["arrays"]["packed"]  # it crossed the wire a hospital's reply crosses in deployment
        arrays = records["arrays"]["items"]
        assert {k: a["shape"] for k, a in arrays.items()} == shapes  # the model's weights, nothing else
        assert {a["dtype"] for a in arrays.values()} == {"float32"}
    text = json.dumps(reply)
    leaked = [n for n in names if n in text]
    assert not leaked, leaked


def test_only_weights_and_whitelisted_aggregates_leave_a_site(budget_run):
    replies = budget_run["replies"]
    assert len(replies) == SITES * ROUNDS * 2  # train + evaluate, every site, every round
    names = header_values(budget_run["hospitals"]) | paths(budget_run["hospitals"])
    assert any(n.startswith("Synthetic^Patient") for n in names) and any("SYN" in n for n in names)
    shapes = {k: list(v.shape) for k, v in plain_state_dict(build_model("classification", "cnn")).items()}
    for reply in replies:
        _check_reply(reply, names, shapes)


class Collect(logging.Handler):
    """Every record, at every level, from fedhosp's loggers (which do not propagate), Flower's and the root."""

    LOGGERS = (*PACKAGES, "flwr", "opacus", "")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.saved: list[tuple[logging.Logger, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Collect:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level))
            logger.addHandler(self)
            logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        for logger, level in self.saved:
            logger.removeHandler(self)
            logger.setLevel(level)

    def text(self) -> str:
        return "\n".join(r.getMessage() + (self.format(r) if r.exc_info else "") for r in self.records)


def _send_to_site(content: RecordDict, kind: str, context: Context) -> Message:
    """What the engine does: a message from the server (node 0), answered by the site's ClientApp."""
    with engine.acting_as(context.run_id, 0):
        msg = Message(content, dst_node_id=context.node_id, message_type=kind)
    with engine.acting_as(context.run_id, context.node_id):
        return client_app(msg, context)


CASES = (("trains", 0, 0.0), ("trains with a corrupt file", 1, 0.0), ("refuses: budget", 0, 0.5),
         ("fails: missing file", 2, 0.0))


def test_nothing_a_site_logs_or_prints_holds_a_header_value(budget_run, tmp_path, capfd):
    """The client's code in this process, every logger at DEBUG: training, a refusal, a failure."""
    hospitals = budget_run["hospitals"]
    names = header_values(hospitals)  # (the site's own log may name its files: it never leaves the site)
    with open(hospitals / "site-002" / "labels.csv", "a") as f:
        f.write("missing-file.dcm,1\n")  # a manifest naming a file that is not there: the site fails
    arrays = to_record(build_model("classification", "cnn"))
    with Collect() as logs:
        for case, pid, budget in CASES:
            cfg = {**_run_config(tmp_path, hospitals, budget), "state-root": str(tmp_path / case)}
            context = Context(99, 7, {"partition-id": pid}, RecordDict(), {})
            for kind in (MessageType.TRAIN, MessageType.EVALUATE):
                content = RecordDict({"arrays": arrays, "config": ConfigRecord({**cfg, "server-round": 1})})
                if case.startswith("fails"):
                    with pytest.raises(RuntimeError) as failure:  # Flower sends str(exc) as the reason
                        _send_to_site(content, kind, context)
                    assert "missing-file" not in str(failure.value) and str(hospitals) not in str(failure.value)
                    continue
                reply = _send_to_site(content, kind, context)
                refused = kind == MessageType.TRAIN and case.startswith("refuses")
                assert (STATUS in reply.content) == refused
    logged = logs.text()
    out, err = capfd.readouterr()
    assert "refused" in logged and "missing-file" in logged  # the site's own log says what happened
    leaked = [n for n in names if n in logged or n in out or n in err]
    assert not leaked, leaked
