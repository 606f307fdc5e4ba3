"""The test suite. Set before anything imports Ansible (its constants read the environment once):
as the Makefile does, the lab's vaulted secrets open with its committed vault password, for the
playbooks the tests run and for load_cluster in the test process."""

import os
from pathlib import Path

os.environ.setdefault(
    "ANSIBLE_VAULT_IDENTITY_LIST", f"lab@{Path(__file__).resolve().parent.parent / 'inventory' / 'lab.vault-password'}"
)
