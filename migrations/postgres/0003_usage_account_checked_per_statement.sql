-- A usage record's account must exist, as before; Postgres now checks it once per statement
-- instead of once per row.
--
-- The foreign key `usage_records.account_id → accounts(id)` ran, for every row inserted, a
-- query of its own (a lookup of the account and a KEY SHARE lock on it): 43% of Postgres's
-- CPU in the ledger's batches once they went in by COPY (BENCHMARKS item 46). The two
-- triggers below keep the same rule for every writer, the gateway or anyone with psql:
--   - after each statement that inserts usage records, every account the new rows name must
--     exist; each is looked up and locked (KEY SHARE, as the foreign key did, so that it cannot
--     be deleted before this transaction commits) once, however many rows name it;
--   - an account that usage records name cannot be deleted, nor its id changed.
--   - a usage record moved to another account (no writer does) must name one that exists;
--     checked row by row, as the foreign key did.
-- Each refuses with SQLSTATE 23503 (foreign_key_violation), the foreign key's own code.

ALTER TABLE usage_records DROP CONSTRAINT usage_records_account_id_fkey;

CREATE FUNCTION usage_records_accounts_exist() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing TEXT;
BEGIN
    PERFORM 1 FROM accounts AS a
      WHERE a.id IN (SELECT account_id FROM new_rows)
      FOR KEY SHARE OF a;
    SELECT n.account_id INTO missing
      FROM (SELECT DISTINCT account_id FROM new_rows) AS n
     WHERE NOT EXISTS (SELECT 1 FROM accounts AS a WHERE a.id = n.account_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'usage record names account "%", which does not exist', missing
            USING ERRCODE = 'foreign_key_violation', TABLE = 'usage_records';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER usage_records_accounts_exist
    AFTER INSERT ON usage_records
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_records_accounts_exist();

CREATE FUNCTION usage_records_account_exists() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM accounts AS a WHERE a.id = NEW.account_id FOR KEY SHARE OF a;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'usage record names account "%", which does not exist', NEW.account_id
            USING ERRCODE = 'foreign_key_violation', TABLE = 'usage_records';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER usage_records_account_exists
    BEFORE UPDATE OF account_id ON usage_records
    FOR EACH ROW WHEN (NEW.account_id IS DISTINCT FROM OLD.account_id)
    EXECUTE FUNCTION usage_records_account_exists();

CREATE FUNCTION accounts_keep_their_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM usage_records WHERE account_id = OLD.id) THEN
        RAISE EXCEPTION 'account "%" has usage records', OLD.id
            USING ERRCODE = 'foreign_key_violation', TABLE = 'accounts';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE TRIGGER accounts_keep_their_usage
    BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_keep_their_usage();

CREATE TRIGGER accounts_keep_their_id
    BEFORE UPDATE OF id ON accounts
    FOR EACH ROW WHEN (NEW.id IS DISTINCT FROM OLD.id)
    EXECUTE FUNCTION accounts_keep_their_usage();
