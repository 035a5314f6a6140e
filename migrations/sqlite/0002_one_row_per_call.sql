-- One row per call. A call's charge is its usage record's `cost`; the ledger keeps the
-- movements of money that are not calls (credits and adjustments). Until now every charged
-- call also wrote a ledger entry of kind 'charge' for the same amount, in the same
-- transaction, with the call's request id as its entry id: those entries go.
-- `accounts.balance` and `api_keys.spent` already count them and do not change.

CREATE TABLE ledger_new (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    TEXT NOT NULL UNIQUE,
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    kind        TEXT NOT NULL CHECK (kind IN ('credit', 'adjustment')),
    amount      BIGINT NOT NULL,            -- signed: credits positive, adjustments either way
    key_id      TEXT,
    reason      TEXT,
    created_at  BIGINT NOT NULL
);
INSERT INTO ledger_new (seq, entry_id, account_id, kind, amount, key_id, reason, created_at)
    SELECT seq, entry_id, account_id, kind, amount, key_id, reason, created_at
    FROM ledger WHERE kind <> 'charge';
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_account ON ledger(account_id, seq);
