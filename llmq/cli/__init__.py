"""The ``llmq-stage`` command: wires config, clients and stages together; owns signals and exit codes."""
