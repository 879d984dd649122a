-- What a message's detail shows beyond its last outcome: one line per failed attempt (which backend, when,
-- why), and a streamed call's time to its first chunk. Nullable columns without a default: PostgreSQL adds
-- them without rewriting the table.
ALTER TABLE messages
    ADD COLUMN errors jsonb,
    ADD COLUMN first_token_ms double precision;
