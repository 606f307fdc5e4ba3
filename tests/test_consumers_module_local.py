"""The jetstream_consumers module against a real single-node nats-server on loopback: 263 leaked
consumers (more than one 256-entry page of the list API) beside 5 live ones, each live for a
different reason; report, check mode, name pattern, deletion, idempotence, the stream default
inactive threshold, errors, the 30 s minimum, declared consumers kept through the role; and, run
in-process, the recheck before deletion and the completeness of the listing when the server's
list leaves consumers out (the lab's clustered list did: 623 of 1024).

Staleness needs real idle time on the server's clock: the shared world is built once and waits
past the module's minimum stale_after (30 s) once, for every test of this file."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import nats
import pytest
import yaml
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tests.helpers import REPO, ansible_env, load_plugin_module, run_playbook
from tests.local_nats import free_port, local_jetstream

STREAM = "EVENTS"
LEAKED_DURABLE = 260
LEAKED_EPHEMERAL = 3
LIVE = {
    "live-pending": "5 pending",
    "live-ackpending": "5 awaiting ack",
    "live-recent": "active",
    "live-waiting": "1 waiting pull",
    "live-push": "push bound",
}
STALE_AFTER = 30.0  # the module's minimum
# Streams of their own for the tests that delete or play an incomplete cluster: leaked consumers
# (and, in SPREAD, one with pending messages that a configuration-only entry would make look stale).
SPREAD = "SPREAD"
SPREAD_LEAKED = [f"spread-{n:02d}" for n in range(40)]
BLIND = "BLIND"
BLIND_LEAKED = [f"blind-{n:02d}" for n in range(12)]
DECLARED = "DECLARED"


def leak(**extra: Any) -> ConsumerConfig:
    """Leaked: reads the orders topic from "new" on, then never again, so nothing is ever pending."""
    return ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW, filter_subject="events.orders", **extra
    )


async def create_world(url: str) -> list[str]:
    """The stream, its 5 order messages and every consumer; returns the ephemerals' names."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["events.>"])
    await js.add_stream(name="QUIET", subjects=["quiet.>"])
    await js.add_stream(
        name="LIMITED", subjects=["limited.>"], consumer_limits={"inactive_threshold": 1800 * 10**9}
    )  # raw: ns
    # A consumer asking for a longer inactive_threshold than a stream default the test sets.
    await js.add_stream(name="GREEDY", subjects=["greedy.>"])
    await js.publish("greedy.x", b"unread")
    await js.add_consumer("GREEDY", ConsumerConfig(durable_name="patient", inactive_threshold=3600))
    for n in range(5):
        await js.publish("events.orders", str(n).encode())
    for first in range(0, LEAKED_DURABLE, 50):
        await asyncio.gather(
            *(
                js.add_consumer(STREAM, leak(durable_name=f"leak-{n}"))
                for n in range(first, min(first + 50, LEAKED_DURABLE))
            )
        )
    ephemerals = [(await js.add_consumer(STREAM, leak(inactive_threshold=3600))).name for _ in range(LEAKED_EPHEMERAL)]
    for stream, names in ((SPREAD, SPREAD_LEAKED), (BLIND, BLIND_LEAKED), (DECLARED, ["keep-me", "drop-me"])):
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        await asyncio.gather(
            *(
                js.add_consumer(
                    stream,
                    ConsumerConfig(
                        durable_name=name, deliver_policy=DeliverPolicy.NEW, filter_subject=f"{stream.lower()}.none"
                    ),
                )
                for name in names
            )
        )
    await js.publish("spread.pending", b"1")
    await js.publish("spread.pending", b"2")
    await js.add_consumer(SPREAD, ConsumerConfig(durable_name="spread-pending", filter_subject="spread.pending"))
    await js.add_consumer(STREAM, ConsumerConfig(durable_name="live-pending", filter_subject="events.orders"))
    unacked = await js.pull_subscribe("events.orders", durable="live-ackpending", stream=STREAM)
    assert len(await unacked.fetch(5, timeout=2)) == 5  # fetched, never acked
    for name, subject in (("live-recent", "events.heartbeat"), ("live-waiting", "events.nothing")):
        await js.add_consumer(STREAM, ConsumerConfig(durable_name=name, filter_subject=subject))
    await nc.close()
    return ephemerals


class LiveClient:
    """Keeps live-recent active (publish, fetch, ack every 0.3 s), a pull request of live-waiting
    outstanding and a subscriber on live-push, from its own thread, while playbooks run."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),), daemon=True)

    async def main(self) -> None:
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        await nc.subscribe("_INBOX.live-waiting")  # interest keeps the pull request waiting
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.live-waiting",
            json.dumps({"batch": 1, "expires": 600 * 10**9}).encode(),
            reply="_INBOX.live-waiting",
        )
        await js.subscribe("events.push", durable="live-push", stream=STREAM)
        recent = await js.pull_subscribe_bind("live-recent", stream=STREAM)
        while not self.stopping.is_set():
            await js.publish("events.heartbeat", b"beat")
            for msg in await recent.fetch(1, timeout=1):
                await msg.ack_sync()
            self.ready.set()
            await asyncio.sleep(0.3)
        await nc.close()

    def __enter__(self) -> LiveClient:
        self.thread.start()
        assert self.ready.wait(10), "live client did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """(server URL, ephemeral names), with every leaked consumer idle past STALE_AFTER."""
    with local_jetstream(tmp_path_factory.mktemp("nats")) as url:
        ephemerals = asyncio.run(create_world(url))
        with LiveClient(url):
            time.sleep(STALE_AFTER + 1)
            yield url, ephemerals


def play(tmp_path: Path, tasks: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]], str]:
    """Runs jetstream_consumers once per task (each a dict of options, plus optional task keywords
    under "_task"); returns every task's result."""
    body = []
    for n, options in enumerate(tasks):
        task = {"name": f"Consumers {n}", "jetstream_consumers": {k: v for k, v in options.items() if k != "_task"}}
        body.append(task | {"register": f"result{n}"} | options.get("_task", {}))
    playbook = tmp_path / "consumers.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Consumers on a local server",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
                    "tasks": body,
                }
            ]
        )
    )
    result = run_playbook(
        str(playbook),
        "localhost,",
        json_output=True,
        timeout=120,
        env=ansible_env(ANSIBLE_LIBRARY=str(REPO / "plugins/modules")),
    )
    try:
        plays = json.loads(result.stdout)["plays"]
        outcomes = [task["hosts"]["localhost"] for task in plays[0]["tasks"]]
    except (ValueError, KeyError, IndexError):
        outcomes = []
    return result.returncode, outcomes, result.stdout[-4000:] + result.stderr[-2000:]


def consumer_names(url: str, stream: str = STREAM) -> set[str]:
    async def read() -> set[str]:
        nc = await nats.connect(url)
        reply = await nc.request(f"$JS.API.CONSUMER.NAMES.{stream}", b"{}")
        await nc.close()
        return set(json.loads(reply.data).get("consumers") or [])  # one page holds 1024

    return asyncio.run(read())


def delete_streams(url: str, *streams: str) -> None:
    async def delete() -> None:
        nc = await nats.connect(url)
        for stream in streams:
            await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"")
        await nc.close()

    asyncio.run(delete())


def other_leaks(url: str) -> set[str]:
    """The leaked consumers of the tests' own streams, where those tests have not run (and
    cleaned up) before: stale too, so a run over every stream deletes them."""
    return {
        f"{stream}/{name}"
        for stream in (SPREAD, BLIND, DECLARED)
        for name in consumer_names(url, stream)
        if name != "spread-pending"
    }


def leaked_labels(ephemerals: list[str]) -> set[str]:
    return {f"{STREAM}/leak-{n}" for n in range(LEAKED_DURABLE)} | {f"{STREAM}/{e}" for e in ephemerals}


def test_report_check_mode_and_pattern_change_nothing(tmp_path: Path, world: tuple[str, list[str]]) -> None:
    url, ephemerals = world
    before = consumer_names(url)
    assert len(before) == LEAKED_DURABLE + LEAKED_EPHEMERAL + len(LIVE) > 256
    common = {"servers": [url], "streams": [STREAM], "stale_after": f"{STALE_AFTER:g}s"}
    started = time.monotonic()
    code, (report, checked, pattern), output = play(
        tmp_path,
        [
            common,
            common | {"delete": True, "_task": {"check_mode": True}},
            common | {"name_pattern": "leak-1*"},
        ],
    )
    took = time.monotonic() - started
    assert code == 0, output

    # Every consumer reported, across the list API's pages; exactly the leaked ones stale.
    assert len(report["consumers"]) == len(before)
    assert set(report["stale"]) == leaked_labels(ephemerals)
    assert not report["changed"] and report["deleted"] == [] and report["kept_on_recheck"] == []
    by_name = {c["name"]: c for c in report["consumers"]}
    for name, words in LIVE.items():
        assert not by_name[name]["stale"] and words in by_name[name]["reason"], by_name[name]
    assert by_name["live-waiting"]["num_waiting"] == 1
    assert by_name["live-ackpending"]["num_ack_pending"] == 5 and by_name["live-ackpending"]["idle_seconds"] > 2
    leak = by_name["leak-7"]
    assert leak["durable"] and leak["idle_seconds"] > STALE_AFTER and leak["reason"].startswith("idle ")
    assert leak["reason"].endswith("> 30s, nothing pending")
    assert not by_name[ephemerals[0]]["durable"]
    assert report["table"][0].split() == ["STREAM", "CONSUMER", "KIND", "IDLE", "ACTION"]
    assert len(report["table"]) == 1 + len(report["stale"]) + 1
    assert report["table"][-1] == (
        f"{len(before)} consumers in 1 stream: {len(before)} seen, 0 not seen; 263 stale (report only: none deleted); "
        "0 declared in the inventory (never deleted)"
    )
    assert report["counts"] == {
        "streams": 1,
        "names": len(before),
        "seen": len(before),
        "listed": len(before),
        "unseen": 0,
        "gone": 0,
        "stale": 263,
        "deleted": 0,
        "kept_on_recheck": 0,
        "gone_before_deletion": 0,
        "failed": 0,
        "declared": 0,
    }
    assert report["unseen"] == []

    # Check mode with delete: would delete every leaked one, deletes none.
    assert checked["changed"] and set(checked["deleted"]) == leaked_labels(ephemerals)
    assert checked["table"][1].split()[-2:] == ["would", "delete"]
    assert "; 263 stale: 263 would be deleted, 0 kept on recheck;" in checked["msg"]

    # The pattern: leak-1, leak-10..19, leak-100..199; the rest kept by name.
    assert len(pattern["stale"]) == 111 and all(s.startswith(f"{STREAM}/leak-1") for s in pattern["stale"])
    assert "name does not match 'leak-1*'" in {c["name"]: c for c in pattern["consumers"]}["leak-2"]["reason"]

    assert consumer_names(url) == before, "a report or check mode run changed consumers"
    print(f"3 runs over {len(before)} consumers: {took:.1f} s")


def role_play(tmp_path: Path, variables: dict[str, Any]) -> tuple[int, dict[str, Any], list[str], str]:
    """The runbook's role entry point (jetstream_streams, tasks_from stale_consumers) on the
    controller against the local server; returns the module's result and the lines it showed."""
    playbook = tmp_path / "purge.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Purge on a local server",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"}
                    | {
                        "jetstream_streams_user": "",
                        "jetstream_streams_password": "",
                        "jetstream_streams_tls_ca_file": "",
                    }
                    | variables,
                    "tasks": [
                        {
                            "name": "Purge | the role",
                            "ansible.builtin.include_role": {
                                "name": "jetstream_streams",
                                "tasks_from": "stale_consumers",
                            },
                        }
                    ],
                }
            ]
        )
    )
    result = run_playbook(str(playbook), "localhost,", json_output=True, timeout=120)
    found: dict[str, Any] = {}
    lines: list[str] = []
    try:
        for task in json.loads(result.stdout)["plays"][0]["tasks"]:
            outcome = task["hosts"].get("localhost", {})
            if task["task"]["name"].endswith("Consumers | find stale consumers across the streams"):
                found = outcome
            if task["task"]["name"].endswith("Consumers | show the stale consumers and the counts"):
                lines = list(outcome.get("msg") or [])
    except (ValueError, KeyError, IndexError):
        pass
    return result.returncode, found, lines, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_role_never_deletes_a_declared_consumer(tmp_path: Path, world: tuple[str, list[str]]) -> None:
    """Both DECLARED consumers are stale; the one the inventory declares is kept, the other goes."""
    url, _ = world
    declared = [
        {
            "name": DECLARED,
            "subjects": ["declared.>"],
            "consumers": [{"name": "keep-me", "filter_subject": "declared.x"}],
        },
        {"name": "ELSEWHERE", "subjects": ["elsewhere.>"]},  # declares no consumers
    ]
    common = {
        "jetstream_streams_servers": [url],
        "jetstream_streams_declared": declared,
        "jetstream_streams_purge_streams": [DECLARED],
        "jetstream_streams_purge_stale_after": f"{STALE_AFTER:g}s",
    }
    try:
        code, report, shown, output = role_play(tmp_path, common)
        assert code == 0, output
        kept = {c["name"]: c for c in report["consumers"]}["keep-me"]
        assert (
            not kept["stale"] and kept["reason"] == "declared in the inventory" and kept["idle_seconds"] > STALE_AFTER
        )
        assert report["stale"] == [f"{DECLARED}/drop-me"] and report["counts"]["declared"] == 1
        assert shown[-5:] == [
            "consumers: 2 by name, 2 seen (2 from the list, 0 one by one), 0 not seen",
            "report only: 1 stale, nothing deleted (-e jetstream_streams_purge_delete=true deletes them)",
            "kept on re-check: 0",
            "declared in the inventory, never deleted: 1",
            "stream defaults set: none",
        ]

        code, applied, shown, output = role_play(tmp_path, common | {"jetstream_streams_purge_delete": True})
        assert code == 0, output
        assert applied["deleted"] == [f"{DECLARED}/drop-me"]
        assert shown[0].split() == ["STREAM", "CONSUMER", "KIND", "IDLE", "ACTION"]
        assert shown[1].split() == [DECLARED, "drop-me", "durable", shown[1].split()[3], "deleted"]
        assert shown[2] == (
            "2 consumers in 1 stream: 2 seen, 0 not seen; 1 stale: 1 deleted, 0 kept on recheck; "
            "1 declared in the inventory (never deleted)"
        )
        assert "deleted: 1 of 1 stale" in shown
        assert consumer_names(url, DECLARED) == {"keep-me"}

        # Under the minimum: refused with the parameter named, before anything is looked at.
        code, refused, shown, output = role_play(tmp_path, common | {"jetstream_streams_purge_stale_after": "29s"})
        assert code != 0 and refused["msg"].startswith("stale_after must be at least 30s, not 29s"), output
        assert shown == []
    finally:
        delete_streams(url, DECLARED)


class Recorder:
    """Replaces one of the module's raw reads (Cleanup.list_page or info_once), keeping the calls."""

    def __init__(self, real: Any, change: Any) -> None:
        self.real, self.change = real, change
        self.calls: list[Any] = []

    def install(self) -> Any:
        recorder = self

        async def read(job: Any, stream: str, arg: Any) -> Any:
            recorder.calls.append(arg)
            return await recorder.change(job, stream, arg, recorder.real)

        return read


def module_params(url: str, **options: Any) -> dict[str, Any]:
    return {
        "servers": [url],
        "user": None,
        "password": None,
        "tls_ca_file": None,
        "streams": [],
        "stale_after": f"{STALE_AFTER:g}s",
        "protected": [],
        "name_pattern": None,
        "delete": False,
        "stream_inactive_threshold": None,
        "timeout": 2.0,
    } | options


def test_an_incomplete_list_is_completed_from_the_names(
    world: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The list answers only every other consumer and names none of the others `missing` (the
    lab's clustered list, worse); one more comes back as a configuration-only entry flagged
    missing, as the server lists an offline consumer. The names API and consumer info recover
    every one, and the flagged entry is not judged from its configuration."""
    url, _ = world
    consumers = load_module()

    async def half(job: Any, stream: str, offset: int, real: Any) -> Any:
        data = await real(job, stream, offset)
        entries = data["consumers"]
        kept = [c for n, c in enumerate(entries) if n % 2 == 0 and c["name"] != "spread-pending"]
        placeholder = {
            "stream_name": stream,
            "name": "spread-pending",
            "created": "2020-01-01T00:00:00Z",
            "config": {"durable_name": "spread-pending"},
        }
        return data | {"consumers": [*kept, placeholder], "missing": ["spread-pending"]}

    async def info_once(job: Any, stream: str, name: str, real: Any) -> Any:
        return await real(job, stream, name)

    listing = Recorder(consumers.Cleanup.list_page, half)
    info = Recorder(consumers.Cleanup.info_once, info_once)
    monkeypatch.setattr(consumers.Cleanup, "list_page", listing.install())
    monkeypatch.setattr(consumers.Cleanup, "info_once", info.install())
    try:
        result = asyncio.run(consumers.run(module_params(url, streams=[SPREAD]), False))
        assert not result.get("failed"), result["msg"]
        names = len(SPREAD_LEAKED) + 1
        figures = ("names", "seen", "listed", "unseen")
        assert [result["counts"][f] for f in figures] == [names, names, len(SPREAD_LEAKED) // 2, 0]
        assert set(result["stale"]) == {f"{SPREAD}/{n}" for n in SPREAD_LEAKED}
        pending = {c["name"]: c for c in result["consumers"]}["spread-pending"]
        assert not pending["stale"] and pending["reason"].startswith("2 pending"), pending
        # Asked one by one: exactly those the list did not return (half the leaks, and the flagged one).
        assert sorted(info.calls) == sorted([*SPREAD_LEAKED[1::2], "spread-pending"])
        assert listing.calls == [0]  # one page: 41 consumers
    finally:
        delete_streams(url, SPREAD)


def test_consumers_that_cannot_be_seen_fail_the_run_after_the_safe_deletions(
    world: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half of BLIND's consumers live on a server that answers neither the meta leader nor
    consumer info. The run deletes the stale ones it saw, then fails naming how many it could
    not see and the first few; each unseen one was asked twice."""
    url, _ = world
    consumers = load_module()
    hidden = set(BLIND_LEAKED[1::2])

    async def without_hidden(job: Any, stream: str, offset: int, real: Any) -> Any:
        data = await real(job, stream, offset)
        return data | {
            "consumers": [c for c in data["consumers"] if c["name"] not in hidden],
            "missing": sorted(hidden),
        }

    async def silent(job: Any, stream: str, name: str, real: Any) -> Any:
        if name in hidden:
            raise consumers.NoAnswer(f"$JS.API.CONSUMER.INFO.{stream}.{name}", "no answer within 2 s")
        return await real(job, stream, name)

    info = Recorder(consumers.Cleanup.info_once, silent)
    monkeypatch.setattr(consumers.Cleanup, "list_page", Recorder(consumers.Cleanup.list_page, without_hidden).install())
    monkeypatch.setattr(consumers.Cleanup, "info_once", info.install())
    try:
        result = asyncio.run(consumers.run(module_params(url, streams=[BLIND], delete=True), False))
        assert result.get("failed")
        first = sorted(hidden)[:5]
        assert result["msg"].startswith(
            f"6 of 12 consumers could not be seen, so they were not judged: {', '.join(f'BLIND/{n}' for n in first)}"
            " and 1 more ($JS.API.CONSUMER.INFO.BLIND.blind-01: no answer within 2 s); run it again once every server"
            " answers. 12 consumers in 1 stream: 6 seen, 6 not seen; 6 stale: 6 deleted, 0 kept on recheck;"
        ), result["msg"]
        assert result["unseen"] == [f"{BLIND}/{n}" for n in sorted(hidden)]
        assert result["deleted"] == [f"{BLIND}/{n}" for n in BLIND_LEAKED[0::2]]
        assert [result["counts"][f] for f in ("names", "seen", "listed", "unseen", "deleted")] == [12, 6, 6, 6, 6]
        reasons = {c["name"]: c["reason"] for c in result["consumers"]}
        assert reasons["blind-01"].startswith("not seen: no info from the server")
        # Each hidden one asked twice (no answer is asked again); each seen one once, at the recheck.
        assert sorted(info.calls) == sorted([*hidden, *hidden, *BLIND_LEAKED[0::2]])
        assert consumer_names(url, BLIND) == hidden, "an unseen consumer was deleted"
    finally:
        delete_streams(url, BLIND)


def test_names_and_list_pages_are_read_completely() -> None:
    """Without a server: the names API's 1024-name pages (a stream can hold more than one page),
    read again when consumers going between two pages shift the rest; the list's pages stepped
    by the server's limit however many answers each held."""
    consumers = load_module()
    everyone = [f"c-{n:04d}" for n in range(2100)]

    class Names:
        def __init__(self, shrink_after_first: int = 0, keep_shrinking: bool = False) -> None:
            self.current = list(everyone)
            self.shrink, self.keep_shrinking = shrink_after_first, keep_shrinking
            self.offsets: list[int] = []

        async def page(self, stream: str, offset: int) -> dict[str, Any]:
            self.offsets.append(offset)
            if self.shrink and (len(self.offsets) == 2 or self.keep_shrinking):
                del self.current[: self.shrink]  # the first names go before the next page is read
            return {"consumers": self.current[offset : offset + 1024], "total": len(self.current), "limit": 1024}

    def read(names: Names) -> list[str]:
        job = consumers.Cleanup(None, consumers.Rules(0), check_mode=True, timeout=1)
        job.names_page = names.page
        return cast(list[str], asyncio.run(job.consumer_names("S")))

    steady = Names()
    assert read(steady) == everyone and steady.offsets == [0, 1023, 2046]
    shifted = Names(shrink_after_first=3)
    assert read(shifted) == everyone[3:]
    assert shifted.offsets == [0, 1023, 0, 1023, 2046], "a gap was not noticed"
    with pytest.raises(consumers.Problem, match="names kept changing"):
        read(Names(shrink_after_first=3, keep_shrinking=True))

    offsets: list[int] = []

    async def list_page(stream: str, offset: int) -> dict[str, Any]:
        offsets.append(offset)
        window = everyone[:600][offset : offset + 256]
        # Every third consumer's server did not answer the meta leader in time.
        answered = [{"name": n} for i, n in enumerate(window) if i % 3]
        return {"consumers": answered, "missing": window[::3], "total": 600, "limit": 256}

    job = consumers.Cleanup(None, consumers.Rules(0), check_mode=True, timeout=1)
    job.list_page = list_page
    listed = asyncio.run(job.list_details("S"))
    assert offsets == [0, 256, 512]
    assert len(listed) == sum(1 for i in range(600) if i % 256 % 3)


def test_stale_after_of_a_minute_is_accepted(tmp_path: Path, world: tuple[str, list[str]]) -> None:
    url, _ = world
    common = {"servers": [url], "streams": [STREAM]}
    code, outcomes, output = play(tmp_path, [common | {"stale_after": d} for d in ("1m", "60s", "1m30s", "30s")])
    assert code == 0, output
    for limit, outcome in zip((60, 60, 90, 30), outcomes, strict=True):
        leaks = [c for c in outcome["consumers"] if c["name"].startswith("leak-")]
        assert leaks and all(c["stale"] is (c["idle_seconds"] > limit) for c in leaks), (limit, leaks[0])
    assert outcomes[-1]["counts"]["stale"] == 263  # past 30 s; the longer limits not reached yet (< 1 min idle)


def test_delete_removes_exactly_the_leaked(tmp_path: Path, world: tuple[str, list[str]]) -> None:
    url, ephemerals = world
    others = other_leaks(url)
    common = {"servers": [url], "stale_after": f"{STALE_AFTER:g}s", "delete": True}  # every stream
    code, (some, rest, again), output = play(
        tmp_path, [common | {"name_pattern": "leak-1*"}, common, common | {"streams": [STREAM]}]
    )
    assert code == 0, output
    assert some["changed"] and len(some["deleted"]) == 111
    assert rest["changed"] and set(some["deleted"]) | set(rest["deleted"]) == leaked_labels(ephemerals) | others
    assert rest["kept_on_recheck"] == []
    assert f"{len(rest['deleted'])} deleted, 0 kept on recheck" in rest["msg"]
    assert rest["counts"]["deleted"] == rest["counts"]["stale"] == len(rest["deleted"])
    assert not again["changed"] and again["stale"] == [] and again["deleted"] == []
    assert consumer_names(url) == set(LIVE)


def test_stream_inactive_threshold(tmp_path: Path, world: tuple[str, list[str]]) -> None:
    url, _ = world
    common = {"servers": [url], "streams": ["QUIET", "LIMITED"], "stream_inactive_threshold": "1h"}
    code, (checked, applied, again), output = play(tmp_path, [common | {"_task": {"check_mode": True}}, common, common])
    assert code == 0, output
    assert checked["changed"] and checked["thresholds_set"] == ["QUIET"]
    assert applied["changed"] and applied["thresholds_set"] == ["QUIET"]
    assert not again["changed"] and again["thresholds_set"] == []

    async def limits() -> dict[str, Any]:
        nc = await nats.connect(url)
        found = {}
        for name in ("QUIET", "LIMITED"):
            reply = await nc.request(f"$JS.API.STREAM.INFO.{name}", b"")
            found[name] = json.loads(reply.data)["config"].get("consumer_limits", {}).get("inactive_threshold")
        await nc.close()
        return found

    # Set where there was none; an existing one (30 min) left alone.
    assert asyncio.run(limits()) == {"QUIET": 3600 * 10**9, "LIMITED": 1800 * 10**9}


def test_errors_name_the_problem(tmp_path: Path, world: tuple[str, list[str]]) -> None:
    url, _ = world
    failing = {"_task": {"ignore_errors": True}}
    code, outcomes, output = play(
        tmp_path,
        [
            failing | {"servers": [url], "stale_after": "soon"},
            failing | {"servers": [url], "stale_after": "0s"},
            failing | {"servers": [url], "stale_after": "29s"},
            failing | {"servers": [url], "protected": ["EVENTS/leak-1", "leak-2"]},
            failing | {"servers": [url], "stream_inactive_threshold": "1 week"},
            failing | {"servers": [url], "streams": [STREAM, "NOPE"]},
            failing | {"servers": [url], "streams": ["a.b"]},
            failing | {"servers": [f"nats://127.0.0.1:{free_port()}"], "timeout": 1},
            failing | {"servers": [url], "streams": ["GREEDY"], "stream_inactive_threshold": "30m"},
            # Below: one short message each, naming the option (or the stream) and the problem.
            failing | {"servers": [url], "stale_after": "1ms"},
            failing | {"servers": [url], "stale_after": "5 minutes"},
            failing | {"servers": [url], "protected": ["EVENTS/read.model"]},
            failing | {"servers": [url], "protected": ["EVENTS/"]},
            failing | {"servers": [url], "streams": ["MY EVENTS"]},
            failing | {"servers": [url], "streams": ["NOPE"]},
            # The existing stream first: nothing may be set on it before the missing one is found.
            failing | {"servers": [url], "streams": [STREAM, "NOPE", "NADA"], "stream_inactive_threshold": "2h"},
            failing | {"servers": [url], "stream_inactive_threshold": "5 minutes"},
            failing | {"servers": [url], "timeout": 0},
        ],
    )
    assert code == 0, output
    messages = [o.get("msg", "") for o in outcomes]
    assert all(o.get("failed") for o in outcomes), messages
    assert messages[0] == "stale_after: not a duration: 'soon' (use e.g. 1m, 30m, 1h, 2d)"
    assert messages[1].startswith("stale_after must be at least 30s, not 0s: ")
    assert messages[2] == (
        "stale_after must be at least 30s, not 29s: a consumer whose client is only between two requests can "
        "look idle that long (use e.g. 1m, 30m, 1h)"
    )
    assert messages[3] == (
        "protected: ['leak-2'] are not STREAM/NAME (each name without spaces, '.', '*', '>' or slashes)"
    )
    assert messages[4].startswith("stream_inactive_threshold: not a duration: '1 week'")
    assert messages[5] == "stream NOPE: not found, so nothing was examined or changed"
    assert messages[6].startswith("invalid stream names ['a.b']")
    assert messages[7].startswith("cannot connect to nats://127.0.0.1:") and "within 1 s" in messages[7]
    assert messages[8].startswith("stream GREEDY: the server refuses consumer_limits.inactive_threshold 30m")
    assert "violates consumers: patient" in messages[8] and "already set on: none" in messages[8]
    assert messages[9].startswith("stale_after must be at least 30s, not 1ms: ")
    assert messages[10] == "stale_after: not a duration: '5 minutes' (use e.g. 1m, 30m, 1h, 2d)"
    assert messages[11].startswith("protected: ['EVENTS/read.model'] are not STREAM/NAME")
    assert messages[12].startswith("protected: ['EVENTS/'] are not STREAM/NAME")
    assert messages[13].startswith("invalid stream names ['MY EVENTS']")
    assert messages[14] == "stream NOPE: not found, so nothing was examined or changed"
    assert messages[15] == "streams NOPE, NADA: not found, so nothing was examined or changed"
    assert messages[16].startswith("stream_inactive_threshold: not a duration: '5 minutes'")
    assert messages[17] == "timeout must be more than 0"
    for message in messages:
        assert "\n" not in message and len(message) < 320 and not re.search(r"[0-9]{10}", message), message
    assert "Traceback" not in output

    async def events_threshold() -> Any:
        nc = await nats.connect(url)
        reply = await nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"")
        await nc.close()
        return json.loads(reply.data)["config"].get("consumer_limits", {}).get("inactive_threshold")

    assert asyncio.run(events_threshold()) is None, "a stream was changed before a missing one was found"


def load_module() -> ModuleType:
    return cast(ModuleType, load_plugin_module("jetstream_consumers"))


def test_recheck_keeps_a_consumer_that_came_alive(tmp_path: Path) -> None:
    """Stale at the scan, given a message before deletion: kept; its idle twin is deleted."""
    consumers = load_module()

    async def scenario(url: str) -> Any:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name="RECHECK", subjects=["recheck.>"])
        for name in ("twin-a", "twin-b"):
            await js.add_consumer(
                "RECHECK",
                ConsumerConfig(durable_name=name, filter_subject=f"recheck.{name}", deliver_policy=DeliverPolicy.NEW),
            )
        await asyncio.sleep(0.3)
        job = consumers.Cleanup(nc, consumers.Rules(100_000_000), check_mode=False, timeout=2.0)  # 0.1 s
        await job.scan("RECHECK")
        job.stale = sorted(label for label, v in job.verdicts.items() if v.stale)
        await js.publish("recheck.twin-a", b"late work")
        await job.delete_stale()
        left = {c.name for c in await js.consumers_info("RECHECK")}
        await nc.close()
        return job, left

    with local_jetstream(tmp_path) as url:
        job, left = asyncio.run(scenario(url))
    assert job.stale == ["RECHECK/twin-a", "RECHECK/twin-b"]
    assert job.kept_on_recheck == ["RECHECK/twin-a"] and job.deleted == ["RECHECK/twin-b"]
    assert job.verdicts["RECHECK/twin-a"].reason.startswith("1 pending")
    assert left == {"twin-a"}
