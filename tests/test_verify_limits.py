"""verify's limit arithmetic (verify/limits.py) and replica comparison (verify/replicas.py), without
a server: the JSON shapes are those nats-server 2.15.1 answers ($JS.API.INFO, STREAM.INFO, /jsz)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verify import limits, replicas
from verify.limits import Usage

GiB = 1 << 30


def stream(consumers: int = 0, replicas: int = 1, **config: Any) -> dict[str, Any]:
    """A STREAM.INFO answer."""
    state = {"messages": config.pop("messages", 0), "bytes": config.pop("bytes", 0), "consumer_count": consumers}
    base = {"max_consumers": -1, "max_msgs": -1, "max_bytes": -1, "discard": "old", "num_replicas": replicas}
    return {"config": base | config, "state": state}


def account(**figures: Any) -> dict[str, Any]:
    """A $JS.API.INFO answer; limits from the `max_*` keywords (-1: none)."""
    limit_names = ("max_memory", "max_storage", "max_streams", "max_consumers")
    info = {"memory": 0, "storage": 0, "streams": 0, "consumers": 0} | {
        k: v for k, v in figures.items() if k not in limit_names and k != "tiers"
    }
    info["limits"] = {name: figures.get(name, -1) for name in limit_names}
    if "tiers" in figures:
        info["tiers"] = figures["tiers"]
    return info


# --- the arithmetic -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 0, None, "", "unlimited"])
def test_no_limit(value: Any) -> None:
    assert limits.limited(value) is None


def test_a_limit() -> None:
    assert limits.limited(1024) == 1024
    assert limits.limited("5") == 5


@pytest.mark.parametrize(
    ("used", "level", "percent"),
    [(0, "ok", 0), (799, "ok", 79), (800, "warn", 80), (999, "warn", 99), (1000, "fail", 100), (1200, "fail", 120)],
)
def test_thresholds(used: int, level: str, percent: int) -> None:
    figure = Usage("stream S", "max_msgs", used, 1000, "capacity")
    assert figure.level == level
    assert figure.percent == percent


@given(st.integers(min_value=0, max_value=10**15), st.integers(min_value=1, max_value=10**15))
def test_level_is_the_exact_ratio(used: int, maximum: int) -> None:
    ratio = Fraction(used, maximum)
    level = Usage("s", "l", used, maximum, "capacity").level
    assert level == ("fail" if ratio >= 1 else "warn" if ratio >= Fraction(4, 5) else "ok")


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (10 * GiB, "10.0 GiB"), (5 << 40, "5.0 TiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    assert limits.human_bytes(count) == text


def test_usage_without_a_limit_is_none() -> None:
    assert limits.usage("stream S", "max_bytes", 10, -1, "capacity") is None
    assert limits.usage("stream S", "max_bytes", 10, 0, "capacity") is None


def test_judge_splits_warnings_and_failures() -> None:
    ok, warn, fail = (Usage("s", name, used, 10, "capacity") for name, used in (("a", 1), ("b", 8), ("c", 10)))
    warnings, failures = limits.judge([ok, None, warn, fail])
    assert (warnings, failures) == ([warn], [fail])


# --- consumers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("own", "shared", "default", "expected"),
    [
        (-1, -1, None, None),
        (-1, -1, 1000, (1000, "the server's default_max_consumers")),
        (-1, 1024, 1000, (1024, "the account's max_consumers (counted per stream)")),
        (50, 1024, 1000, (50, "its max_consumers")),
        (2000, 1024, 1000, (1024, "the account's max_consumers (counted per stream)")),
        (1100, -1, 1000, (1100, "its max_consumers")),
        (0, 0, 0, None),
    ],
)
def test_consumer_limit_is_the_one_the_server_applies(own: int, shared: int, default: Any, expected: Any) -> None:
    assert limits.consumer_limit({"max_consumers": own}, {"max_consumers": shared}, default) == expected


def test_account_limit_counts_per_stream_not_across_the_account() -> None:
    """The lab's case: the account held 1024 consumers on one stream; the stream is full, and the
    account-wide total (over several streams) is not what the server compares."""
    info = account(consumers=1300, max_consumers=1024)
    streams = {"INFRASTRUCTURE_EVENTS": stream(consumers=1024), "OTHER": stream(consumers=276)}
    usages = {u.scope: u for u in limits.consumer_usages(streams, info)}
    assert usages["stream INFRASTRUCTURE_EVENTS"].level == "fail"
    assert usages["stream OTHER"].level == "ok"
    message = usages["stream INFRASTRUCTURE_EVENTS"].message()
    assert message.startswith("stream INFRASTRUCTURE_EVENTS: consumers vs the account's max_consumers")
    assert "reached 100% (1024 of 1024" in message


def test_consumers_warn_at_80_percent_of_the_account_limit() -> None:
    usages = limits.consumer_usages({"S": stream(consumers=820)}, account(max_consumers=1024))
    assert [u.level for u in usages] == ["warn"]
    assert "at 80% (820 of 1024" in usages[0].message()
    assert usages[0].runbook == limits.CONSUMERS_RUNBOOK


def test_stream_own_consumer_limit_binds_first() -> None:
    (figure,) = limits.consumer_usages({"S": stream(consumers=45, max_consumers=50)}, account(max_consumers=1024))
    assert figure.level == "warn"
    assert figure.limit == "consumers vs its max_consumers"


def test_unlimited_stream_falls_back_to_the_server_default() -> None:
    (figure,) = limits.consumer_usages({"S": stream(consumers=1000)}, account(), server_default=1000)
    assert figure.level == "fail"
    assert "default_max_consumers" in figure.limit
    assert limits.consumer_usages({"S": stream(consumers=1000)}, account()) == []


def test_tiered_account_limits_by_replicas() -> None:
    tiers = {
        "R1": {"memory": 0, "storage": 0, "streams": 1, "consumers": 5, "limits": {"max_consumers": 100}},
        "R3": {"memory": 0, "storage": 0, "streams": 1, "consumers": 9, "limits": {"max_consumers": 10}},
    }
    info = account(tiers=tiers, max_consumers=0)
    streams = {"ONE": stream(consumers=5, replicas=1), "THREE": stream(consumers=9, replicas=3)}
    usages = {u.scope: u for u in limits.consumer_usages(streams, info)}
    assert (usages["stream ONE"].maximum, usages["stream ONE"].level) == (100, "ok")
    assert (usages["stream THREE"].maximum, usages["stream THREE"].level) == (10, "warn")


# --- account, stream and server capacity ---------------------------------------------------


def test_account_usages() -> None:
    info = account(memory=0, storage=44 * GiB, streams=64, max_memory=3 * GiB, max_storage=48 * GiB, max_streams=64)
    usages = {u.limit: u for u in limits.account_usages("APP", info)}
    assert usages["max_memory"].level == "ok"
    assert usages["max_storage"].level == "warn"
    assert usages["max_storage"].message() == "account APP: max_storage at 91% (44.0 GiB of 48.0 GiB)"
    assert usages["max_streams"].level == "fail"
    assert usages["max_streams"].message().startswith("account APP: max_streams reached 100% (64 of 64")
    assert {u.runbook for u in usages.values()} == {limits.CAPACITY_RUNBOOK}


def test_unlimited_account_has_nothing_to_judge() -> None:
    assert limits.account_usages("APP", account(memory=5, storage=5, streams=5)) == []


def test_tiers_are_judged_each() -> None:
    tiers = {"R3": {"memory": 0, "storage": 90, "streams": 1, "limits": {"max_storage": 100}}}
    (figure,) = limits.account_usages("APP", account(tiers=tiers, max_storage=0))
    assert figure.scope == "account APP tier R3"
    assert figure.level == "warn"


def test_stream_bytes_and_messages() -> None:
    full = stream(bytes=850, max_bytes=1000, messages=10, max_msgs=10)
    usages = {u.limit: u for u in limits.stream_usages("ORDERS", full)}
    assert usages["max_bytes"].message() == (
        "stream ORDERS: max_bytes at 85% (850 B of 1000 B; discard old: at the limit the oldest messages are deleted)"
    )
    assert usages["max_msgs"].level == "fail"
    refusing = stream(bytes=1000, max_bytes=1000, discard="new")
    (figure,) = limits.stream_usages("ORDERS", refusing)
    assert figure.level == "fail"
    assert "discard new: at the limit publishes are refused" in figure.message()


def test_stream_without_limits() -> None:
    assert limits.stream_usages("S", stream(bytes=10**12, messages=10**9)) == []


def test_server_usages_from_jsz() -> None:
    jsz = {
        "memory": 0,
        "storage": 13 * GiB,
        "ha_assets": 3,
        "config": {"max_memory": GiB, "max_storage": 16 * GiB, "store_dir": "/x"},
        "limits": {"default_max_consumers": 1000},
    }
    usages = {u.limit: u for u in limits.server_usages("nats-1", jsz)}
    assert set(usages) == {"max_file_store", "max_memory_store"}
    assert usages["max_file_store"].message() == "server nats-1: max_file_store at 81% (13.0 GiB of 16.0 GiB)"
    jsz["limits"] = {"max_ha_assets": 3}
    assert {u.limit: u for u in limits.server_usages("nats-1", jsz)}["max_ha_assets"].level == "fail"


def test_account_line() -> None:
    info = account(consumers=13, streams=2, storage=43, max_consumers=10, max_streams=5, max_storage=100 * 2**20)
    streams = {"S": stream(consumers=10), "T": stream(consumers=3, max_consumers=3)}
    assert limits.account_line("APP", info, streams) == (
        "account APP: consumers 13, fullest stream S 10 of 10, streams 2 of 5, memory 0 B (no limit), "
        "storage 43 B of 100.0 MiB"
    )


# --- replicas -------------------------------------------------------------------------------

SERVERS = {"n1": "nats-1", "n2": "nats-2", "n3": "nats-3"}


def jsz(streams: dict[str, tuple[int, int, int, int]], leader: str = "n1", acc: str = "APP") -> dict[str, Any]:
    """One server's /jsz?accounts=true&streams=true: each stream's replica figures (first_seq,
    last_seq, messages, bytes), placed on n1..n3 with `leader`."""
    details = []
    for name, (first, last, messages, size) in streams.items():
        details.append(
            {
                "name": name,
                "cluster": {"leader": leader, "replicas": [{"name": s} for s in SERVERS if s != leader]},
                "state": {"first_seq": first, "last_seq": last, "messages": messages, "bytes": size},
            }
        )
    return {"account_details": [{"name": acc, "id": acc, "stream_detail": details}]}


def sample(figures: dict[str, tuple[int, int, int, int]], stream: str = "S") -> dict[str, Any]:
    """host -> /jsz for one stream whose replica on each host has the given figures."""
    return {host: jsz({stream: f}) for host, f in figures.items()}


SAME = (1, 10, 10, 430)


def test_replicas_that_agree() -> None:
    copies = replicas.collect(sample(dict.fromkeys(SERVERS.values(), SAME)), SERVERS)[("APP", "S")]
    assert copies.leader == "nats-1"
    assert copies.placed == {"nats-1", "nats-2", "nats-3"}
    assert replicas.differences(copies, {"nats-1", "nats-2", "nats-3"}) == []


def test_a_follower_that_differs_is_named_with_the_figures() -> None:
    seen = sample({"nats-1": SAME, "nats-2": (1, 8, 8, 344), "nats-3": SAME})
    copies = replicas.collect(seen, SERVERS)[("APP", "S")]
    assert replicas.differences(copies, set(seen)) == [
        "nats-2 has last_seq 8 vs 10, messages 8 vs 10, bytes 344 vs 430 (leader: nats-1)"
    ]


def test_same_sequences_other_content() -> None:
    """Jepsen's kind of divergence: the same last sequence, a message missing in the middle."""
    seen = sample({"nats-1": SAME, "nats-2": SAME, "nats-3": (1, 10, 9, 387)})
    copies = replicas.collect(seen, SERVERS)[("APP", "S")]
    assert replicas.differences(copies, set(seen)) == ["nats-3 has messages 9 vs 10, bytes 387 vs 430 (leader: nats-1)"]


def test_without_the_leader_most_replicas_are_the_reference() -> None:
    seen = {"nats-2": jsz({"S": (1, 7, 7, 1)}, leader="n1"), "nats-3": jsz({"S": (1, 7, 7, 1)}, leader="n1")}
    seen["nats-1"] = {}  # answered, but lists no stream: it holds no copy
    copies = replicas.collect({"nats-2": seen["nats-2"], "nats-3": seen["nats-3"]}, SERVERS)[("APP", "S")]
    assert replicas.differences(copies, set(seen)) == ["nats-1 holds no copy"]
    # An election under way: no server names a leader the inventory knows.
    odd = {
        host: jsz({"S": f}, leader="n9")
        for host, f in {"nats-1": (1, 7, 7, 1), "nats-2": (1, 7, 7, 1), "nats-3": (1, 6, 6, 1)}.items()
    }
    copies = replicas.collect(odd, SERVERS)[("APP", "S")]
    assert copies.leader is None
    assert replicas.differences(copies, set(odd)) == [
        "nats-3 has last_seq 6 vs 7, messages 6 vs 7 (most replicas: nats-1)"
    ]


class Clock:
    """A fake clock: sleeping advances it, each sample costs 10 ms."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(samples: list[dict[str, Any]], first: dict[str, Any] | None = None, window: float = 2.0) -> Any:
    clock, feed = Clock(), iter(samples)

    def take() -> dict[str, Any]:
        clock.now += 0.01
        return next(feed)

    settled = replicas.settle(take, SERVERS, first=first, window=window, clock=clock, sleep=clock.sleep)
    return settled, len(samples) - sum(1 for _ in feed)


def test_agreeing_first_sample_costs_nothing_more() -> None:
    agreed = sample(dict.fromkeys(SERVERS.values(), SAME))
    settled, taken = run([], first=agreed)
    assert (settled.divergent, settled.trailing, settled.samples, taken, settled.compared) == ({}, [], 1, 0, 1)


def test_a_replica_that_catches_up_is_fine() -> None:
    behind = sample({"nats-1": SAME, "nats-2": (1, 9, 9, 387), "nats-3": SAME})
    caught_up = sample(dict.fromkeys(SERVERS.values(), SAME))
    settled, taken = run([caught_up], first=behind)
    assert (settled.divergent, settled.samples, taken) == ({}, 2, 1)


def test_a_replica_that_never_agrees_fails_within_the_window() -> None:
    stuck = sample({"nats-1": SAME, "nats-2": (1, 9, 9, 387), "nats-3": SAME})
    settled, taken = run([stuck] * 50, first=stuck, window=2.0)
    assert settled.divergent == {
        ("APP", "S"): ["nats-2 has last_seq 9 vs 10, messages 9 vs 10, bytes 387 vs 430 (leader: nats-1)"]
    }
    assert settled.seconds <= 2.0
    assert 5 <= settled.samples <= 11, settled.samples
    assert taken == settled.samples - 1


def test_followers_trailing_a_live_writer_are_not_divergent() -> None:
    """Every sample catches the followers a message or two behind a leader that keeps moving."""
    moving = [
        sample(
            {
                "nats-1": (1, last, last, last),
                "nats-2": (1, last - 1, last - 1, last - 1),
                "nats-3": (1, last - 2, last - 2, last - 2),
            }
        )
        for last in range(100, 2000, 50)
    ]
    settled, _ = run(moving)
    assert settled.divergent == {}
    assert settled.trailing == [("APP", "S")]


def test_a_stuck_follower_behind_a_live_writer_is_divergent() -> None:
    moving = [
        sample({"nats-1": (1, last, last, last), "nats-2": (1, last, last, last), "nats-3": (1, 90, 90, 90)})
        for last in range(100, 2000, 50)
    ]
    settled, _ = run(moving)
    assert list(settled.divergent) == [("APP", "S")]
    assert settled.trailing == []


def test_the_cached_first_sample_does_not_count_as_progress() -> None:
    """Trailing needs two fresh samples: the first (another check's, seconds old) says nothing about now."""
    old = sample({"nats-1": (1, 5, 5, 5), "nats-2": (1, 4, 4, 4), "nats-3": SAME})
    stuck = sample({"nats-1": (1, 20, 20, 20), "nats-2": (1, 6, 6, 6), "nats-3": (1, 20, 20, 20)})
    settled, _ = run([stuck] * 20, first=old)
    assert list(settled.divergent) == [("APP", "S")]


def test_single_copy_and_vanished_streams_are_not_compared() -> None:
    r1 = {
        "nats-1": {
            "account_details": [
                {
                    "name": "APP",
                    "stream_detail": [{"name": "R1", "cluster": {"leader": "n1"}, "state": {"last_seq": 3}}],
                }
            ]
        }
    }
    r1 |= {"nats-2": {}, "nats-3": {}}
    settled, _ = run([], first=r1)
    assert (settled.compared, settled.divergent) == (0, {})
    differing = sample({"nats-1": SAME, "nats-2": (1, 9, 9, 387), "nats-3": SAME})
    deleted: dict[str, Any] = {host: {} for host in SERVERS.values()}
    settled, _ = run([deleted], first=differing)
    assert settled.divergent == {}


def test_window_zero_is_one_sample() -> None:
    stuck = sample({"nats-1": SAME, "nats-2": (1, 9, 9, 387), "nats-3": SAME})
    settled, taken = run([stuck], first=stuck, window=0)
    assert (settled.samples, taken, list(settled.divergent)) == (1, 0, [("APP", "S")])


def test_streams_of_several_accounts_are_apart() -> None:
    seen = {
        host: {
            "account_details": [
                *jsz({"S": SAME}, acc="A")["account_details"],
                *jsz({"S": f}, acc="B")["account_details"],
            ]
        }
        for host, f in {"nats-1": SAME, "nats-2": (1, 9, 9, 1), "nats-3": SAME}.items()
    }
    settled, _ = run([], first=seen, window=0)
    assert list(settled.divergent) == [("B", "S")]
