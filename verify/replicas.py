"""Do a stream's replicas hold the same data? What `nats server stream-check` compares: each
server's own replica (the monitor's `/jsz?accounts=true&streams=true` on that server) by first
and last sequence, message count and bytes, against the leader's.

Under live publishing a follower trails its leader by milliseconds, so one sample proves nothing
either way: `settle` samples again for a short bounded window and calls a stream divergent only
when no sample agrees. A stream that never agreed but whose followers kept up with a leader that
kept moving (each follower reached, by the last sample, the last sequence the leader had at the
first) is trailing a live writer, not divergent: it is named as not compared. No I/O here; the
check in verify/checks/test_cluster.py supplies the samples.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FIGURES = ("first_seq", "last_seq", "messages", "bytes")
# One sample: host -> that host's /jsz?accounts=true&streams=true, for the hosts that answered.
Sample = Mapping[str, Any]
StreamKey = tuple[str, str]


@dataclass(frozen=True)
class Copies:
    """One stream as its replicas report it, in one sample."""

    account: str
    stream: str
    leader: str | None
    # Hosts the stream's cluster info places a replica on (leader and followers, when known).
    placed: frozenset[str]
    figures: dict[str, tuple[int, ...]]

    def reference(self) -> tuple[str, tuple[int, ...]] | None:
        """The leader's copy when it reported one, else the most common figures (ties: first host)."""
        if self.leader in self.figures:
            return self.leader, self.figures[self.leader]
        if not self.figures:
            return None
        common, _ = Counter(self.figures.values()).most_common(1)[0]
        return next(h for h in sorted(self.figures) if self.figures[h] == common), common


def collect(sample: Sample, hosts_by_server: Mapping[str, str]) -> dict[StreamKey, Copies]:
    """Every stream in the sample, keyed by (account, stream). `hosts_by_server` maps server
    names (as the cluster info names replicas) to inventory hosts; unknown servers are ignored."""
    figures: dict[StreamKey, dict[str, tuple[int, ...]]] = {}
    leaders: dict[StreamKey, str | None] = {}
    placed: dict[StreamKey, set[str]] = {}
    for host, jsz in sorted(sample.items()):
        for account in (jsz or {}).get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                key = (str(account.get("name") or account.get("id")), str(stream["name"]))
                state = stream.get("state") or {}
                figures.setdefault(key, {})[host] = tuple(int(state.get(f) or 0) for f in FIGURES)
                cluster = stream.get("cluster") or {}
                names = [cluster.get("leader"), *(r.get("name") for r in cluster.get("replicas") or [])]
                hosts = {hosts_by_server[n] for n in names if n in hosts_by_server}
                placed.setdefault(key, set()).update(hosts)
                leader = hosts_by_server.get(str(cluster.get("leader")))
                if leader or key not in leaders:
                    leaders[key] = leader or leaders.get(key)
    return {
        key: Copies(key[0], key[1], leaders.get(key), frozenset(placed.get(key, set())), copies)
        for key, copies in figures.items()
    }


def differences(copies: Copies, answered: set[str]) -> list[str]:
    """What differs from the reference copy, per host; and the answering hosts the stream is
    placed on that hold no copy at all."""
    reference = copies.reference()
    if reference is None:
        return []
    ref_host, ref = reference
    role = "leader" if ref_host == copies.leader else "most replicas"
    found = []
    for host, mine in sorted(copies.figures.items()):
        if mine == ref:
            continue
        changed = [f"{name} {got} vs {want}" for name, got, want in zip(FIGURES, mine, ref, strict=True) if got != want]
        found.append(f"{host} has {', '.join(changed)} ({role}: {ref_host})")
    found += [f"{host} holds no copy" for host in sorted((copies.placed & answered) - set(copies.figures))]
    return found


def _last_seq(copies: Copies, host: str) -> int | None:
    figures = copies.figures.get(host)
    return figures[FIGURES.index("last_seq")] if figures else None


def _trailing(first: Copies, last: Copies, answered: set[str]) -> bool:
    """The leader moved on between the first and the last sample, and every follower had reached
    by the last what the leader held at the first (and no placed replica was missing)."""
    if first.leader is None or first.leader != last.leader:
        return False
    begun, ended = _last_seq(first, first.leader), _last_seq(last, last.leader)
    if begun is None or ended is None or ended <= begun:
        return False
    followers = set(last.figures) - {last.leader}
    if not followers or (last.placed & answered) - set(last.figures):
        return False
    return all((_last_seq(last, host) or 0) >= begun for host in followers)


@dataclass
class Settled:
    """The outcome: streams whose replicas never agreed (with the last sample's differences),
    those that trailed a live writer throughout, and what it cost."""

    divergent: dict[StreamKey, list[str]] = field(default_factory=dict)
    trailing: list[StreamKey] = field(default_factory=list)
    compared: int = 0
    samples: int = 0
    seconds: float = 0.0


def settle(
    sample: Callable[[], Sample],
    hosts_by_server: Mapping[str, str],
    *,
    first: Sample | None = None,
    window: float = 2.0,
    interval: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Settled:
    """Samples (starting with `first` if given, e.g. a /jsz another check fetched) until every
    stream has agreed in some sample or `window` seconds have gone."""
    started = clock()
    current = first if first is not None else sample()
    samples = 1
    first_seen: dict[StreamKey, Copies] = {}
    last_seen: dict[StreamKey, tuple[Copies, set[str]]] = {}
    pending: dict[StreamKey, list[str]] = {}
    compared: set[StreamKey] = set()
    while True:
        answered, fresh = set(current), first is None or samples > 1
        collected = collect(current, hosts_by_server)
        for key in [k for k in pending if k not in collected]:
            pending.pop(key)  # gone (deleted, or its servers went silent): nothing left to compare
        for key, copies in collected.items():
            if len(copies.figures) < 2 and not (copies.placed & answered) - set(copies.figures):
                pending.pop(key, None)  # one copy (R1, or its peers silent): nothing to compare it with
                continue
            if key in compared and key not in pending:
                continue  # agreed in an earlier sample
            compared.add(key)
            if fresh:
                first_seen.setdefault(key, copies)
            found = differences(copies, answered)
            if found:
                pending[key] = found
                last_seen[key] = (copies, answered)
            else:
                pending.pop(key, None)
        if not pending or clock() - started + interval > window:
            break
        sleep(interval)
        current = sample()
        samples += 1
    settled = Settled(compared=len(compared), samples=samples, seconds=clock() - started)
    for key, found in sorted(pending.items()):
        last, answered = last_seen[key]
        start = first_seen.get(key)
        if start is not None and start is not last and _trailing(start, last, answered):
            settled.trailing.append(key)
        else:
            settled.divergent[key] = found
    return settled
