-- Token counts are a backend's numbers: 3e9 does not fit integer, and one such row made PostgreSQL refuse
-- its whole archive batch. bigint holds every count a backend can send through msgpack up to 2**63 - 1;
-- pipeline/archive_rows.py stores a larger one as NULL. One ALTER, so the table is rewritten once (under an
-- exclusive lock: on a large archive, run `llmq-stage db migrate` when a pause of the archive is acceptable;
-- outcomes wait in the done stream meanwhile).
ALTER TABLE messages
    ALTER COLUMN prompt_tokens TYPE bigint,
    ALTER COLUMN completion_tokens TYPE bigint;
