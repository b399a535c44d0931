-- The history table of the chat example (the sink's upsert_key needs the primary key).
CREATE TABLE IF NOT EXISTS chat_history (
    id text PRIMARY KEY,
    room text NOT NULL,
    author text NOT NULL,
    text text NOT NULL,
    sent_at double precision NOT NULL
);
