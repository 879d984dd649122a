"""llmq: a durable priority queue for LLM requests on Redis Streams.

``llmq.pipeline`` is what the parts share (the stage runtime, config, keys, scripts), ``llmq.stages`` holds
one package or module per stage, ``llmq.cli`` wires them into the ``llmq-stage`` command. ARCHITECTURE.md
is the map.
"""
