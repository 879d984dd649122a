"""Every Redis key of a deployment, built from its prefix.

The default prefix ``{llmq}`` is a Redis Cluster hash tag: all keys of one deployment hash to one
slot, so the Lua scripts that touch several keys (hand-offs, admissions, moves) work on a cluster too.
"""

from __future__ import annotations

import enum
import hashlib


class Group(enum.StrEnum):
    """The consumer group that reads each stream: one per consuming stage, named after it."""

    SCHEDULE = "schedule"
    """Reads every level stream."""
    DISPATCH = "dispatch"
    RETRY = "retry"
    """Reads ``retry``, and ``webhooks``: the events to deliver."""
    ARCHIVE = "archive"
    """Reads ``done``."""
    BATCH = "batch"
    """Reads ``batches``: notices that a batch was created or is to be cancelled."""


class Keys:
    """Key names for one deployment (one prefix)."""

    __slots__ = (
        "batches",
        "dispatch",
        "dlq",
        "dlq_index",
        "done",
        "finished",
        "health",
        "prefix",
        "retry",
        "retry_due",
        "retry_payloads",
        "slots",
        "stagger",
        "webhooks",
        "webhooks_due",
        "webhooks_payloads",
    )

    def __init__(self, prefix: str = "{llmq}") -> None:
        self.prefix = prefix
        self.dispatch = f"{prefix}:dispatch"
        self.retry = f"{prefix}:retry"
        self.retry_due = f"{prefix}:retry:due"
        self.retry_payloads = f"{prefix}:retry:payloads"
        self.done = f"{prefix}:done"
        self.dlq = f"{prefix}:dlq"
        self.dlq_index = f"{prefix}:dlq:ids"
        """Hash: message id -> the entry id of its newest dead letter (``llmq.pipeline.dlq``)."""
        self.finished = f"{prefix}:finished"
        """Pub/Sub channel: the ids of the messages that reached a terminal status, space-separated, one notice
        per commit of outcomes."""
        self.health = f"{prefix}:health"
        """A key the ingest's health check writes (with a TTL): PING answers while writes are refused."""
        self.slots = f"{prefix}:slots"
        """Pub/Sub channel: an in-flight slot was released without the message finishing (retry)."""
        self.stagger = f"{prefix}:stagger"
        self.webhooks = f"{prefix}:webhooks"
        """Stream of webhook deliveries (``llmq.pipeline.webhooks``): events of ended messages and batches."""
        self.webhooks_due = f"{prefix}:webhooks:due"
        """Sorted set of deliveries waiting out their backoff, by when they are due."""
        self.webhooks_payloads = f"{prefix}:webhooks:payloads"
        """Hash of the deliveries of ``webhooks_due``."""
        self.batches = f"{prefix}:batches"
        """Stream of notices to the batch stage (a batch was created, or is to be cancelled): it acts at once
        instead of at its next look at the batches table."""
        """When the next staggered admission may happen (``llmq.stages.schedule.stagger``), shared by all schedulers."""

    def level(self, name: str) -> str:
        """The stream of one priority level."""
        return f"{self.prefix}:q:{name}"

    @property
    def paused(self) -> str:
        """Hash of the levels whose admission is paused (``*``: every level) -> since when and why."""
        return f"{self.prefix}:paused"

    @property
    def active(self) -> str:
        """Hash of each level's latest submission time (Unix seconds): whether its reserved slots are kept."""
        return f"{self.prefix}:levels:active"

    def msg(self, message_id: str) -> str:
        """The status hash of one message."""
        return f"{self.prefix}:msg:{message_id}"

    def idem(self, scope: str) -> str:
        """Idempotency record of a scope (the ingest's ``idempotency_record``: caller, tenant and the client's key);
        hashed so no client text becomes key syntax."""
        digest = hashlib.sha256(scope.encode()).hexdigest()
        return f"{self.prefix}:idem:v2:{digest}"

    def legacy_idem(self, idempotency_key: str) -> str:
        """The record the release before scoped keys kept for a client's key: in a namespace of its own, so no
        key spelled as a scope reads another scope's record."""
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    def events(self, message_id: str) -> str:
        """The stream of a streamed message's events (``llmq.pipeline.streamed``): its chunks, then its end."""
        return f"{self.prefix}:ev:{message_id}"

    def inflight(self, level: str) -> str:
        """Sorted set of admitted message ids of one level, scored by lease expiry."""
        return f"{self.prefix}:inflight:{level}"

    def backend_slots(self, backend: str) -> str:
        """Sorted set of calls running on a backend, scored by lease expiry (shared by all dispatchers)."""
        return f"{self.prefix}:backend:{backend}:slots"

    def backend_limit(self, backend: str) -> str:
        """Hash of a backend's adaptive concurrency window (``max_concurrent: auto``): its limit, its last cut."""
        return f"{self.prefix}:backend:{backend}:limit"

    def backend_held(self, backend: str) -> str:
        """Set (with why, expiring) while a backend's engine is behind: it gets no new call."""
        return f"{self.prefix}:backend:{backend}:held"

    def backend_circuits(self, backend: str) -> str:
        """Hash of each dispatcher's view of a backend's circuit (``llmq.pipeline.circuits``), by process."""
        return f"{self.prefix}:backend:{backend}:circuits"

    def backend_window(self, backend: str, kind: str, minute: int) -> str:
        """Requests (``rpm``) or tokens (``tpm``) sent to a backend in one minute."""
        return f"{self.prefix}:backend:{backend}:{kind}:{minute}"

    def affinity(self, session_id: str) -> str:
        """The backend a session is pinned to; the client's id is hashed like idempotency keys."""
        digest = hashlib.sha256(session_id.encode()).hexdigest()
        return f"{self.prefix}:affinity:{digest}"

    def tenant(self, tenant: str | None) -> str:
        """Where a tenant's keys start; the name is hashed like sessions. The unnamed tenant's (``None``) is
        ``-``, which no digest spells."""
        if tenant is None:
            return f"{self.prefix}:tenant:-"
        return f"{self.prefix}:tenant:{hashlib.sha256(tenant.encode()).hexdigest()[:32]}"

    def tenant_open(self, tenant: str | None) -> str:
        """Sorted set of a tenant's messages accepted and not yet ended (its ``max_queued``), scored by when
        their status hash would expire unended (a message lost with its hash leaves by then)."""
        return f"{self.tenant(tenant)}:open"

    def tenant_running(self, tenant: str | None) -> str:
        """Sorted set of a tenant's messages admitted and not yet ended nor waiting to retry (its
        ``max_in_flight``), scored by when they were admitted."""
        return f"{self.tenant(tenant)}:running"

    def tenant_rate(self, tenant: str | None) -> str:
        """Hash of a tenant's rate limits (``rpm``, ``tpm``): each one's theoretical arrival time (GCRA)."""
        return f"{self.tenant(tenant)}:rate"

    def tenant_vtime(self, level: str, tenant: str | None) -> str:
        """A tenant's virtual time in a level: the estimated tokens / weight it was admitted for, from where it
        started (``llmq.stages.schedule.fair``); it expires once the tenant has been idle a while."""
        return f"{self.tenant(tenant)}:vt:{level}"

    def level_vtime(self, level: str) -> str:
        """A level's virtual time: the start of the latest admission, where a tenant new to the level starts."""
        return f"{self.prefix}:vt:{level}"

    def consumer_lease(self, group: str, consumer: str) -> str:
        """Liveness lease of a consumer name: held by exactly one live process."""
        return f"{self.prefix}:consumer:{group}:{consumer}"

    def consumer_lease_pattern(self, group: str) -> str:
        return f"{self.prefix}:consumer:{group}:*"
