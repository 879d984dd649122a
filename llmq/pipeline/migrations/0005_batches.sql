-- Batches of the OpenAI Batch API (/v1/batches, llmq/pipeline/batches.py). A batch's requests run as
-- ordinary messages; each archived row names its batch and custom_id, so the batch stage counts a batch's
-- progress and writes its output from the archive. `fed` and the feed position (a chunk of the input file and
-- an offset in it) say how far the input has been queued: the batch stage goes on from there after a restart.
ALTER TABLE messages
    ADD COLUMN batch_id text,
    ADD COLUMN custom_id text;

CREATE INDEX messages_batch_id ON messages (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE batches (
    id                text        PRIMARY KEY,
    endpoint          text        NOT NULL,
    input_file_id     text        NOT NULL,
    completion_window text        NOT NULL,
    status            text        NOT NULL,
    level             text        NOT NULL,
    tenant            text,
    metadata          jsonb,
    total             integer     NOT NULL,
    fed               integer     NOT NULL DEFAULT 0,
    feed_chunk        integer     NOT NULL DEFAULT 0,
    feed_offset       integer     NOT NULL DEFAULT 0,
    completed         integer     NOT NULL DEFAULT 0,
    failed            integer     NOT NULL DEFAULT 0,
    cancel_pass       boolean     NOT NULL DEFAULT false,
    output_file_id    text,
    error_file_id     text,
    errors            jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    in_progress_at    timestamptz,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz
);

CREATE INDEX batches_created_at ON batches (created_at);
CREATE INDEX batches_open ON batches (created_at)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
