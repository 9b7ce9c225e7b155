"""fedhosp's console logging follows `sys.stderr` as it is swapped (pytest's capture, a daemon's redirect)."""

import io
import logging
import sys

from common.logs import ensure_console


def test_a_record_goes_to_the_stderr_of_the_moment_not_the_one_at_setup(monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    ensure_console()
    first.close()  # what pytest does to a finished test's capture
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("server.test").info("round 1 done")
    assert second.getvalue() == "round 1 done\n"
