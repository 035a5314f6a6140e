-- Accounts, API keys, the ledger and usage metadata. Never any prompt or response content.
-- Money columns are BIGINT nano-USDT (1e-9 USDT); times are BIGINT Unix milliseconds.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    balance     BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts(id),
    name            TEXT NOT NULL,
    key_hash        TEXT NOT NULL UNIQUE,   -- hex SHA-256 of the full key
    prefix          TEXT NOT NULL,          -- first characters, to recognise a key in lists
    spend_cap       BIGINT,                 -- NULL: no cap
    spent           BIGINT NOT NULL DEFAULT 0,
    expires_at      BIGINT,
    allowed_models  TEXT,                   -- JSON array of model ids; NULL: all
    created_at      BIGINT NOT NULL,
    revoked_at      BIGINT
);
CREATE INDEX api_keys_account ON api_keys(account_id);

-- Every movement of money. `entry_id` makes each record idempotent: a charge's entry id
-- is its request id.
CREATE TABLE ledger (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    TEXT NOT NULL UNIQUE,
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    kind        TEXT NOT NULL CHECK (kind IN ('credit', 'charge', 'adjustment')),
    amount      BIGINT NOT NULL,            -- signed: credits positive, charges negative
    key_id      TEXT,
    reason      TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX ledger_account ON ledger(account_id, seq);

CREATE TABLE usage_records (
    request_id         TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL REFERENCES accounts(id),
    key_id             TEXT,
    model              TEXT NOT NULL,
    provider           TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    cached_tokens      BIGINT NOT NULL,
    cost               BIGINT NOT NULL,
    uncollected        BIGINT NOT NULL DEFAULT 0,
    status             BIGINT NOT NULL,
    stream             BIGINT NOT NULL,
    usage_source       TEXT NOT NULL,       -- 'upstream' or 'estimated'
    latency_ms         BIGINT NOT NULL,
    created_at         BIGINT NOT NULL
);
CREATE INDEX usage_account ON usage_records(account_id, created_at);
