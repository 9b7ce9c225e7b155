"""A site's privacy ledger: every DP round it ever trained, on its own disk, across runs.

Flower's context state lives for one run, and Opacus's accountant for one engine,
so neither can tell a hospital what it has spent over a year of studies on the
same patients. The ledger can: each entry is one round of one run (noise
multiplier, sample rate, steps, δ and the accountant history that round added);
ε over any set of entries is Opacus's RDP accountant over their concatenated
histories, which is how RDP composes across runs on the same data. A site may
choose Opacus's PRV accountant instead (site policy `accountant = prv`): it composes
the same concatenated history (every entry a Poisson-subsampled Gaussian, their
privacy loss variables convolved) into an upper bound on ε at the same δ, tighter
than RDP's. Either bound holds for the whole history, whichever the earlier rounds'
noise was calibrated with, so a site may switch; the site's noise search uses the
ledger's accountant, so the run's target holds by the bound the ledger states.

A round of distributed DP (dp-mode = distributed, docs/secure-aggregation.md) is recorded as this site's
own release, `mode = "distributed"`, with the noise multiplier of the SecAgg+ sum it was part of: the ε
it states holds under that mode's assumption (the server sees only the sum, and at least
secagg-threshold of the summed sites are honest), which the entry names so an auditor can tell.

Integrity, not secrecy: entries form a hash chain and a small anchor file next to
the ledger records its length and head. A ledger that is missing, truncated,
edited or unparseable while the anchor says otherwise is an error, never an empty
ledger, so a budget cannot be reset by accident. Both files are written atomically.

Authenticity, against whoever can rewrite the state folder: given a `LedgerKey` (an HMAC key kept
outside the folder), every record also carries the identity of the data it was trained on and an
HMAC over its chain hash and that identity, and the anchor an HMAC over its count and head. An
edited ledger re-hashed, or a truncated one with its anchor rewritten, then fails verification; the
key existing with neither file is a deleted ledger, refused unless the hospital starts a new one.
Without a key (tools, tests) only the chain is checked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import PrivacyLedgerError
from common.privacy import ACCOUNTANT, History, epsilon
from common.site_state import SiteState, outside_secret

LEDGER_FILE = "privacy-ledger.json"
ANCHOR_FILE = "privacy-ledger.anchor"
LOCK_FILE = "privacy-ledger.lock"
FORMAT = 1
GENESIS = "0" * 64
LOCAL, DISTRIBUTED = "local", "distributed"  # an entry's dp-mode


@dataclass(frozen=True)
class Entry:
    """One DP round of one run at this site."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    history: History
    time: str = ""
    mode: str = LOCAL  # DISTRIBUTED: ε under distributed DP's assumption (the module's docstring)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = [list(h) for h in self.history]
        if self.mode == LOCAL:  # a local round's entry keeps the format it always had
            del data["mode"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
        fields = {k: data[k] for k in ("run", "round", "noise_multiplier", "sample_rate", "steps", "delta", "time")}
        return cls(**fields, history=history, mode=str(data.get("mode", LOCAL)))


@dataclass(frozen=True)
class LedgerKey:
    """Where a site's ledger key lives (outside its state folder); created with the ledger's first entry,
    so that its existence says the site has kept a ledger."""

    path: Path

    def read(self) -> bytes | None:
        return outside_secret(self.path, create=False)

    def create(self) -> bytes:
        return outside_secret(self.path, create=True) or b""


class PrivacyLedger:
    """The ledger of one site, in its state folder.

    `key`: authenticate it (a site does; tools reading it need not). `data`: the identity of the data
    new entries are trained on. `new`: the hospital starts a new ledger where its key shows one was
    deleted (node config `new-ledger`).
    """

    def __init__(self, state: SiteState | Path, key: LedgerKey | None = None, data: str = "",
                 new: bool = False, accountant: str = ACCOUNTANT) -> None:
        self.state = SiteState.at(state)
        self.path = self.state.path_for(LEDGER_FILE)
        self.anchor = self.state.path_for(ANCHOR_FILE)
        self.key, self.data, self.new, self.accountant = key, data, new, accountant
        self._locked = False

    def epsilon(self, history: History, delta: float) -> float:
        """ε of `history` at `delta` by this ledger's accountant (common/privacy.py `epsilon`)."""
        return epsilon(history, delta, self.accountant)

    def deleted(self) -> bool:
        """The key says this site kept a ledger, and neither the ledger nor its anchor is there."""
        return (self.key is not None and self.key.read() is not None
                and not self.state.exists(LEDGER_FILE) and not self.state.exists(ANCHOR_FILE))

    def entries(self) -> list[Entry]:
        return [Entry.from_json(e["entry"]) for e in self._read()]

    def history(self, run: str | None = None) -> History:
        """The accountant history of one run, or of every run (composition across runs)."""
        return concat(e for e in self.entries() if run is None or e.run == run)

    def delta(self, extra: float | None = None) -> float:
        """δ at which totals are stated: the smallest any entry used (the conservative choice)."""
        deltas = [e.delta for e in self.entries()] + ([extra] if extra is not None else [])
        return min(deltas) if deltas else 0.0

    def total_epsilon(self, delta: float | None = None) -> float:
        return self.epsilon(self.history(), delta if delta is not None else self.delta())

    def epsilon_if(self, extra: History, delta: float) -> float:
        """ε over every run so far plus `extra` steps, at the smaller of `delta` and the ledger's δ."""
        return self.epsilon(self.history() + list(extra), self.delta(delta))

    @contextlib.contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the site's ledger from the budget check to the append: two runs training on one
        site at once must not both pass the check on the same total."""
        if self._locked:
            yield self
            return
        with self.state.lock(LOCK_FILE):
            self._locked = True
            try:
                yield self
            finally:
                self._locked = False

    def append(self, entry: Entry) -> None:
        """Add one round; the write is atomic and extends the hash chain."""
        with self.locked():
            self._append(entry)

    def _append(self, entry: Entry) -> None:
        records = self._read()
        stamped = Entry(**{**asdict(entry), "history": entry.history,
                           "time": entry.time or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
        prev = records[-1]["hash"] if records else GENESIS
        record = {"entry": stamped.to_json(), "prev": prev, "hash": _chain(prev, stamped.to_json())}
        anchor = {"format": FORMAT, "entries": len(records) + 1, "head": record["hash"]}
        if self.key is not None:
            secret = self.key.create()
            record.update(data=self.data, mac=_mac(secret, record["hash"], self.data))
            anchor["mac"] = _mac(secret, str(anchor["entries"]), anchor["head"])
        records.append(record)
        self.state.write_json(LEDGER_FILE, {"format": FORMAT, "records": records}, indent=1)
        self.state.write_json(ANCHOR_FILE, anchor, indent=1)

    def _read(self) -> list[dict[str, Any]]:
        if self.deleted() and not self.new:
            raise PrivacyLedgerError(
                f"{self.path} and {self.anchor} are missing but {self.key.path if self.key else ''} shows this "
                "site has kept a ledger: restore both from backup, or set new-ledger = true in the node config "
                "to start a new one (the site's earlier ε is then no longer counted)"
            )
        anchor = self._anchor()
        records = self._records()
        if records is None:
            if anchor["entries"]:
                raise PrivacyLedgerError(
                    f"{self.path} is missing but {self.anchor} records {anchor['entries']} DP rounds: "
                    "restore the ledger from backup; fedhosp will not start a site's budget from zero"
                )
            return []
        self._verify(records, anchor)
        if self.key is not None:
            self._authenticate(records, anchor)
        return records

    def _authenticate(self, records: Sequence[dict[str, Any]], anchor: dict[str, Any]) -> None:
        """Every record and the anchor signed with the site's key: a re-hashed edit is caught."""
        secret = self.key.read() if self.key is not None else None
        if secret is None and (records or anchor["entries"]):
            raise PrivacyLedgerError(f"{self.path} holds DP rounds but its key {self.key.path if self.key else ''} "
                                     "is missing: restore the key from backup (a ledger written before "
                                     "fedhosp signed ledgers cannot be verified: see docs/privacy.md)")
        for i, record in enumerate(records):
            if not hmac.compare_digest(str(record.get("mac", "")),
                                       _mac(secret or b"", record["hash"], str(record.get("data", "")))):
                raise PrivacyLedgerError(f"{self.path}: entry {i + 1} is not signed with this site's ledger key "
                                         "(edited and re-hashed, or written without a key): restore the ledger "
                                         "from backup")
        if anchor["entries"] and not hmac.compare_digest(
                str(anchor.get("mac", "")), _mac(secret or b"", str(anchor["entries"]), str(anchor["head"]))):
            raise PrivacyLedgerError(f"{self.anchor} is not signed with this site's ledger key: restore the "
                                     "ledger and its anchor from backup")

    def _records(self) -> list[dict[str, Any]] | None:
        try:
            data = self.state.read_json(LEDGER_FILE)
            return None if data is None else list(data["records"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyLedgerError(f"{self.path} cannot be read ({exc}): restore it from backup") from None

    def _anchor(self) -> dict[str, Any]:
        try:
            anchor = self.state.read_json(ANCHOR_FILE)
        except ValueError:
            raise PrivacyLedgerError(f"{self.anchor} cannot be read: restore it from backup") from None
        return {"entries": 0, "head": GENESIS} if anchor is None else anchor

    def _verify(self, records: Sequence[dict[str, Any]], anchor: dict[str, Any]) -> None:
        prev = GENESIS
        for i, record in enumerate(records):
            if record.get("prev") != prev or record.get("hash") != _chain(prev, record.get("entry")):
                raise PrivacyLedgerError(f"{self.path}: entry {i + 1} was altered: restore the ledger from backup")
            prev = record["hash"]
        if anchor["entries"] and (len(records) < anchor["entries"] or anchor["head"] not in
                                  {r["hash"] for r in records}):
            raise PrivacyLedgerError(
                f"{self.path} holds {len(records)} DP rounds but {self.anchor} records {anchor['entries']}: "
                "the ledger was truncated or replaced; restore it from backup"
            )


def statement(book: PrivacyLedger) -> dict[str, Any]:
    """The ledger as an auditor reads it: each round with ε of its run and of all runs so far."""
    entries = book.entries()
    delta = book.delta()
    rows = []
    for i, e in enumerate(entries):
        rows.append({
            **{k: v for k, v in e.to_json().items() if k != "history"},
            "epsilon-run": book.epsilon(concat(x for x in entries[: i + 1] if x.run == e.run), delta),
            "epsilon-total": book.epsilon(concat(entries[: i + 1]), delta),
        })
    return {"ledger": str(book.path), "delta": delta, "accountant": book.accountant, "rounds": rows,
            "runs": sorted({e.run for e in entries}), "epsilon-total": rows[-1]["epsilon-total"] if rows else 0.0}


def concat(entries: Iterable[Entry]) -> History:
    return [h for e in entries for h in e.history]


def _chain(prev: str, entry: Any) -> str:
    return hashlib.sha256((prev + json.dumps(entry, sort_keys=True)).encode()).hexdigest()


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "|".join(parts).encode(), hashlib.sha256).hexdigest()
