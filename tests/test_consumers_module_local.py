"""The jetstream_consumers module against a real single-node nats-server on loopback: 263 leaked
consumers (more than one 256-entry page of the list API) beside 5 live ones, each live for a
different reason; report, check mode, name pattern, deletion, idempotence, the stream default
inactive threshold, errors; and the recheck before deletion, run in-process."""

from __future__ import annotations

import asyncio
import json
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
STALE_AFTER = 2.0


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
            time.sleep(STALE_AFTER + 0.5)
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


def consumer_names(url: str) -> set[str]:
    async def read() -> set[str]:
        nc = await nats.connect(url)
        reply = await nc.request(f"$JS.API.CONSUMER.NAMES.{STREAM}", b"{}")
        await nc.close()
        return set(json.loads(reply.data)["consumers"])  # one page holds 1024

    return asyncio.run(read())


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
    assert leak["reason"].endswith("> 2s, nothing pending")
    assert not by_name[ephemerals[0]]["durable"]
    assert report["table"][0].split() == ["STREAM", "CONSUMER", "KIND", "IDLE", "ACTION"]
    assert len(report["table"]) == 1 + len(report["stale"]) + 1
    assert report["table"][-1] == f"263 stale of {len(before)} consumers in 1 streams; 0 deleted, 0 kept on recheck"

    # Check mode with delete: would delete every leaked one, deletes none.
    assert checked["changed"] and set(checked["deleted"]) == leaked_labels(ephemerals)

    # The pattern: leak-1, leak-10..19, leak-100..199; the rest kept by name.
    assert len(pattern["stale"]) == 111 and all(s.startswith(f"{STREAM}/leak-1") for s in pattern["stale"])
    assert "name does not match 'leak-1*'" in {c["name"]: c for c in pattern["consumers"]}["leak-2"]["reason"]

    assert consumer_names(url) == before, "a report or check mode run changed consumers"
    print(f"3 runs over {len(before)} consumers: {took:.1f} s")


def test_delete_removes_exactly_the_leaked(tmp_path: Path, world: tuple[str, list[str]]) -> None:
    url, ephemerals = world
    common = {"servers": [url], "stale_after": f"{STALE_AFTER:g}s", "delete": True}  # every stream
    code, (some, rest, again), output = play(
        tmp_path, [common | {"name_pattern": "leak-1*"}, common, common | {"streams": [STREAM]}]
    )
    assert code == 0, output
    assert some["changed"] and len(some["deleted"]) == 111
    assert rest["changed"] and set(some["deleted"]) | set(rest["deleted"]) == leaked_labels(ephemerals)
    assert rest["kept_on_recheck"] == []
    assert rest["table"][-1].endswith(f"{len(rest['deleted'])} deleted, 0 kept on recheck")
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
            failing | {"servers": [url], "stream_inactive_threshold": "1 week"},
            failing | {"servers": [url], "streams": [STREAM, "NOPE"]},
            failing | {"servers": [url], "streams": ["a.b"]},
            failing | {"servers": [f"nats://127.0.0.1:{free_port()}"], "timeout": 1},
            failing | {"servers": [url], "streams": ["GREEDY"], "stream_inactive_threshold": "30m"},
        ],
    )
    assert code == 0, output
    messages = [o.get("msg", "") for o in outcomes]
    assert all(o.get("failed") for o in outcomes), messages
    assert messages[0] == "stale_after: not a duration: 'soon' (use e.g. 90s, 30m, 1h, 2d)"
    assert messages[1].startswith("stale_after must be more than 0")
    assert messages[2].startswith("stream_inactive_threshold: not a duration: '1 week'")
    assert messages[3] == "stream not found: NOPE"
    assert messages[4].startswith("invalid stream names ['a.b']")
    assert messages[5].startswith("cannot connect to nats://127.0.0.1:") and "within 1 s" in messages[5]
    assert messages[6].startswith("stream GREEDY: the server refuses consumer_limits.inactive_threshold 30m")
    assert "violates consumers: patient" in messages[6] and "already set on: none" in messages[6]


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
