"""The ingest stage: one stage in three modules. ``app`` holds the API and its routes, ``http_api`` how
requests are read and answered, and ``openai_facade`` the OpenAI-compatible routes."""

from llmq.stages.ingest.app import create_app

__all__ = ["create_app"]
