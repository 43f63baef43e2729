"""Start positions: where a shard's reader starts, and which checkpoint it trusts.

A shard with a checkpoint resumes after it (or from the time an ``AT_TIMESTAMP`` mark holds).
A shard without one starts from its first record if it is the child of a shard still
listed (after a split or merge), and otherwise from the run's initial position. A shard
started at ``LATEST`` first writes an ``AT_TIMESTAMP`` mark of when it started, so a
restart before its first record resumes from then, never from a newer ``LATEST``.

A backfill (``--from-start`` or ``--at-timestamp``) ignores the checkpoints of earlier
runs: only a shard this run has checkpointed resumes from its own.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from worker import keys
from worker.consumer.checkpoints import Checkpoints
from worker.consumer.kinesis import ShardInfo
from worker.consumer.leases import Lease
from worker.settings import InitialPosition, Settings

LATEST_MARGIN: Final = timedelta(seconds=30)
"""How far before "now" a ``LATEST`` start is remembered, for clock skew."""


@dataclass(frozen=True, slots=True)
class StartPosition:
    """Arguments of GetShardIterator, minus the stream and shard."""

    iterator_type: str
    sequence: str | None = None
    timestamp: datetime | None = None

    @classmethod
    def after(cls, sequence: str) -> StartPosition:
        return cls("AFTER_SEQUENCE_NUMBER", sequence=sequence)

    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"ShardIteratorType": self.iterator_type}
        if self.sequence is not None:
            args["StartingSequenceNumber"] = self.sequence
        if self.timestamp is not None:
            args["Timestamp"] = self.timestamp
        return args


TRIM_HORIZON: Final = StartPosition("TRIM_HORIZON")
LATEST: Final = StartPosition("LATEST")


def initial_position(
    settings: Settings, *, from_start: bool, at_timestamp: datetime | None
) -> StartPosition:
    """Where a shard with no checkpoint starts: a backfill's choice, else the settings'."""
    if from_start:
        return TRIM_HORIZON
    if at_timestamp is not None:
        return StartPosition("AT_TIMESTAMP", timestamp=at_timestamp)
    if settings.initial_position is InitialPosition.TRIM_HORIZON:
        return TRIM_HORIZON
    if settings.initial_position is InitialPosition.AT_TIMESTAMP:
        return StartPosition("AT_TIMESTAMP", timestamp=settings.initial_timestamp)
    return LATEST


class StartPositions:
    """The start positions of one run's shards.

    ``checkpointed_this_run(shard_id)`` says whether this run has checkpointed the shard
    (a handled batch, or its end); a backfill trusts only those checkpoints.
    """

    def __init__(
        self,
        *,
        checkpoints: Checkpoints,
        initial: StartPosition,
        ignore_checkpoints: bool,
        checkpointed_this_run: Callable[[str], bool],
    ) -> None:
        self._checkpoints = checkpoints
        self._initial = initial
        self._ignore_checkpoints = ignore_checkpoints
        self._checkpointed_this_run = checkpointed_this_run

    @classmethod
    def for_run(
        cls,
        settings: Settings,
        checkpoints: Checkpoints,
        *,
        from_start: bool,
        at_timestamp: datetime | None,
        checkpointed_this_run: Callable[[str], bool],
    ) -> StartPositions:
        """A backfill (``from_start`` or ``at_timestamp``) ignores earlier runs' checkpoints."""
        return cls(
            checkpoints=checkpoints,
            initial=initial_position(settings, from_start=from_start, at_timestamp=at_timestamp),
            ignore_checkpoints=from_start or at_timestamp is not None,
            checkpointed_this_run=checkpointed_this_run,
        )

    def trusted(self, shard_id: str, checkpoints: Mapping[str, str]) -> str | None:
        """The checkpoint to trust. A backfill ignores those of earlier runs: only a shard
        this run has checkpointed (a handled batch, or its end) resumes from its own."""
        if self._ignore_checkpoints and not self._checkpointed_this_run(shard_id):
            return None
        return checkpoints.get(shard_id)

    async def start(
        self,
        shard: ShardInfo,
        lease: Lease,
        checkpoint: str | None,
        stored: str | None,
        *,
        listed: Container[str],
    ) -> tuple[StartPosition, str | None]:
        """Where to start, and the checkpoint then stored in Redis. ``checkpoint`` is the
        one to trust (None to start afresh), ``stored`` what Redis holds, and ``listed``
        the shards of the stream's last listing. A ``LATEST`` start writes its mark
        through ``lease``, so the returned checkpoint is then that mark."""
        if checkpoint and checkpoint.startswith(keys.AT_TIMESTAMP_PREFIX):
            at = datetime.fromisoformat(checkpoint.removeprefix(keys.AT_TIMESTAMP_PREFIX))
            return StartPosition("AT_TIMESTAMP", timestamp=at), stored
        if checkpoint:
            return StartPosition.after(checkpoint), stored
        if any(p in listed for p in shard.parents):
            return TRIM_HORIZON, stored  # a child of a shard we read: from its first record
        if self._initial.iterator_type == "LATEST":
            # Remember when this shard started, so that a restart before its first record
            # resumes from then rather than from a newer LATEST (which would skip records).
            since = datetime.now(UTC) - LATEST_MARGIN
            mark = keys.AT_TIMESTAMP_PREFIX + since.isoformat()
            await self._checkpoints.write(lease, mark, previous=stored)
            return self._initial, mark
        return self._initial, stored
