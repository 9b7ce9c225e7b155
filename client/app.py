"""The Flower ClientApp each hospital runs: thin handlers around `client.site.Site`.

The run's settings arrive in every message's ConfigRecord (the server parsed them
once), so a site always trains with exactly what the server asked for. Errors are
logged in full here, on the site, and leave it only as a class name: an exception
message may hold a file name, and nothing but weights and aggregate metrics may
leave a hospital.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site, site_from_context
from common.config import RunConfig
from common.errors import PrivacyBudgetExceeded
from common.protocol import BUDGET_SPENT, STATUS

log = logging.getLogger(__name__)
ROUND_KEY = "server-round"

app = ClientApp()


def _site(msg: Message, context: Context) -> tuple[Site, int]:
    settings = dict(msg.content["config"])
    server_round = int(settings.pop(ROUND_KEY, 0))
    return site_from_context(RunConfig.from_mapping(settings), context.node_config), server_round


def _guarded(handler: Callable[[Message, Context], RecordDict]) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        try:
            content = handler(msg, context)
        except Exception as exc:
            log.exception("site failed on a %s message", msg.metadata.message_type)
            raise RuntimeError(f"site failed: {type(exc).__name__} (details in the site's log)") from None
        return Message(content=content, reply_to=msg)

    run.__name__ = handler.__name__
    return run


@app.train()
@_guarded
def train(msg: Message, context: Context) -> RecordDict:
    site, server_round = _site(msg, context)
    try:
        arrays, metrics = site.train(msg.content["arrays"], server_round, str(context.run_id))
    except PrivacyBudgetExceeded as refusal:
        log.warning("round %d refused: %s", server_round, refusal)
        return RecordDict({STATUS: ConfigRecord({
            STATUS: BUDGET_SPENT, "epsilon-total": refusal.spent, "privacy-budget": refusal.budget,
            "epsilon-next": refusal.would_be,
        })})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> RecordDict:
    site, _ = _site(msg, context)
    return RecordDict({"metrics": MetricRecord(site.evaluate(msg.content["arrays"]))})
