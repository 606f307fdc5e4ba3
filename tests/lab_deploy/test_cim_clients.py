"""The event store as its clients use it, on the deployed lab, logged in as the CIM's own
least-privilege user: the CIM's client (Rust, async-nats 0.33, its exact calls) and nats.js with
certificate verification on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.clients import bundle_servers_by_name, cim_contract_binary, client_env, node_client_dir, run_json
from verify.inventory import Cluster

pytestmark = pytest.mark.lab

# The CIM's read pattern (one new ephemeral consumer per read, never deleted) at this rate, for
# this long: every read must be served (issue #11).
READ_RATE = 20
READ_SECONDS = 90


def test_the_cims_calls_as_they_are_fail_on_the_servers_end_of_batch(deployed_lab: Cluster) -> None:
    """Pinned, for the CIM team (docs/clients.md): async-nats 0.33 takes the 404 status that ends a
    fetch which delivered messages as an error, so the CIM's second append to an aggregate fails.
    The cluster answers every call; if this starts passing, the client or the server changed."""
    code, report, output = run_json([str(cim_contract_binary()), "contract"], client_env(deployed_lab), timeout=120)
    assert code == 1, output
    failed = [s for s in report["steps"] if not s["ok"]]
    assert failed[0]["step"] == "append_2" and "404" in failed[0]["error"], report["steps"]


def test_the_cim_contract_passes_as_the_cim_user(deployed_lab: Cluster) -> None:
    """connect as docs/clients.md says, get_or_create_stream with the CIM's own config (the deployed
    stream is used as it is), three appends each read first, a read through a new ephemeral
    consumer with a 2 s expiry, the version; the 404 read as the end of the batch."""
    code, report, output = run_json(
        [str(cim_contract_binary()), "contract", "--end-on-no-messages"], client_env(deployed_lab), timeout=120
    )
    assert code == 0 and report["ok"], output
    assert report["version"] == 3 and report["events_read"] == 3, report
    assert not report["stream"]["created_by_this_run"], "the CIM created the stream: it must use the deployed one"
    print(f"contract steps (ms): {[(s['step'], round(s['ms'])) for s in report['steps']]}")


def test_cim_reads_are_never_refused(deployed_lab: Cluster) -> None:
    """20 reads a second for 90 s in the CIM's pattern: every one served, and the live consumers
    stay far below the per-stream limit (the server's 5 s default ends each read's consumer)."""
    code, report, output = run_json(
        [
            str(cim_contract_binary()),
            "read-load",
            "--rate",
            str(READ_RATE),
            "--seconds",
            str(READ_SECONDS),
            "--end-on-no-messages",
        ],
        client_env(deployed_lab),
        timeout=READ_SECONDS + 180,
    )
    limit = int(deployed_lab.setting("nats_server_app_jetstream_limits")["max_consumers"])
    print(
        f"CIM reads at {READ_RATE}/s for {READ_SECONDS} s: {report.get('served')} of {report.get('attempted')} "
        f"served, peak {report.get('peak_consumers')} live consumers (limit {limit} per stream), "
        f"read p50 {report.get('latency_ms', {}).get('p50')} ms, p99 {report.get('latency_ms', {}).get('p99')} ms"
    )
    assert code == 0 and report["ok"], output
    assert report["attempted"] >= READ_RATE * READ_SECONDS * 0.95, report["attempted"]
    assert report["served"] == report["attempted"] and report["refused"]["count"] == 0, report["refused"]
    assert 0 < report["peak_consumers"] <= limit // 4, report["consumer_samples"]


def _with_lab_names(cluster: Cluster, tmp_path: Path, command: list[str]) -> list[str]:
    """`command` in a private mount namespace whose /etc/hosts names the lab members: how a site's
    DNS would resolve them, without touching the machine's own /etc/hosts."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{n.address} {n.host}\n" for n in cluster.nodes))
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed for the name test"
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return [unshare, "--mount", "--propagation", "private", "sh", "-c", script, str(hosts), *command]


def test_nodejs_connects_by_name_with_verification_on(deployed_lab: Cluster, tmp_path: Path) -> None:
    """nats.js as docs/clients.md says: the members' names, the cluster's CA, the CIM user; it
    publishes an event and reads it back. By bare IP the same client refuses the certificates
    (Node checks an IP against "localhost"), which is why the docs give names."""
    node = shutil.which("node")
    assert node, "node is needed for the nats.js check"
    script = str(node_client_dir() / "cim-check.mjs")
    by_name = bundle_servers_by_name(deployed_lab)
    assert len(by_name) == len(deployed_lab.nodes), by_name
    code, report, output = run_json(
        _with_lab_names(deployed_lab, tmp_path, [node, script]),
        client_env(deployed_lab, urls=by_name),
        timeout=60,
    )
    assert code == 0 and report["ok"] and report["read_back"], output
    code, report, output = run_json([node, script], client_env(deployed_lab), timeout=60)
    assert code != 0 and "localhost" in str(report.get("error")), output
