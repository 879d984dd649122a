-- Files of the OpenAI Batch API (/v1/files): a batch's input, its output and its errors. The bytes are kept
-- in chunks of at most 1 MiB (llmq/pipeline/filestore.py), so neither an upload nor a download holds a
-- file whole in memory; a file and its chunks are written in one transaction.
CREATE TABLE files (
    id          text        PRIMARY KEY,
    purpose     text        NOT NULL,
    filename    text        NOT NULL,
    bytes       bigint      NOT NULL,
    chunks      integer     NOT NULL,
    lines       integer     NOT NULL DEFAULT 0,
    urls        text[]      NOT NULL DEFAULT '{}',
    tenant      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX files_created_at ON files (created_at);

CREATE TABLE file_chunks (
    file_id  text    NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    seq      integer NOT NULL,
    data     bytea   NOT NULL,
    PRIMARY KEY (file_id, seq)
);
