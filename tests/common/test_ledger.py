import json
import math

import pytest
from opacus.accountants import RDPAccountant

from client.site import Site
from common import privacy
from common.config import RunConfig, SiteConfig
from common.errors import PrivacyBudgetExceeded, PrivacyLedgerError
from common.ledger import ANCHOR_FILE, LEDGER_FILE, Entry, PrivacyLedger
from common.models import build_model
from common.site_policy import SitePolicyRefused
from common.weights import to_record

RUN = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3)


def _site(hospitals, state, budget=0.0, run=RUN):
    return Site(run, SiteConfig(str(hospitals / "site-000"), str(state), "cpu", budget))


def _arrays():
    return to_record(build_model("classification", "cnn", image_size=32))


def _opacus_epsilon(entries, delta):
    """Opacus's own accountant stepped once per recorded step, over every run."""
    accountant = RDPAccountant()
    for e in entries:
        for sigma, q, steps in e.history:
            for _ in range(steps):
                accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


def test_epsilon_composes_across_runs_and_equals_opacus(hospitals, tmp_path):
    site, arrays = _site(hospitals, tmp_path, budget=1e6), _arrays()
    for run_id in ("study-a", "study-b"):
        for server_round in (1, 2):
            _, metrics = site.train(arrays, server_round, run_id)
    book = PrivacyLedger(tmp_path)
    entries = book.entries()
    assert [(e.run, e.round) for e in entries] == [("study-a", 1), ("study-a", 2), ("study-b", 1), ("study-b", 2)]
    n = metrics["num-examples"]
    assert all(e.steps == math.ceil(n / RUN.batch_size) * RUN.local_epochs for e in entries)
    total = _opacus_epsilon(entries, RUN.dp_target_delta)
    assert book.total_epsilon() == pytest.approx(total, rel=1e-9)
    assert metrics["epsilon-total"] == pytest.approx(total, rel=1e-9)
    run_b = _opacus_epsilon(entries[2:], RUN.dp_target_delta)
    assert metrics["epsilon"] == pytest.approx(run_b, rel=1e-9)  # a run's own ε ...
    assert total > 1.3 * run_b  # ... and two runs on the same data cost more than one


def test_a_site_refuses_the_round_that_would_pass_its_budget(hospitals, tmp_path):
    arrays = _arrays()
    _site(hospitals, tmp_path).train(arrays, 1, "study-a")
    book = PrivacyLedger(tmp_path)
    spent = book.total_epsilon()
    n = len(_site(hospitals, tmp_path).data()[0])
    dp = privacy.plan(RUN.dp_target_epsilon, RUN.dp_target_delta, n, RUN.batch_size, RUN.local_epochs,
                      RUN.num_server_rounds, RUN.dp_max_grad_norm)
    next_round = book.epsilon_if(dp.round_history(), RUN.dp_target_delta)
    assert next_round > spent
    before = (tmp_path / LEDGER_FILE).read_bytes()
    site = _site(hospitals, tmp_path, budget=(spent + next_round) / 2)
    with pytest.raises(PrivacyBudgetExceeded) as refusal:
        site.train(arrays, 2, "study-a")
    assert refusal.value.spent == pytest.approx(spent) and refusal.value.would_be > refusal.value.budget
    assert (tmp_path / LEDGER_FILE).read_bytes() == before  # the refused round spent nothing
    # a larger budget lets the same round through
    _site(hospitals, tmp_path, budget=next_round * 1.01).train(arrays, 2, "study-a")
    assert len(PrivacyLedger(tmp_path).entries()) == 2


def test_a_site_with_a_budget_refuses_training_without_dp(hospitals, tmp_path):
    run = RunConfig(**{**RUN.__dict__, "dp_enabled": False, "site_privacy_budget": 5.0})
    virtual = Site(run, SiteConfig(str(hospitals / "site-000"), str(tmp_path / "v"), "cpu"), index=0)
    with pytest.raises(PrivacyBudgetExceeded, match="without DP"):  # simulation: the run's budget binds
        virtual.train(_arrays(), 1, "plain")
    with pytest.raises(SitePolicyRefused, match="dp-enabled"):  # a real site: its own policy (allow-no-dp)
        _site(hospitals, tmp_path, budget=5.0, run=run).train(_arrays(), 1, "plain")


def _entry(i):
    return Entry("run", i, 1.1, 0.1, 10, 1e-5, [(1.1, 0.1, 10)])


def test_ledger_cannot_be_reset_truncated_or_edited_silently(tmp_path):
    book = PrivacyLedger(tmp_path)
    for i in (1, 2, 3):
        book.append(_entry(i))
    assert book.total_epsilon() > 0
    ledger = tmp_path / LEDGER_FILE
    full = ledger.read_text()

    data = json.loads(full)
    data["records"][1]["entry"]["noise_multiplier"] = 50.0  # a cheaper past
    ledger.write_text(json.dumps(data))
    with pytest.raises(PrivacyLedgerError, match="entry 2 was altered"):
        book.total_epsilon()

    data = json.loads(full)
    data["records"] = data["records"][:2]
    ledger.write_text(json.dumps(data))
    with pytest.raises(PrivacyLedgerError, match="truncated"):
        book.entries()

    ledger.write_text(full[: len(full) // 2])
    with pytest.raises(PrivacyLedgerError, match="cannot be read"):
        book.entries()

    ledger.unlink()
    with pytest.raises(PrivacyLedgerError, match="missing"):
        book.append(_entry(4))

    ledger.write_text(full)  # restored from backup: works again
    assert len(book.entries()) == 3


def test_a_crash_between_ledger_and_anchor_loses_nothing(tmp_path):
    book = PrivacyLedger(tmp_path)
    book.append(_entry(1))
    stale_anchor = (tmp_path / ANCHOR_FILE).read_text()
    book.append(_entry(2))
    (tmp_path / ANCHOR_FILE).write_text(stale_anchor)  # the anchor write never happened
    assert [e.round for e in book.entries()] == [1, 2]
    book.append(_entry(3))
    assert json.loads((tmp_path / ANCHOR_FILE).read_text())["entries"] == 3


def test_ledger_show_prints_every_round_and_the_total(tmp_path, capsys):
    from fedhosp.cli import main

    book = PrivacyLedger(tmp_path)
    for run in ("study-a", "study-b"):
        for i in (1, 2):
            book.append(Entry(run, i, 1.1, 0.1, 10, 1e-5, [(1.1, 0.1, 10)]))
    assert main(["ledger", "show", "--site", str(tmp_path), "--budget", "20"]) == 0
    out = capsys.readouterr().out
    assert "4 DP rounds in 2 run(s)" in out and out.count("study-") == 4
    total = _opacus_epsilon(book.entries(), 1e-5)
    assert f"total ε = {total:.3f}" in out and f"remaining {20 - total:.3f}" in out
    assert main(["ledger", "show", "--site", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon-total"] == pytest.approx(total, rel=1e-9)
    assert report["rounds"][1]["epsilon-run"] == pytest.approx(report["rounds"][3]["epsilon-run"])
    assert main(["ledger", "show", "--site", str(tmp_path / "nope")]) == 2


def _rehash(ledger_path, anchor_path, records):
    """What an editor who read common/ledger.py does: recompute the chain and the anchor over `records`."""
    from common.ledger import GENESIS, _chain

    prev = GENESIS
    for r in records:
        r["prev"], r["hash"] = prev, _chain(prev, r["entry"])
        prev = r["hash"]
    ledger_path.write_text(json.dumps({"format": 1, "records": records}))
    anchor = json.loads(anchor_path.read_text())
    anchor_path.write_text(json.dumps({**anchor, "entries": len(records), "head": prev}))


def test_an_edited_and_rehashed_ledger_fails_the_sites_key(tmp_path):
    from common.ledger import LedgerKey

    key = LedgerKey(tmp_path / "ledger.key")  # outside the state folder
    state = tmp_path / "state"
    book = PrivacyLedger(state, key, data="site-data")
    for i in (1, 2, 3):
        book.append(_entry(i))
    assert oct(key.path.stat().st_mode & 0o777) == "0o600"
    ledger, anchor = state / LEDGER_FILE, state / ANCHOR_FILE
    full, full_anchor = ledger.read_text(), anchor.read_text()

    records = json.loads(full)["records"]
    records[1]["entry"]["noise_multiplier"] = 50.0  # a cheaper past, the chain recomputed
    _rehash(ledger, anchor, records)
    assert len(PrivacyLedger(state).entries()) == 3  # the chain alone is fooled
    with pytest.raises(PrivacyLedgerError, match="entry 2 is not signed"):
        book.entries()

    records = json.loads(full)["records"][:2]  # truncated, its anchor rewritten to match
    _rehash(ledger, anchor, records)
    with pytest.raises(PrivacyLedgerError, match="anchor is not signed"):
        book.entries()

    ledger.write_text(full)
    anchor.write_text(full_anchor)
    assert len(book.entries()) == 3
    key.path.unlink()
    with pytest.raises(PrivacyLedgerError, match=r"key .* is missing"):
        book.entries()


def test_ledger_show_checks_the_sites_signatures_with_its_key(tmp_path, capsys):
    """An edited, re-hashed ledger passes the chain but not `fedhosp ledger show` beside the site's key."""
    from common.ledger import LedgerKey
    from fedhosp.cli import main

    state = tmp_path / "state"
    book = PrivacyLedger(state, LedgerKey(tmp_path / "state.ledger-key"), data="site-data")  # the default place
    for i in (1, 2):
        book.append(_entry(i))
    assert main(["ledger", "show", "--site", str(state)]) == 0
    assert "signatures verified" in capsys.readouterr().out
    records = json.loads((state / LEDGER_FILE).read_text())["records"]
    records[0]["entry"]["noise_multiplier"] = 50.0
    _rehash(state / LEDGER_FILE, state / ANCHOR_FILE, records)
    assert main(["ledger", "show", "--site", str(state)]) == 2
    assert "entry 1 is not signed" in capsys.readouterr().err
    (tmp_path / "state.ledger-key").rename(tmp_path / "elsewhere.key")
    assert main(["ledger", "show", "--site", str(state)]) == 0  # no key: the chain only, and it says so
    assert "signatures not checked" in capsys.readouterr().out
    assert main(["ledger", "show", "--site", str(state), "--ledger-key", str(tmp_path / "elsewhere.key")]) == 2


def test_a_deleted_ledger_stops_the_site_until_the_hospital_starts_a_new_one(hospitals, tmp_path):
    from client import audit
    from common.site_policy import SitePolicy

    state = tmp_path / "site" / "state"
    _site(hospitals, state).train(_arrays(), 1, "r")
    assert (tmp_path / "site" / "state.ledger-key").is_file()  # beside the state folder, not in it
    assert json.loads((state / LEDGER_FILE).read_text())["records"][0]["data"]  # the data it was trained on
    (state / LEDGER_FILE).unlink()
    (state / ANCHOR_FILE).unlink()
    with pytest.raises(PrivacyLedgerError, match="new-ledger = true"):
        _site(hospitals, state).train(_arrays(), 2, "r")
    assert not (state / LEDGER_FILE).exists()

    config = SiteConfig(str(hospitals / "site-000"), str(state), "cpu")
    Site(RUN, config, own_policy=SitePolicy(dp_delta=1e-3, new_ledger=True)).train(_arrays(), 2, "r")
    assert len(PrivacyLedger(state).entries()) == 1
    assert [r["event"] for r in audit.read(state)] == ["new-ledger"]
