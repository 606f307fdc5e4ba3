"""nats-lab: the local lab for the NATS roles (three systemd-nspawn hosts on a private bridge).

Commands: ``nats-lab up | down | status [--json] | ssh HOST -- CMD | fault KIND HOST | heal [HOST]``
with KIND one of stop, kill, isolate, cut-routes (``--port``, default 6222), stale-storage.
Addresses, bridge, mirror port and the ssh key come from inventory/lab/hosts.yml.

What the roles see in the lab:
- the NFS share stand-in: fstype ``cimnfs`` (mount helper /usr/sbin/mount.cimnfs), source
  ``cimstor:/srv/cimstor-export[/SUBDIR]``; /srv/cimstor-export is ONE directory (.lab/share/ on
  the machine) shared by all hosts, like the real export. The production NFS option string works
  unchanged. /proc/mounts shows the type as ``fuse.cimnfs``.
- the release mirror: ``http://<bridge address>:<lab_mirror_port>/vX.Y.Z/`` with the GitHub asset
  names and SHA256SUMS; ``/tampered/vX.Y.Z/`` has a changed archive with the original checksums.
"""
