"""``supersim-worker fanout deregister``: remove the stream consumer that enhanced fan-out
registered for the consumer group (``SUPERSIM_RETRIEVAL=fanout`` leaves it in place at exit,
so the next start reuses it; each registered consumer counts against the stream's limit of
20, and is billed per shard-hour).

Stop the group's fan-out workers first (or switch them to ``SUPERSIM_RETRIEVAL=polling``):
a running one registers the consumer again. Exit 0 whether it was registered or not.
"""

from __future__ import annotations

import argparse
import asyncio

from worker.cli.commands import COMMANDS
from worker.consumer import kinesis
from worker.consumer.app import command_settings
from worker.consumer.stream_consumer import stream_arn
from worker.settings import Settings


async def deregister(settings: Settings) -> bool:
    """Deregister the group's stream consumer; False if there was none."""
    async with kinesis.client(settings) as client:
        arn = await stream_arn(client, settings.stream_name)
        try:
            await client.deregister_stream_consumer(
                StreamARN=arn, ConsumerName=settings.consumer_group
            )
        except Exception as exc:
            if kinesis.error_code(exc) == "ResourceNotFoundException":
                return False
            raise
    return True


def run(args: argparse.Namespace) -> int:
    settings = command_settings("fanout deregister")
    name, stream = settings.consumer_group, settings.stream_name
    if asyncio.run(deregister(settings)):
        print(
            f"stream consumer {name!r} of stream {stream!r} deregistered (Kinesis deletes it "
            "within seconds); fan-out workers of the group still running register it again"
        )
    else:
        print(f"stream consumer {name!r} of stream {stream!r}: none registered")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "fanout",
        help=COMMANDS["fanout"].help,
        description="Manage the enhanced fan-out stream consumer of the consumer group "
        "(named after SUPERSIM_CONSUMER_GROUP, on SUPERSIM_STREAM_NAME).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    remove = actions.add_parser(
        "deregister",
        help="remove the group's stream consumer (stop its fan-out workers first)",
        description="DeregisterStreamConsumer for the consumer group's stream consumer.",
    )
    remove.set_defaults(func=run)
