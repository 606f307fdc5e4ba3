"""Documentation of the connection options every JetStream module takes
(module_utils/jetstream_api.CONNECTION_ARGUMENT_SPEC)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  servers:
    description: Client URLs of the cluster (tls://host:port, or nats:// without TLS).
    type: list
    elements: str
    required: true
  user:
    description: The user to log in as (the application account's), if the cluster requires one.
    type: str
  password:
    description: Its password.
    type: str
  tls_ca_file:
    description: CA certificate file that signed the servers' certificates (for tls:// URLs).
    type: path
"""
