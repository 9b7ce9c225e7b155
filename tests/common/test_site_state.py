"""A site's state folder: private modes, atomic writes, names kept inside it, a secret never silently short,
and (enforced) no code but common/site_state.py opening anything in it during a site's round."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app as client_app
from client import site as site_module
from common import privacy
from common.config import RunConfig
from common.data import digests
from common.errors import SiteStateError
from common.flower_compat.engine import acting_as
from common.models import build_model
from common.site_state import SECRET_FILE, SiteState
from common.weights import plain_state_dict

REPO = Path(__file__).resolve().parents[2]
OWNER = REPO / "common" / "site_state.py"
# Python 3.11 audits os.replace as "os.rename"; later versions may name it "os.replace"
EVENTS = {"open", "os.rename", "os.replace", "os.mkdir", "os.remove", "os.chmod", "os.link"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- atomicity


def test_a_write_that_fails_midway_leaves_the_old_content_and_no_temp_file(tmp_path, monkeypatch):
    state = SiteState(tmp_path / "state")
    state.write_bytes("ledger.json", b"old")

    def half_then_crash(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        state.save_tensors("ledger.json", {"x": torch.zeros(1)})
    monkeypatch.undo()

    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError, match="power cut"):
        state.write_bytes("ledger.json", b"new")
    monkeypatch.undo()

    assert state.read_bytes("ledger.json") == b"old"
    assert sorted(p.name for p in state.path.iterdir()) == ["ledger.json"]


def test_a_complete_write_replaces_and_reads_back(tmp_path):
    state = SiteState(tmp_path / "state")
    assert state.read_bytes("a") is None and state.read_json("a") is None and state.load_tensors("a") is None
    state.write_json("a", {"k": 1})
    state.write_json("a", {"k": 2})
    state.save_tensors("local/t.pt", {"w": torch.ones(2)})
    assert state.read_json("a") == {"k": 2}
    assert torch.equal(state.load_tensors("local/t.pt")["w"], torch.ones(2))
    state.write_text("bad", "not json")
    with pytest.raises(ValueError):
        state.read_json("bad")


# --- modes


def test_folders_are_0700_and_files_0600_whatever_the_umask(tmp_path):
    state = SiteState(tmp_path / "state")
    saved = os.umask(0)
    try:
        state.write_bytes("a", b"x")
        state.append_line("log.jsonl", "{}")
        state.save_npz("cache/decoded.npz", images=torch.zeros(2).numpy())
        state.create_once("once", b"y")
        with state.lock("ledger.lock"):
            pass
        home = state.subfolder("flwr-home").folder()
    finally:
        os.umask(saved)
    assert _mode(state.path) == 0o700 and _mode(state.path / "cache") == 0o700 and _mode(home) == 0o700
    for name in ("a", "log.jsonl", "cache/decoded.npz", "once", "ledger.lock"):
        assert _mode(state.path / name) == 0o600, name


def test_a_wider_existing_folder_and_file_are_tightened(tmp_path):
    folder = tmp_path / "state"
    (folder / "cache").mkdir(parents=True)
    folder.chmod(0o755)
    (folder / "cache").chmod(0o755)
    (folder / "audit.jsonl").write_text("")
    (folder / "audit.jsonl").chmod(0o644)
    state = SiteState(folder)
    state.append_line("audit.jsonl", "{}")
    state.subfolder("cache").write_bytes("x", b"")
    assert _mode(folder) == 0o700 and _mode(folder / "cache") == 0o700
    assert _mode(folder / "audit.jsonl") == 0o600


def test_reading_creates_nothing(tmp_path):
    state = SiteState(tmp_path / "state")
    assert state.read_text("audit.jsonl") is None
    assert not state.path.exists()


# --- names


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "..", "a\0b", ""])
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    state = SiteState(tmp_path / "state")
    with pytest.raises(SiteStateError):
        state.write_bytes(name, b"x")
    with pytest.raises(SiteStateError):
        state.path_for(name)
    assert not (tmp_path / "x").exists()


def test_run_ids_become_safe_file_names():
    assert SiteState.run_name("norms", "../../etc/x y") == "norms-.._.._etc_x_y.pt"


# --- the site's secret


def test_the_secret_is_made_once_and_kept(tmp_path):
    state = SiteState(tmp_path / "state")
    secret = state.secret()
    assert len(secret) == 32 and state.secret() == secret
    assert _mode(state.path_for(SECRET_FILE)) == 0o600
    assert not state.create_once(SECRET_FILE, b"other") and state.secret() == secret


@pytest.mark.parametrize("content", [b"", b"12345"])
def test_an_empty_or_truncated_secret_is_an_error_naming_the_file(tmp_path, content):
    state = SiteState(tmp_path / "state")
    state.write_bytes(SECRET_FILE, content)
    with pytest.raises(SiteStateError, match=f"{SECRET_FILE}.*holds {len(content)} bytes"):
        state.secret()
    assert state.read_bytes(SECRET_FILE) == content  # never silently replaced


# --- enforcement: only common/site_state.py opens paths in a site's state folder

_RECORDER: list[tuple[str, str, str]] | None = None
_ROOT: str = ""


def _audit(event: str, args: tuple) -> None:
    """Installed once for the process (audit hooks cannot be removed): idle unless a recorder is set."""
    if _RECORDER is None or event not in EVENTS:
        return
    paths = [os.path.abspath(os.fsdecode(a)) for a in args[:2] if isinstance(a, str | bytes | os.PathLike)]
    inside = [p for p in paths if p == _ROOT or p.startswith(_ROOT + os.sep)]
    if inside:
        _RECORDER.append((event, inside[-1], _first_repo_frame(sys._getframe(1))))  # a rename's target


def _first_repo_frame(frame) -> str:
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name.startswith(str(REPO) + os.sep) and not name.startswith(str(REPO / ".venv") + os.sep):
            return name
        frame = frame.f_back
    return "<outside the repository>"


sys.addaudithook(_audit)


class _Recording:
    def __init__(self, root: Path) -> None:
        self.root, self.seen = os.path.abspath(root), []

    def __enter__(self) -> list[tuple[str, str, str]]:
        global _RECORDER, _ROOT
        _RECORDER, _ROOT = self.seen, self.root
        return self.seen

    def __exit__(self, *exc) -> None:
        global _RECORDER
        _RECORDER = None


def test_the_recorder_catches_a_direct_write(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    with _Recording(state) as seen, open(state / "x", "w") as f:
        f.write("bypassing SiteState")
    assert seen == [("open", str(state / "x"), __file__)]


def _message(kind: str, run_id: int, server_round: int, cfg: RunConfig, content: dict) -> Message:
    config = ConfigRecord({**cfg.to_mapping(), "server-round": server_round})
    with acting_as(run_id, 0, server_round):  # the server's message to node 5
        return Message(RecordDict({**content, "config": config}), dst_node_id=5, message_type=kind)


def _answer(msg: Message, node_config: dict, run_id: int, server_round: int) -> None:
    context = Context(run_id=run_id, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    with acting_as(run_id, 5, server_round):
        reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""


def test_a_dp_round_with_fedbn_and_scaffold_opens_the_state_folder_only_through_site_state(
        tmp_path, hospitals, monkeypatch):
    # a fresh process's view: nothing decoded, hashed or searched yet, so every cache is written
    monkeypatch.setattr(site_module, "_MEMO", {})
    monkeypatch.setattr(digests, "_KNOWN", {})
    monkeypatch.setattr(privacy, "_KNOWN", {})
    monkeypatch.setattr(privacy, "_search", lambda *a: 1.5)  # Opacus's 3-5 s search: any noise will do here
    state = tmp_path / "state"
    node_config = {"data-path": str(hospitals / "site-000"), "state-dir": str(state), "device": "cpu"}
    cfg = RunConfig(num_server_rounds=4, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3,
                    local_norm=True, client_threads=1)
    model = build_model("classification", "cnn", image_size=32)
    weights = ArrayRecord(torch_state_dict=plain_state_dict(model))
    control = ArrayRecord(torch_state_dict={n: torch.zeros_like(p) for n, p in model.named_parameters()})

    with _Recording(state) as seen:
        _answer(_message("train", 7, 1, cfg, {"arrays": weights}), node_config, 7, 1)
        _answer(_message("train", 7, 1, cfg, {"arrays": weights}), node_config, 7, 1)  # replayed
        _answer(_message("train", 7, 2, cfg, {"arrays": weights, client_app.CONTROL: control}), node_config, 7, 2)
        _answer(_message("evaluate", 7, 3, cfg, {"arrays": weights}), node_config, 7, 3)

    written = {Path(p).relative_to(state).parts[0] for e, p, _ in seen if e in {"os.rename", "os.replace", "os.link"}}
    assert {"site-secret", "privacy-ledger.json", "local", "cache", "noise-multipliers.json"} <= written
    assert any(p.endswith("audit.jsonl") for _, p, _ in seen)  # the recorder saw the whole round
    outside = sorted({(e, os.path.relpath(p, state), f) for e, p, f in seen if f != str(OWNER)})
    assert not outside, f"opened past common/site_state.py: {outside}"


def test_a_secret_outside_the_state_folder_is_made_once_private_and_checked(tmp_path):
    from common.site_state import outside_secret

    site = tmp_path / "site"
    site.mkdir(mode=0o755)
    key = site / "state.ledger-key"
    assert outside_secret(key, create=False) is None and not key.exists()
    first = outside_secret(key, create=True)
    assert first == outside_secret(key, create=True) == outside_secret(key, create=False) and len(first) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(site.stat().st_mode) == 0o755  # the hospital's folder, left as it is
    assert [p.name for p in site.iterdir()] == [key.name]  # no temp file left
    key.write_bytes(b"short")
    with pytest.raises(SiteStateError, match="damaged"):
        outside_secret(key, create=True)
