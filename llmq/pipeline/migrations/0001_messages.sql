-- Every outcome of every message, upserted by id (the archive stage acks only after commit).
CREATE TABLE messages (
    id                uuid PRIMARY KEY,
    level             text        NOT NULL,
    status            text        NOT NULL,
    tenant            text,
    session_id        text,
    backend           text,
    model             text,
    attempts          integer     NOT NULL DEFAULT 0,
    request           jsonb,
    response          jsonb,
    error             text,
    prompt_tokens     integer,
    completion_tokens integer,
    enqueued_at       timestamptz NOT NULL,
    started_at        timestamptz,
    finished_at       timestamptz NOT NULL,
    queue_wait_ms     double precision,
    latency_ms        double precision,
    archived_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX messages_finished_at ON messages (finished_at);
CREATE INDEX messages_status_finished_at ON messages (status, finished_at);
CREATE INDEX messages_tenant_finished_at ON messages (tenant, finished_at) WHERE tenant IS NOT NULL;
