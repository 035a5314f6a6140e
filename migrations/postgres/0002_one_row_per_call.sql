-- One row per call. A call's charge is its usage record's `cost`; the ledger keeps the
-- movements of money that are not calls (credits and adjustments). Until now every charged
-- call also wrote a ledger entry of kind 'charge' for the same amount, in the same
-- transaction, with the call's request id as its entry id: those entries go.
-- `accounts.balance` and `api_keys.spent` already count them and do not change.

DELETE FROM ledger WHERE kind = 'charge';
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check CHECK (kind IN ('credit', 'adjustment'));
