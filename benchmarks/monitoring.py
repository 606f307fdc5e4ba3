"""What watching the cluster costs, printed (not asserted): python -m benchmarks.monitoring

On the deployed lab (make lab), under continuous R3 publishing and with the lab's Prometheus
scraping every 2 s: each unit's CPU (its main process's user + system time over the sampling
window, as a share of one core) and memory (resident, at the end) for prometheus-nats-exporter beside each
nats-server, with nats-server in the same window as the baseline and the ratio between them; and
Prometheus and the blackbox exporter on the monitoring host. Leaves the lab deployed and healthy.
"""

from __future__ import annotations

import time

from tests.helpers import LAB_INVENTORY, inventory_vars, on, wait_healthy
from verify.inventory import load_cluster
from verify.load import BackgroundPublisher

WINDOW = 60.0
EXPORTER = "prometheus-nats-exporter.service"
SERVER = "nats-server.service"
MONITORING_UNITS = ("prometheus.service", "prometheus-blackbox-exporter.service")


def usage(host: str, units: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Each unit's main process: (CPU nanoseconds so far, resident memory bytes now). From /proc:
    the lab's hosts run without systemd's CPU and memory accounting."""
    script = (
        f"tick=$(getconf CLK_TCK); for unit in {' '.join(units)}; do pid=$(systemctl show -p MainPID --value $unit); "
        "echo $unit $(awk -v t=$tick '{printf \"%.0f\", ($14 + $15) * 1e9 / t}' /proc/$pid/stat) "
        "$(awk '/^VmRSS/ {printf \"%.0f\", $2 * 1024}' /proc/$pid/status); done"
    )
    found: dict[str, tuple[int, int]] = {}
    for line in on(host, script).splitlines():
        unit, cpu, memory = line.split()
        found[unit] = (int(cpu), int(memory))
    return found


def main() -> None:
    cluster = load_cluster(LAB_INVENTORY)
    wait_healthy(cluster)
    (monitor,) = inventory_vars(LAB_INVENTORY)["nats_monitoring"]["hosts"]
    watched = {n.host: (EXPORTER, SERVER) for n in cluster.nodes} | {monitor: MONITORING_UNITS}
    with BackgroundPublisher(cluster, stream="LAB_PROBE_BENCH", subject="labprobe.bench") as publisher:
        time.sleep(2)
        before = {host: usage(host, units) for host, units in watched.items()}
        started = time.monotonic()
        time.sleep(WINDOW)
        after = {host: usage(host, units) for host, units in watched.items()}
        elapsed = time.monotonic() - started
    tally = publisher.tally
    print(f"monitoring cost over {elapsed:.0f} s, Prometheus scraping every 2 s, {len(tally.acked)} R3 publishes acked")

    def cpu(host: str, unit: str) -> float:
        return 100 * (after[host][unit][0] - before[host][unit][0]) / (elapsed * 1e9)

    def mib(host: str, unit: str) -> float:
        return after[host][unit][1] / 2**20

    print(f"  {'host':10} {'unit':38} {'CPU % of a core':>16} {'memory MiB':>11} {'ratio to nats-server':>22}")
    for host, units in watched.items():
        for unit in units:
            ratio = ""
            if unit == EXPORTER:
                cpu_ratio = cpu(host, unit) / max(cpu(host, SERVER), 1e-9)
                ratio = f"CPU {cpu_ratio:.2f}x, memory {mib(host, unit) / mib(host, SERVER):.2f}x"
            print(f"  {host:10} {unit:38} {cpu(host, unit):16.2f} {mib(host, unit):11.1f} {ratio:>22}")
    wait_healthy(cluster)


if __name__ == "__main__":
    main()
