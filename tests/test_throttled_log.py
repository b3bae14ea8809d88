"""The throttled log: the first line of a kind at once, then at most one per interval with a count of the rest."""

from __future__ import annotations

import logging

import pytest

from chat_service.throttled_log import ThrottledLog


def test_one_line_per_kind_per_interval_counting_what_was_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttled = ThrottledLog(logging.getLogger("throttled-test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="throttled-test"):
        for peer in range(1000):
            throttled.warning("bad", "bad request from %s", peer)
        throttled.warning("other", "another kind")
        now[0] += 9.9
        throttled.warning("bad", "bad request from %s", "late")
        now[0] += 0.1
        throttled.warning("bad", "bad request from %s", "next")
        throttled.warning("bad", "bad request from %s", "too soon")
        now[0] += 60.0
        throttled.warning("bad", "bad request from %s", "much later")
    assert [record.getMessage() for record in caplog.records] == [
        "bad request from 0",
        "another kind",
        "bad request from next (1000 more like it since the last such line)",
        "bad request from much later (1 more like it since the last such line)",
    ]


def test_each_client_has_its_own_interval_and_the_table_stays_bounded(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("throttled-test"), interval=10.0, clock=lambda: now[0], max_keys=100)
    with caplog.at_level(logging.INFO, logger="throttled-test"):
        for _ in range(3):
            throttled.info("bad", "bad request from %s", "10.0.0.1", client="10.0.0.1", extra={"peer": "10.0.0.1"})
            throttled.info("bad", "bad request from %s", "10.0.0.2", client="10.0.0.2")
        for peer in range(1000):
            throttled.info("bad", "bad request from %s", peer, client=str(peer))
            now[0] += 0.001
    messages = [record.getMessage() for record in caplog.records]
    assert messages[:2] == ["bad request from 10.0.0.1", "bad request from 10.0.0.2"]
    assert len(messages) == 1002
    assert {record.levelno for record in caplog.records} == {logging.INFO}
    assert getattr(caplog.records[0], "peer", None) == "10.0.0.1"
    assert len(throttled._keys) <= 101
