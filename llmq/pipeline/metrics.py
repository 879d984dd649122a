"""Prometheus metrics of the shared runtime. Each stage process exports them on its ops port.

Defined once per process (prometheus-client's registry is per process); labelled by stage.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_ENTRIES = Counter("llmq_stage_entries_total", "Stream entries a stage finished, by outcome", ["stage", "outcome"])
STAGE_ERRORS = Counter("llmq_stage_errors_total", "Failed batches and Redis errors", ["stage", "kind"])
STAGE_IN_HAND = Gauge("llmq_stage_in_hand", "Entries read and not yet committed", ["stage"])
STAGE_BATCH_SECONDS = Histogram(
    "llmq_stage_batch_seconds",
    "Time to handle and commit one batch",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RECLAIMED = Counter("llmq_reclaimed_total", "Entries claimed from dead or stalled consumers", ["stage"])
POISON = Counter("llmq_poison_total", "Entries dead-lettered after too many deliveries (poison)", ["stage"])
LEASES_LOST = Counter(
    "llmq_leases_lost_total", "In-hand entries another consumer claimed before this one renewed", ["stage"]
)
QUEUE_WAIT = Histogram(
    "llmq_queue_wait_seconds",
    "Time from enqueue to admission for dispatch",
    ["level"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
SCHEDULED = Counter("llmq_scheduled_total", "Messages admitted for dispatch", ["level"])
"""Admissions are counted where they happen: by the scheduler, and by ingest for a direct admission."""
