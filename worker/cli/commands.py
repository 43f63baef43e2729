"""The commands of ``supersim-worker``: each one's module and one-line help, in listing order.

``worker.cli.main`` lists every command from this table and imports only the module of the
command that runs, so ``supersim-worker --help`` loads none of the commands' dependencies
(botocore, redis, pydantic, the handlers). Each module registers its command with the help
given here (``add_parser``), so the listing and the command's own parser say the same.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class Command(NamedTuple):
    module: str
    """The module whose ``add_parser(subparsers)`` registers the command."""
    help: str


COMMANDS: Final[dict[str, Command]] = {
    "run": Command("worker.cli.run", "consume the stream (settings from SUPERSIM_* variables)"),
    "status": Command(
        "worker.cli.status", "shard owners, leases, checkpoints, lag, and the live replicas"
    ),
    "health": Command(
        "worker.cli.health", "ask the running worker whether it is healthy (or ready): exit 0 or 1"
    ),
    "replay": Command(
        "worker.cli.replay", "replay a JSON Lines file through the worker against a local Kinesis"
    ),
    "fanout": Command(
        "worker.cli.fanout",
        "deregister the consumer group's enhanced fan-out stream consumer",
    ),
    "dlq": Command("worker.cli.dlq", "inspect, redrive or delete entries of the dead-letter store"),
    "alerts": Command(
        "worker.cli.alerts",
        "list open episodes and recent alerts; list, redrive or delete undeliverable ones",
    ),
    "usage": Command("worker.cli.usage", "print metered data usage or a SIM's data sessions"),
    "decode": Command(
        "worker.cli.decode", "decode records from a file (JSON Lines or one JSON document)"
    ),
    "simulate": Command(
        "worker.cli.simulate", "write a reproducible simulated event stream and its ground truth"
    ),
}
