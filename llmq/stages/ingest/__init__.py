"""The ingest stage: the HTTP API. ``app`` builds it from ``messages`` (the native message API), ``admin``
(the operator's routes) and ``openai_facade``; ``http_api`` is how requests are read and answered."""

from llmq.stages.ingest.app import create_app

__all__ = ["create_app"]
