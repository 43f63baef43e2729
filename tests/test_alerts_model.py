"""The alert model and settings, and what alerts must never contain."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest
from alerts_support import (
    FLEET_A,
    FLEET_B,
    PREFIX,
    Clock,
    at,
    close_all,
    event,
    feed,
    finish,
    handler,
    stream_alerts,
)
from pydantic import ValidationError
from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker.errors import ConfigError
from worker.handlers import registry
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.model import alert_id
from worker.handlers.alerts.settings import AlertSettings, ThresholdOverrides, Thresholds


def test_alert_id_names_the_episode_not_the_delivery() -> None:
    """The alert id depends only on kind, subject and episode start."""
    first = alert_id("rejection_storm", "sim:HS1", 1_709_251_285_000)
    assert first == alert_id("rejection_storm", "sim:HS1", 1_709_251_285_000)
    assert first.startswith("rejection_storm-")
    assert first != alert_id("rejection_storm", "sim:HS1", 1_709_251_286_000)
    assert first != alert_id("attach_loop", "sim:HS1", 1_709_251_285_000)
    assert first != alert_id("rejection_storm", "sim:HS2", 1_709_251_285_000)


def test_alert_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SUPERSIM_ALERTS__...`` variables set every field; log is always among the sinks."""
    env = {
        "SUPERSIM_ALERTS__SINKS": "webhook, stream",
        "SUPERSIM_ALERTS__WEBHOOK__URL": "https://alerts.example.com/hook",
        "SUPERSIM_ALERTS__WEBHOOK__SECRET": "s3cret",
        "SUPERSIM_ALERTS__WEBHOOK__TIMEOUT": "2.5",
        "SUPERSIM_ALERTS__STALE_AFTER": "PT2H",
        "SUPERSIM_ALERTS__THRESHOLDS__STORM_REJECTIONS": "7",
        "SUPERSIM_ALERTS__FLEETS": '{"HF1": {"storm_window": 60, "fleet_sims": 5}}',
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    alerts = registry.read_section("alerts", AlertSettings)
    assert isinstance(alerts, AlertSettings)
    assert alerts.sinks == ("log", "stream", "webhook")
    assert alerts.webhook.url == "https://alerts.example.com/hook"
    assert alerts.webhook.secret is not None
    assert alerts.webhook.secret.get_secret_value() == "s3cret"
    assert alerts.webhook.timeout == timedelta(seconds=2.5)
    assert alerts.stale_after == timedelta(hours=2)
    assert alerts.thresholds.storm_rejections == 7
    assert alerts.fleets["HF1"].storm_window == timedelta(minutes=1)
    assert "s3cret" not in repr(alerts)


def test_webhook_sink_needs_a_url_and_a_secret() -> None:
    """Choosing the webhook sink without where and how to sign fails at start-up."""
    with pytest.raises(ValidationError, match=r"webhook\.url and webhook\.secret"):
        AlertSettings(sinks="webhook", webhook={"url": "https://example.com"})
    with pytest.raises(ValidationError, match="http"):
        AlertSettings(webhook={"url": "ftp://example.com"})


def test_fleet_overrides_apply_to_that_fleet_only() -> None:
    """A fleet's overrides replace just the fields they set."""
    alerts = AlertSettings(
        thresholds=Thresholds(storm_rejections=12),
        fleets={FLEET_A: ThresholdOverrides(fleet_sims=3, storm_window=timedelta(minutes=1))},
    )
    tuned = alerts.for_fleet(FLEET_A)
    assert (tuned.fleet_sims, tuned.storm_window, tuned.storm_rejections) == (
        3,
        timedelta(minutes=1),
        12,
    )
    assert alerts.for_fleet(FLEET_B) == alerts.thresholds
    assert alerts.for_fleet(None) == alerts.thresholds


def test_unknown_sinks_are_refused_with_the_choices() -> None:
    """A misspelt sink fails at start-up, naming the sinks there are."""
    with pytest.raises(ValidationError, match=r"unknown sink\(s\) webhok \(allowed: log, stream"):
        AlertSettings(sinks="stream,webhok")


async def test_registry_builds_the_alert_handlers_by_name(redis: Redis) -> None:
    """``rejections``, ``data_limit`` and ``attach_loops`` are built-in handler names, and
    they share one validated ``alerts`` section (the defaults without variables)."""
    built = registry.build(["rejections", "data_limit", "attach_loops"], redis, PREFIX)
    assert [h.name for h in built] == ["rejections", "data_limit", "attach_loops"]
    assert all(isinstance(h, AlertHandler) for h in built)
    first = built[0]
    assert isinstance(first, AlertHandler)
    assert first.settings == AlertSettings()
    assert all(h.settings is first.settings for h in built if isinstance(h, AlertHandler))
    assert registry.alert_handler_names() == ["attach_loops", "data_limit", "rejections"]
    for item in built:
        await item.close()


PERSONAL = {
    "imsi": "732123209999999",
    "imei": "358600849999999",
    "sim_iccid": "89883070000009999999",
    "ip_address": "100.99.88.77",
    "location__lat": 12.3456789,
    "location__cell_id": "987654321",
}


async def test_alerts_and_their_logs_hold_no_personal_data(redis: Redis) -> None:
    """IMSI, IMEI, ICCID, IP address and location never reach an alert or a log line."""
    clock = Clock(at(3600))
    handlers = [handler(n, redis, clock) for n in ("rejections", "data_limit", "attach_loops")]
    events = [
        *[event("attachment.rejected", i, i * 10, **PERSONAL) for i in range(12)],
        *[event("attachment.accepted", i, 200 + i * 10, **PERSONAL) for i in range(6)],
        event("data-session.updated", 1, 300, data_modifier="blocked", **PERSONAL),
    ]
    with capture_logs() as logs:
        await feed(handlers, events)
        await finish(handlers, at(2000))
    alerts = await stream_alerts(redis)
    assert {a["kind"] for a in alerts} == {"rejection_storm", "attach_loop", "data_limit_reached"}
    text = orjson.dumps(alerts).decode() + orjson.dumps(logs, default=str).decode()
    for value in PERSONAL.values():
        assert str(value) not in text
    await close_all(handlers)


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_stale_after_sends_every_episode(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """An empty ``SUPERSIM_ALERTS__STALE_AFTER`` means no limit (None), as documented; a
    value that is not a duration is still refused, naming the variable."""
    monkeypatch.setenv("SUPERSIM_ALERTS__STALE_AFTER", value)
    alerts = registry.read_section("alerts", AlertSettings)
    assert isinstance(alerts, AlertSettings)
    assert alerts.stale_after is None
    assert AlertSettings(stale_after="").stale_after is None
    monkeypatch.setenv("SUPERSIM_ALERTS__STALE_AFTER", "soon")
    with pytest.raises(ConfigError, match="SUPERSIM_ALERTS__STALE_AFTER"):
        registry.read_section("alerts", AlertSettings)
