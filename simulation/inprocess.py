"""A Flower Grid that runs the real ClientApp in this process: no Ray, no start-up cost.

For tests and benchmarks that compare strategies over many short runs, where Flower's
simulation engine would spend more time starting than training. Messages are built,
stamped and answered exactly as the engine does (the simulation's ClientApp, Flower's
Message and RecordDict), one site after another, at push time; node ids are the partition
ids + 1, so runs are reproducible. The ServerApp's grid stack on top is the same as for
every engine (server/assembly.py), packed wire included. `intercept` lets a test play a
hostile site; `client_app` a test's own site.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.flower_compat import engine, packing
from server.app import run as run_server
from server.assembly import Layer, compose

Intercept = Callable[[int, Message, Message], Message]  # (partition id, request, honest reply) -> reply
ClientApp = Callable[[Message, Context], Message]


def _simulation_clientapp() -> ClientApp:
    from simulation.clientapp import app

    return app


class InProcessGrid(Grid):
    def __init__(self, sites: int, run_id: int = 1, intercept: Intercept | None = None,
                 client_app: ClientApp | None = None) -> None:
        self.sites, self.run_id, self.intercept = sites, run_id, intercept
        self.client_app = client_app or _simulation_clientapp()
        self.contexts = {pid + 1: Context(run_id, pid + 1, {"partition-id": pid}, RecordDict(), {})
                         for pid in range(sites)}
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message answered now, in node order (exact repeats); the replies wait for `pull_messages`."""
        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            ids.append(engine.stamp_message_id(msg))
            self._replies[ids[-1]] = self._answer(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies asked for, in node order whatever the order asked in (float sums depend on it)."""
        wanted = set(message_ids)
        return [self._replies.pop(i) for i in [i for i in self._replies if i in wanted]]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        with engine.acting_as(self.run_id, node):
            try:
                reply = self.client_app(_delivered(msg), self.contexts[node])
            except Exception as exc:  # what Flower's engine does with a failing ClientApp
                reply = Message(Error(code=0, reason=str(exc)), reply_to=msg)
            if self.intercept is not None:
                reply = self._intercepted(node - 1, msg, reply)
        return reply

    def _intercepted(self, pid: int, msg: Message, reply: Message) -> Message:
        """The test's hostile site sees and sends plain records; its reply travels packed like any other."""
        request = _delivered(msg)
        packing.unpack_content(request.content)
        if not reply.has_error():
            packing.unpack_content(reply.content)
        reply = self.intercept(pid, request, reply)  # type: ignore[misc]
        if packing.has_packed(msg.content) and not reply.has_error():
            packing.pack_content(reply.content)
        return reply

    # The rest of Grid's interface: our server uses only the calls above.
    def set_run(self, run_id: int) -> None:
        self.run_id = run_id

    @property
    def run(self):
        raise NotImplementedError("InProcessGrid has no Run object")

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError("build Message objects directly")


def _delivered(msg: Message) -> Message:
    """The message as a site receives it: its own copy of the content (on a real wire every site
    deserializes its own), so what one site does to it never reaches the next."""
    delivered = copy.copy(msg)
    delivered.content = RecordDict(dict(msg.content.items()))
    return delivered


def run_inprocess(cfg: RunConfig, sites: int, run_id: int = 1, intercept: Intercept | None = None,
                  wrap: Layer | None = None, client_app: ClientApp | None = None) -> None:
    """The real ServerApp loop against `sites` in-process sites; writes into cfg.out_dir like a simulation.

    `wrap` is the simulation's own layer (simulation/run.py's CanonicalGrid, a benchmark's meter).
    """
    grid = compose(InProcessGrid(sites, run_id, intercept, client_app), cfg, simulation=wrap)
    with engine.acting_as(run_id, 0):
        run_server(grid, cfg, str(run_id))
