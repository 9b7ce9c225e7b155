"""A Flower Grid that runs the real ClientApp in this process: no Ray, no start-up cost.

For tests and benchmarks that compare strategies over many short runs, where Flower's
simulation engine would spend more time starting than training. Messages are built,
stamped and answered exactly as the engine does (the simulation's ClientApp, Flower's
Message and RecordDict), one site after another; node ids are the partition ids + 1,
so runs are reproducible. `intercept` lets a test play a hostile site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from server.app import run as run_server
from simulation.clientapp import app as client_app

Intercept = Callable[[int, Message, Message], Message]  # (partition id, request, honest reply) -> reply


class InProcessGrid(Grid):
    def __init__(self, sites: int, run_id: int = 1, intercept: Intercept | None = None) -> None:
        self.sites, self.run_id, self.intercept = sites, run_id, intercept
        self.contexts = {pid + 1: Context(run_id, pid + 1, {"partition-id": pid}, RecordDict(), {})
                         for pid in range(sites)}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):  # fixed order: exact repeats
            node = msg.metadata.dst_node_id
            with _identity(self.run_id, node):
                reply = _answer(msg, self.contexts[node])
                if self.intercept is not None:
                    reply = self.intercept(node - 1, msg, reply)
            replies.append(reply)
        return replies

    # The rest of Grid's interface: our server uses only the two calls above.
    def set_run(self, run_id: int) -> None:
        self.run_id = run_id

    @property
    def run(self):
        raise NotImplementedError("InProcessGrid has no Run object")

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError("build Message objects directly")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")


def _answer(msg: Message, context: Context) -> Message:
    try:
        return client_app(msg, context)
    except Exception as exc:  # what Flower's engine does with a failing ClientApp
        from flwr.app import Error

        return Message(Error(code=0, reason=str(exc)), reply_to=msg)


@contextmanager
def _identity(run_id: int, node: int) -> Iterator[None]:
    """Flower stamps messages with the running task's ids; play the engine's part."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_inprocess(cfg: RunConfig, sites: int, run_id: int = 1, intercept: Intercept | None = None,
                  wrap: Callable[[Grid], Grid] | None = None) -> None:
    """The real ServerApp loop against `sites` in-process sites; writes into cfg.out_dir like a simulation.

    `wrap` puts a grid in front of the sites, as simulation/run.py does for Flower's engine.
    """
    grid: Grid = InProcessGrid(sites, run_id, intercept)
    with _identity(run_id, 0):
        run_server(wrap(grid) if wrap is not None else grid, cfg, str(run_id))
