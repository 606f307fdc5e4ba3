"""The post-deploy checks (pytest modules), run by `nats-verify` or `pytest --pyargs verify`."""
