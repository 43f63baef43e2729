"""Enhanced fan-out: the test server's event-stream framing, and the worker reading through
SubscribeToShard (tests/fanout_server.py over kinesalite)."""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import structlog
import test_end_to_end as end_to_end
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from botocore.parsers import EventStreamJSONParser
from botocore.session import get_session as botocore_session
from fanout_server import (
    FanOutFaults,
    FanOutServer,
    encode_message,
    event_message,
    exception_message,
)
from fault_proxy import FaultProxy
from kinesis_support import (
    create_stream,
    events,
    kinesis_client,
    put,
    wait_active,
    worker_settings,
)
from recording import seen, wait_handled
from redis.asyncio import Redis
from test_process import start_worker
from test_process import worker_env as process_env

from worker import keys
from worker.backoff import Backoff
from worker.cli import fanout as fanout_cli
from worker.cli.replay import put_all
from worker.consumer import fanout as fanout_module
from worker.consumer.app import run_worker
from worker.consumer.deadletter import DeadLetterStore
from worker.consumer.polling import Polling
from worker.consumer.positions import TRIM_HORIZON
from worker.consumer.retrieval import Fetched, ShardFeed
from worker.devtools.simulator import generate
from worker.errors import ConfigError
from worker.metrics import Metrics
from worker.settings import FanOutFallback

SHARD = "shardId-000000000000"
TESTS = Path(__file__).parent


@pytest.fixture
async def fanout(kinesalite_endpoint: str) -> AsyncIterator[FanOutServer]:
    """The fan-out server in front of an empty kinesalite."""
    async with FanOutServer(kinesalite_endpoint) as server:
        yield server


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    for _ in range(int(within / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never held")


def stream_name() -> str:
    return f"f-{uuid.uuid4().hex[:8]}"


# --- the test server ----------------------------------------------------------------------------


def test_framing_is_what_botocores_event_stream_parser_reads() -> None:
    """Messages split at any byte parse with botocore's own buffer: headers, payload and
    both CRC32s; a flipped byte fails its checksum."""
    messages = [
        encode_message({":event-type": "initial-response", ":message-type": "event"}, b"{}"),
        event_message("SubscribeToShardEvent", {"Records": [], "MillisBehindLatest": 7}),
        exception_message("ResourceInUseException", "busy"),
        encode_message({"é-name": "välue"}, bytes(range(256)) * 40),
    ]
    wire = b"".join(messages)
    rng = random.Random(5)
    buffer = EventStreamBuffer()
    parsed = []
    at = 0
    while at < len(wire):
        step = rng.randint(1, 700)
        buffer.add_data(wire[at : at + step])
        at += step
        parsed.extend(buffer)
    assert [m.headers for m in parsed] == [
        {":event-type": "initial-response", ":message-type": "event"},
        {
            ":event-type": "SubscribeToShardEvent",
            ":content-type": "application/json",
            ":message-type": "event",
        },
        {
            ":exception-type": "ResourceInUseException",
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        {"é-name": "välue"},
    ]
    assert parsed[0].payload == b"{}"
    assert parsed[3].payload == bytes(range(256)) * 40
    for position in (5, 20, len(messages[1]) - 2):  # prelude CRC, headers, message CRC
        broken = bytearray(messages[1])
        broken[position] ^= 0x01
        buffer = EventStreamBuffer()
        buffer.add_data(bytes(broken))
        with pytest.raises(ChecksumMismatch):
            list(buffer)


def test_events_parse_into_the_subscribe_to_shard_shapes() -> None:
    """botocore's event-stream JSON parser reads an event as a SubscribeToShardEvent
    (records decoded, times parsed) and an exception as its error code."""
    model = botocore_session().get_service_model("kinesis")
    shape = model.operation_model("SubscribeToShard").output_shape.members["EventStream"]
    body = {
        "Records": [
            {
                "SequenceNumber": "49",
                "Data": base64.b64encode(b"hello").decode(),
                "PartitionKey": "k",
                "ApproximateArrivalTimestamp": 1700000000.5,
            }
        ],
        "ContinuationSequenceNumber": "49",
        "MillisBehindLatest": 0,
    }
    buffer = EventStreamBuffer()
    buffer.add_data(event_message("SubscribeToShardEvent", body))
    buffer.add_data(exception_message("ResourceInUseException", "busy"))
    first, second = list(buffer)
    parser = EventStreamJSONParser()
    event = parser.parse(first.to_response_dict(), shape)["SubscribeToShardEvent"]
    assert event["Records"][0]["Data"] == b"hello"
    assert event["Records"][0]["ApproximateArrivalTimestamp"].timestamp() == 1700000000.5
    assert event["ContinuationSequenceNumber"] == "49"
    error = parser.parse(second.to_response_dict(), shape)
    assert error["Error"]["Code"] == "ResourceInUseException"


async def register(client: Any, stream: str, name: str = "group") -> str:
    """Register a stream consumer and wait until it is ACTIVE; its ARN."""
    summary = await client.describe_stream_summary(StreamName=stream)
    stream_arn = summary["StreamDescriptionSummary"]["StreamARN"]
    consumer = (await client.register_stream_consumer(StreamARN=stream_arn, ConsumerName=name))[
        "Consumer"
    ]
    for _ in range(100):
        described = await client.describe_stream_consumer(ConsumerARN=consumer["ConsumerARN"])
        if described["ConsumerDescription"]["ConsumerStatus"] == "ACTIVE":
            return str(consumer["ConsumerARN"])
        await asyncio.sleep(0.05)
    raise AssertionError("the consumer never became ACTIVE")


async def test_aiobotocore_subscribe_to_shard_yields_the_records(fanout: FanOutServer) -> None:
    """aiobotocore's subscribe_to_shard against the server streams the shard's records in
    order; the continuation is the last record's sequence number, and a subscription
    AFTER it sees only what came next."""
    stream = stream_name()
    await create_stream(fanout.url, stream)
    await put(fanout.url, stream, events(30))
    async with kinesis_client(fanout.url) as client:
        arn = await register(client, stream)
        response = await client.subscribe_to_shard(
            ConsumerARN=arn, ShardId=SHARD, StartingPosition={"Type": "TRIM_HORIZON"}
        )
        got: list[dict[str, Any]] = []
        continuation = None
        async for item in response["EventStream"]:
            event = item["SubscribeToShardEvent"]
            got.extend(event["Records"])
            continuation = event["ContinuationSequenceNumber"]
            if len(got) >= 30:
                break
        response["EventStream"].close()
        # A subscription refused while the last one is still open is the next test's case.
        await fanout.wait_all_closed()
        assert [r["Data"] for r in got] == events(30)
        assert continuation == got[-1]["SequenceNumber"]
        await put(fanout.url, stream, events(5, start=30))
        again = await client.subscribe_to_shard(
            ConsumerARN=arn,
            ShardId=SHARD,
            StartingPosition={"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": continuation},
        )
        more: list[dict[str, Any]] = []
        async for item in again["EventStream"]:
            more.extend(item["SubscribeToShardEvent"]["Records"])
            if len(more) >= 5:
                break
        again["EventStream"].close()
    assert [r["Data"] for r in more] == events(5, start=30)


async def test_continuation_before_any_record_resumes_where_the_subscription_was(
    fanout: FanOutServer,
) -> None:
    """An empty event's continuation (LATEST, nothing yet) names the position reached:
    AFTER it, the records put since are read, none from before."""
    stream = stream_name()
    await create_stream(fanout.url, stream)
    await put(fanout.url, stream, events(3))
    async with kinesis_client(fanout.url) as client:
        arn = await register(client, stream)
        response = await client.subscribe_to_shard(
            ConsumerARN=arn, ShardId=SHARD, StartingPosition={"Type": "LATEST"}
        )
        async for item in response["EventStream"]:
            event = item["SubscribeToShardEvent"]
            assert event["Records"] == []
            continuation = event["ContinuationSequenceNumber"]
            break
        response["EventStream"].close()
        await put(fanout.url, stream, events(2, start=3))
        iterator = await client.get_shard_iterator(
            StreamName=stream,
            ShardId=SHARD,
            ShardIteratorType="AFTER_SEQUENCE_NUMBER",
            StartingSequenceNumber=continuation,
        )
        records = await client.get_records(ShardIterator=iterator["ShardIterator"])
    assert [r["Data"] for r in records["Records"]] == events(2, start=3)


async def test_a_second_subscription_to_a_shard_is_refused_while_the_first_is_open(
    fanout: FanOutServer,
) -> None:
    """Like AWS: ResourceInUseException while another subscription to the shard is open."""
    stream = stream_name()
    await create_stream(fanout.url, stream)
    async with kinesis_client(fanout.url) as client:
        arn = await register(client, stream)
        first = await client.subscribe_to_shard(
            ConsumerARN=arn, ShardId=SHARD, StartingPosition={"Type": "LATEST"}
        )
        with pytest.raises(client.exceptions.ResourceInUseException):
            await client.subscribe_to_shard(
                ConsumerARN=arn, ShardId=SHARD, StartingPosition={"Type": "LATEST"}
            )
        first["EventStream"].close()


# --- the worker in fan-out mode -------------------------------------------------------------------

GROUP = "supersim-worker"
MAX_HASH = 2**128 - 1


def fanout_settings(server: FanOutServer, redis_url: str, stream: str, **overrides: Any) -> Any:
    return worker_settings(server.url, redis_url, stream, retrieval="fanout", **overrides)


def assert_once_in_order(handled: list[tuple[str, str, str]], expected: list[bytes]) -> None:
    """Every expected record handled exactly once, each shard in sequence order."""
    sids = [sid for _, _, sid in handled]
    assert sorted(sids) == sorted(str(orjson.loads(raw)["id"]) for raw in expected)
    for shard in {shard for shard, _, _ in handled}:
        sequences = [int(seq) for s, seq, _ in handled if s == shard]
        assert sequences == sorted(sequences), shard


async def test_fanout_meters_exactly_alerts_once_and_dead_letters_corrupt_records(
    fanout: FanOutServer, redis_url: str
) -> None:
    """Through SubscribeToShard only (no GetRecords), everything the polling end-to-end test
    checks holds for its simulated fleet: usage metered exactly per SIM and day, one alert
    (and one resolution) per injected episode, neither changed by a full replay; and the
    corrupt records among the fleet's are dead-lettered."""
    records, truth = generate(end_to_end.OPTIONS)
    corrupt = [b"not json at all", b'{"type": "com.twilio.iot.supersim.connection.x"}']
    stream = stream_name()
    shards = 4
    await create_stream(fanout.url, stream, shards=shards)
    await put(fanout.url, stream, records[:300] + corrupt + records[300:])
    settings = fanout_settings(
        fanout, redis_url, stream, handlers=end_to_end.HANDLERS, batch_limit=200
    )
    prefix = keys.prefix(stream, GROUP)
    client = redis.Redis.from_url(redis_url)
    try:
        await end_to_end.run_until_alerted(settings, client, prefix, truth, workers=1)
        expected = end_to_end.check_exact(client, prefix, truth)
        first_alerts = end_to_end.alerts(client, prefix)
        assert sum(fanout.subscriptions.values()) == shards
        store = Redis.from_url(redis_url)
        try:
            dlq = DeadLetterStore(store, keys.dead_letters(prefix), 1000, Metrics())
            letters = await dlq.list()
        finally:
            await store.aclose()
        assert sorted(letter.raw for letter in letters) == sorted(corrupt)
        assert {letter.handler for letter in letters} == {"decode"}

        replay = await run_worker(
            settings,
            from_start=True,
            until_caught_up=True,
            install_signals=False,
            sections=end_to_end.SECTIONS,
        )
        assert replay.caught_up
        assert end_to_end.usage_per_sim_day(client, prefix, truth) == expected
        assert end_to_end.alerts(client, prefix) == first_alerts
    finally:
        client.close()
    assert fanout.calls["GetRecords"] == 0


async def test_at_timestamp_and_latest_starts_subscribe_where_polling_would_read(
    fanout: FanOutServer, redis_url: str
) -> None:
    """`--at-timestamp` subscribes AT_TIMESTAMP and handles only what arrived since; a
    LATEST start handles only what is put after it."""
    stream = stream_name()
    prefix = keys.prefix(stream, GROUP)
    await create_stream(fanout.url, stream)
    await put(fanout.url, stream, events(10))
    await asyncio.sleep(1.1)
    since = datetime.now(UTC)
    await put(fanout.url, stream, events(10, start=10))
    settings = fanout_settings(fanout, redis_url, stream)
    summary = await run_worker(
        settings, at_timestamp=since, until_caught_up=True, install_signals=False
    )
    assert summary.caught_up
    assert_once_in_order(await seen(redis_url, prefix), events(10, start=10))
    assert fanout.starts[0][1]["Type"] == "AT_TIMESTAMP"

    latest = fanout_settings(
        fanout, redis_url, stream, consumer_group="live", initial_position="LATEST"
    )
    sent = fanout.events[SHARD]
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(latest, install_signals=False, stop=stop))
    try:
        await until(lambda: len(fanout.starts) == 2 and fanout.events[SHARD] > sent)
        await put(fanout.url, stream, events(5, start=20))
        await wait_handled(redis_url, keys.prefix(stream, "live"), 5)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    assert_once_in_order(await seen(redis_url, keys.prefix(stream, "live")), events(5, start=20))
    assert fanout.starts[1][1] == {"Type": "LATEST"}


@pytest.mark.parametrize("ends", ["server", "worker"])
async def test_subscriptions_ending_resume_with_no_gap_and_no_repeat(
    kinesalite_endpoint: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, ends: str
) -> None:
    """Subscriptions ended every fraction of a second (by the server, as AWS does after 5
    minutes, or renewed by the worker before that) while records keep arriving: each record
    is handled once, in order."""
    if ends == "worker":
        monkeypatch.setattr(fanout_module, "RENEW_AFTER", 0.3)
    period = 0.3 if ends == "server" else 300.0
    async with FanOutServer(kinesalite_endpoint, subscription_seconds=period) as server:
        stream = stream_name()
        await create_stream(server.url, stream, shards=2)
        settings = fanout_settings(server, redis_url, stream, batch_limit=25)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
        written: list[bytes] = []
        try:
            async with kinesis_client(server.url) as client:
                for round_ in range(100):  # until each shard has been subscribed to 3 times
                    batch = events(10, start=10 * round_)
                    await put_all(client, stream, batch)
                    written.extend(batch)
                    await asyncio.sleep(0.1)
                    if len(server.subscriptions) == 2 and min(server.subscriptions.values()) >= 3:
                        break
            await wait_handled(redis_url, keys.prefix(stream, GROUP), len(written))
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 30)
        handled = await seen(redis_url, keys.prefix(stream, GROUP))
        assert_once_in_order(handled, written)
        assert min(server.subscriptions.values()) >= 3  # two renewals or more per shard
        assert server.calls["GetRecords"] == 0


async def test_in_use_answers_and_a_dropped_connection_lose_and_repeat_nothing(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """ResourceInUseException is waited out, and a connection cut half-way through an
    event is subscribed again from the last continuation: every record once, in order."""
    faults = FanOutFaults(in_use_first=2, drop_after_events=3)
    async with FanOutServer(kinesalite_endpoint, read_limit=20, faults=faults) as server:
        stream = stream_name()
        await create_stream(server.url, stream)
        written = events(200)
        await put(server.url, stream, written)
        settings = fanout_settings(server, redis_url, stream, batch_limit=20)
        summary = await run_worker(settings, until_caught_up=True, install_signals=False)
        assert summary.caught_up
        assert_once_in_order(await seen(redis_url, keys.prefix(stream, GROUP)), written)
        assert server.injected["ResourceInUseException"] == 2
        assert server.injected["dropped"] == 1
        assert server.subscriptions[SHARD] == 2
        (_, first), (_, second) = server.starts
        assert first == {"Type": "TRIM_HORIZON"}
        assert second["Type"] == "AFTER_SEQUENCE_NUMBER"


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
async def test_events_received_while_the_reader_is_busy_go_out_as_one_batch(
    kinesalite_endpoint: str, closed: bool
) -> None:
    """One-record events that arrive while the reader is busy with a batch are delivered
    merged, in batches of at most the limit (not one per event), each record once and in
    order; the next records follow the merged batches with no gap or repeat, or, on a
    closed shard, the last merged batch ends it."""
    limit, count = 25, 60
    async with FanOutServer(kinesalite_endpoint, read_limit=1) as server:
        stream = stream_name()
        await create_stream(server.url, stream)
        written = events(count)
        await put(server.url, stream, written)
        async with kinesis_client(server.url) as client:
            if closed:
                await client.split_shard(
                    StreamName=stream, ShardToSplit=SHARD, NewStartingHashKey=str(MAX_HASH // 2)
                )
                await wait_active(client, stream)
            arn = await register(client, stream, GROUP)
            metrics = Metrics()
            retrieval = fanout_module.FanOut(
                subscriber=client,
                consumer_arn=arn,
                register=lambda: register(client, stream, GROUP),
                metrics=fanout_module.FanOutMetrics(metrics),
                polling=Polling(),
                fallback=FanOutFallback.POLLING,
                on_refused=lambda: None,
            )
            feed = ShardFeed(
                kinesis=client,
                stream=stream,
                shard_id=SHARD,
                start=TRIM_HORIZON,
                batch_limit=limit,
                idle_interval=0.2,
                stopping=asyncio.Event(),
                metrics=metrics,
                backoff=Backoff(base=0.05, cap=0.5),
                answered=lambda: None,
                log=structlog.get_logger("test"),
            )
            queue: asyncio.Queue[Fetched] = asyncio.Queue(maxsize=2)  # the reader's read-ahead
            fetcher = asyncio.create_task(retrieval.fetch(feed, queue.put))
            try:
                got = [await asyncio.wait_for(queue.get(), 10)]
                # The reader is busy with its first batch until every event has been sent.
                await until(lambda: server.events[SHARD] >= count)
                while sum(len(fetched.records) for fetched in got) < count:
                    got.append(await asyncio.wait_for(queue.get(), 10))
                merged = len(got)
                if closed:  # the shard's last event may come after its last record
                    while not got[-1].ended:
                        got.append(await asyncio.wait_for(queue.get(), 10))
                    await asyncio.wait_for(fetcher, 10)  # the shard ended: fetch returns
                else:
                    await put(server.url, stream, events(5, start=count))
                    while sum(len(fetched.records) for fetched in got) < count + 5:
                        got.append(await asyncio.wait_for(queue.get(), 10))
            finally:
                fetcher.cancel()
                await asyncio.gather(fetcher, return_exceptions=True)
    records = [record for fetched in got for record in fetched.records]
    expected = written if closed else written + events(5, start=count)
    assert [record.data for record in records] == expected
    assert all(len(fetched.records) <= limit for fetched in got)
    # Only the first batches (taken, queued, being put while the events still arrived) may
    # be single events; what arrived meanwhile goes out in batches of up to the limit.
    assert merged <= count // 5, [len(fetched.records) for fetched in got[:merged]]
    assert [fetched.ended for fetched in got] == [False] * (len(got) - 1) + [closed]
    assert server.subscriptions[SHARD] == 1


async def test_merged_batches_resume_with_no_gap_and_no_repeat_across_renewals(
    kinesalite_endpoint: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow handler over a trickle of one-record events gets them in fewer batches than
    events, and subscriptions renewed while events wait in the read-ahead (dropped there,
    read again by the next one) still hand each record over once, in order per shard."""
    monkeypatch.setattr(fanout_module, "RENEW_AFTER", 0.5)
    monkeypatch.setenv("RECORDING_DELAY", "0.1")
    async with FanOutServer(kinesalite_endpoint, read_limit=1, poll_interval=0.01) as server:
        stream = stream_name()
        prefix = keys.prefix(stream, GROUP)
        await create_stream(server.url, stream, shards=2)
        settings = fanout_settings(
            server, redis_url, stream, handlers=("recording:create", "log"), batch_limit=20
        )
        stop = asyncio.Event()
        written: list[bytes] = []
        with structlog.testing.capture_logs() as logged:
            worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
            try:
                async with kinesis_client(server.url) as client:
                    for round_ in range(10):
                        batch = events(30, start=30 * round_)
                        await put_all(client, stream, batch)
                        written.extend(batch)
                        await asyncio.sleep(0.1)
                await wait_handled(redis_url, prefix, len(written))
            finally:
                stop.set()
                await asyncio.wait_for(worker, 30)
        handled = await seen(redis_url, prefix)
        assert_once_in_order(handled, written)
        assert len(handled) == len(written)
        batches = [entry for entry in logged if entry["event"] == "batch"]
        assert sum(entry["events"] for entry in batches) == len(written)
        assert len(batches) <= len(written) // 2, len(batches)
        assert min(server.subscriptions.values()) >= 2


def worker_env(url: str, redis_url: str, stream: str, **extra: str) -> dict[str, str]:
    """The process tests' worker environment, reading with fan-out."""
    return process_env(url, redis_url, stream, SUPERSIM_RETRIEVAL="fanout", **extra)


async def test_kill_9_then_restart_subscribes_from_the_checkpoints(
    fanout: FanOutServer, redis_url: str
) -> None:
    """After kill -9 a restarted worker subscribes AFTER_SEQUENCE_NUMBER of each shard's
    checkpoint: every record is handled, repeats only from the batches in flight."""
    stream = stream_name()
    prefix = keys.prefix(stream, GROUP)
    await create_stream(fanout.url, stream, shards=2)
    written = events(200)
    await put(fanout.url, stream, written)
    batch = 10
    env = worker_env(
        fanout.url, redis_url, stream, SUPERSIM_BATCH_LIMIT=str(batch), RECORDING_DELAY="0.1"
    )
    process = start_worker(env)
    try:
        await wait_handled(redis_url, prefix, 60)
    finally:
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.communicate)
    client = Redis.from_url(redis_url)
    try:
        raw = await client.hgetall(keys.checkpoints(prefix))  # type: ignore[misc]
    finally:
        await client.aclose()
    checkpoints = {k.decode(): v.decode() for k, v in raw.items()}
    assert len(await seen(redis_url, prefix)) < 200
    before = len(fanout.starts)
    env["RECORDING_DELAY"] = "0"
    env["SUPERSIM_LEASE_TTL"] = "3"
    rerun = start_worker(env, "--until-caught-up")
    try:
        _, stderr = await asyncio.to_thread(rerun.communicate, timeout=60)
    except subprocess.TimeoutExpired:
        rerun.kill()
        _, stderr = await asyncio.to_thread(rerun.communicate)
    assert rerun.returncode == 0, stderr.decode()[-6000:]
    sids = [sid for _, _, sid in await seen(redis_url, prefix)]
    assert set(sids) == {str(orjson.loads(record)["id"]) for record in written}
    assert len(sids) - len(set(sids)) <= 2 * batch
    restarted = {}
    for shard, start in fanout.starts[before:]:
        restarted.setdefault(shard, start)
    for shard, checkpoint in checkpoints.items():
        assert restarted[shard] == {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": checkpoint}


async def test_split_and_merge_while_subscribed_read_children_after_parents(
    fanout: FanOutServer, redis_url: str
) -> None:
    """A split then a merge under open subscriptions: each parent ends from its last event
    (no continuation, its ChildShards), children start after, nothing lost or repeated."""
    stream = stream_name()
    prefix = keys.prefix(stream, GROUP)
    await create_stream(fanout.url, stream, shards=1)
    settings = fanout_settings(fanout, redis_url, stream, batch_limit=25)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    try:
        await put(fanout.url, stream, events(100))
        await wait_handled(redis_url, prefix, 20)
        async with kinesis_client(fanout.url) as client:
            await client.split_shard(
                StreamName=stream,
                ShardToSplit="shardId-000000000000",
                NewStartingHashKey=str(MAX_HASH // 2 + 1),
            )
            await wait_active(client, stream)
        await put(fanout.url, stream, events(100, start=100))
        async with kinesis_client(fanout.url) as client:
            await client.merge_shards(
                StreamName=stream,
                ShardToMerge="shardId-000000000001",
                AdjacentShardToMerge="shardId-000000000002",
            )
            await wait_active(client, stream)
        await put(fanout.url, stream, events(100, start=200))
        await wait_handled(redis_url, prefix, 300)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    handled = await seen(redis_url, prefix)
    assert_once_in_order(handled, events(300))
    shards = [shard for shard, _, _ in handled]
    assert set(shards) == {f"shardId-00000000000{i}" for i in range(4)}

    def first(shard: int) -> int:
        return shards.index(f"shardId-00000000000{shard}")

    def last(shard: int) -> int:
        return len(shards) - 1 - shards[::-1].index(f"shardId-00000000000{shard}")

    assert last(0) < first(1)
    assert last(0) < first(2)
    assert last(1) < first(3)
    assert last(2) < first(3)
    assert fanout.calls["GetRecords"] == 0


@pytest.mark.parametrize("refused", ["RegisterStreamConsumer", "SubscribeToShard"])
@pytest.mark.parametrize("fallback", ["polling", "stop"])
async def test_refused_fanout_falls_back_to_polling_or_stops(
    kinesalite_endpoint: str, redis_url: str, refused: str, fallback: str
) -> None:
    """An account that refuses fan-out (at registration, or at SubscribeToShard) is logged
    as ``fanout_refused``; the worker then polls (every record handled) or stops with a
    configuration error, as SUPERSIM_FANOUT_REFUSED says."""
    faults = FanOutFaults()
    if refused == "RegisterStreamConsumer":
        faults.refuse = "AccessDeniedException"
    else:
        faults.refuse_subscriptions = "AccessDeniedException"
    async with FanOutServer(kinesalite_endpoint, faults=faults) as server:
        stream = stream_name()
        await create_stream(server.url, stream)
        written = events(30)
        await put(server.url, stream, written)
        settings = fanout_settings(server, redis_url, stream, fanout_refused=fallback)
        with structlog.testing.capture_logs() as logged:
            if fallback == "stop":
                with pytest.raises(ConfigError, match="enhanced fan-out refused"):
                    await run_worker(settings, until_caught_up=True, install_signals=False)
            else:
                summary = await run_worker(settings, until_caught_up=True, install_signals=False)
                assert summary.caught_up
        refusals = [entry for entry in logged if entry["event"] == "fanout_refused"]
        assert [entry["fallback"] for entry in refusals] == [fallback]
        assert "AccessDeniedException" in refusals[0]["reason"]
        handled = await seen(redis_url, keys.prefix(stream, GROUP))
        if fallback == "polling":
            assert_once_in_order(handled, written)
            assert server.calls["GetRecords"] > 0
        else:
            assert handled == []


async def test_deregister_removes_the_groups_stream_consumer(
    fanout: FanOutServer, redis_url: str
) -> None:
    """`fanout deregister` removes the consumer a fan-out run registered; a second one finds
    none; the next fan-out run registers it again."""
    stream = stream_name()
    await create_stream(fanout.url, stream)
    settings = fanout_settings(fanout, redis_url, stream)
    assert (await run_worker(settings, until_caught_up=True, install_signals=False)).caught_up
    assert await fanout_cli.deregister(settings)
    async with kinesis_client(fanout.url) as client:
        summary = await client.describe_stream_summary(StreamName=stream)
        arn = summary["StreamDescriptionSummary"]["StreamARN"]
        await asyncio.sleep(fanout.activation)  # DELETING, then gone
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            await client.describe_stream_consumer(StreamARN=arn, ConsumerName=GROUP)
    assert not await fanout_cli.deregister(settings)
    assert (await run_worker(settings, until_caught_up=True, install_signals=False)).caught_up
    assert fanout.calls["RegisterStreamConsumer"] == 2


# --- the polling budget ---------------------------------------------------------------------------


async def test_get_records_rate_caps_calls_per_shard(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """SUPERSIM_GET_RECORDS_RATE bounds GetRecords calls per shard per second, even for a
    shard read as often as it may be (behind, or idle with a short idle interval)."""
    proxy = await FaultProxy(kinesalite_endpoint).start()
    try:
        stream = stream_name()
        await create_stream(proxy.url, stream, shards=2)
        await put(proxy.url, stream, events(60))
        settings = worker_settings(
            proxy.url, redis_url, stream, get_records_rate=2, idle_interval=0.01, batch_limit=5
        )
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
        await proxy.called("GetRecords")
        began = time.monotonic()
        await asyncio.sleep(2.5)
        stop.set()
        await asyncio.wait_for(worker, 30)
        elapsed = time.monotonic() - began
    finally:
        await proxy.stop()
    assert set(proxy.get_records_by_shard) == {SHARD, "shardId-000000000001"}
    for shard, calls in proxy.get_records_by_shard.items():
        assert 3 <= calls <= 2 * elapsed + 2, (shard, calls)
