#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    (store, dir)
}

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh Postgres database, dropped by [`drop_postgres`]. `None` (saying why) when Postgres is
/// unreachable outside CI; under `CI=true` that fails the test instead.
async fn postgres() -> Option<(Store, String)> {
    let name = empty_postgres().await?;
    let store = Store::connect(&postgres_url(&name)).await.unwrap();
    Some((store, name))
}

fn postgres_url(name: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

/// A fresh, empty Postgres database's name; see [`postgres`].
async fn empty_postgres() -> Option<String> {
    sqlx::any::install_default_drivers();
    let admin = match AnyPool::connect(PG_ADMIN_URL).await {
        Ok(p) => p,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "PostgreSQL is required under CI=true but {PG_ADMIN_URL} is unreachable: {e}"
                );
            }
            eprintln!(
                "SKIPPED: PostgreSQL not reachable at {PG_ADMIN_URL} ({e}); this test needs it"
            );
            return None;
        }
    };
    let name = format!("tollgate_store_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    Some(name)
}

/// Runs `test` on a fresh Postgres database and drops it after.
async fn on_postgres(test: impl AsyncFnOnce(&Store)) {
    let Some((store, name)) = postgres().await else {
        return;
    };
    test(&store).await;
    drop_postgres(store, name).await;
}

async fn drop_postgres(store: Store, name: String) {
    store.close().await;
    let admin = AnyPool::connect(PG_ADMIN_URL).await.unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await;
    admin.close().await;
}

/// A call of `account`'s that cost `nanos`.
pub(crate) fn call(id: &str, account: &str, nanos: i64) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        account_id: account.to_owned(),
        key_id: None,
        model: "m".to_owned(),
        provider: "p".to_owned(),
        prompt_tokens: 1,
        completion_tokens: 2,
        cached_tokens: 0,
        cost: Amount(nanos),
        uncollected: Amount(0),
        status: 200,
        stream: false,
        usage_source: UsageSource::Upstream,
        latency_ms: 1,
        created_at: now_ms(),
    }
}

/// The same as a record.
pub(crate) fn charge(id: &str, account: &str, nanos: i64) -> Record {
    Record::Call(call(id, account, nanos))
}

/// A credit or adjustment of `account`'s.
pub(crate) fn entry(id: &str, account: &str, kind: EntryKind, nanos: i64) -> Record {
    Record::Entry(LedgerEntry {
        entry_id: id.to_owned(),
        account_id: account.to_owned(),
        kind,
        amount: Amount(nanos),
        key_id: None,
        reason: Some("test".to_owned()),
        created_at: now_ms(),
    })
}

#[tokio::test]
async fn an_entry_counts_once_however_often_it_is_written() {
    let (store, _dir) = sqlite().await;
    an_entry_counts_once(&store).await;
}

async fn an_entry_counts_once(store: &Store) {
    store.create_account("a", "a@example.com").await.unwrap();
    let credit = entry("c1", "a", EntryKind::Credit, 1000);
    assert_eq!(
        store
            .commit_batch(std::slice::from_ref(&credit))
            .await
            .unwrap(),
        vec![true]
    );
    // The same charge twice in one batch, then again in a later batch, and the credit again.
    let flags = store
        .commit_batch(&[
            charge("r1", "a", 100),
            charge("r1", "a", 100),
            charge("r2", "a", 7),
        ])
        .await
        .unwrap();
    assert_eq!(flags, vec![true, false, true]);
    let flags = store
        .commit_batch(&[charge("r1", "a", 100), credit])
        .await
        .unwrap();
    assert_eq!(flags, vec![false, false]);
    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(1000 - 107)
    );
    // Calls only: `c1` is an entry.
    let (snapshot, found) = store
        .account_snapshot("a", &["r1".into(), "r3".into(), "c1".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, ["r1".to_owned()].into_iter().collect());
    assert_eq!(snapshot.balance, Amount(1000 - 107));
    assert!(store
        .account_snapshot("nobody", &["r1".into()])
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn duplicate_email_is_its_own_error() {
    let (store, _dir) = sqlite().await;
    store.create_account("a", "a@example.com").await.unwrap();
    assert!(matches!(
        store.create_account("b", "a@example.com").await,
        Err(StoreError::DuplicateEmail(_))
    ));
}

/// The connection that commits batches has the large page cache; every connection copies the
/// WAL back at 10,000 pages (BENCHMARKS item 50).
#[tokio::test]
async fn the_sqlite_writer_keeps_a_large_page_cache() {
    let (store, _dir) = sqlite().await;
    let pragma = |pool: &AnyPool, name: &'static str| {
        let pool = pool.clone();
        async move {
            let row = sqlx::query(&format!("PRAGMA {name}"))
                .fetch_one(&pool)
                .await
                .unwrap();
            row.try_get::<i64, _>(0).unwrap()
        }
    };
    assert_eq!(pragma(&store.writer, "cache_size").await, -16384);
    assert_eq!(pragma(&store.pool, "cache_size").await, -2000);
    for pool in [&store.writer, &store.pool] {
        assert_eq!(pragma(pool, "wal_autocheckpoint").await, 10_000);
        assert_eq!(pragma(pool, "synchronous").await, 2, "FULL");
    }
}

#[tokio::test]
async fn an_in_memory_sqlite_database_is_refused() {
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite://ledger.db?mode=memory",
        "sqlite:ledger.db?cache=shared&mode=memory",
    ] {
        match Store::connect(url).await {
            Err(e @ StoreError::InMemory(_)) => {
                assert!(e.to_string().contains("lose every charge"), "{e}")
            }
            other => panic!("{url}: {:?}", other.map(|_| "connected")),
        }
    }
    assert!(!sqlite_in_memory("sqlite://memory.db"));
    assert!(!sqlite_in_memory("sqlite://ledger.db?mode=rwc"));
}

/// The ledger's batches go through a connection of their own: what it commits is what every
/// other connection reads, and reads running meanwhile do not hold it up.
#[tokio::test]
async fn batches_committed_by_the_writer_are_read_everywhere() {
    let (store, dir) = sqlite().await;
    store.create_account("a", "a@example.com").await.unwrap();
    // A read transaction left open on the shared pool (WAL lets the writer go on).
    let mut reader = store.pool().begin().await.unwrap();
    let before: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 'a'")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    assert_eq!(before, 0);
    for i in 0..3 {
        let flags = store
            .commit_batch(&[charge(&format!("r{i}"), "a", 100)])
            .await
            .unwrap();
        assert_eq!(flags, vec![true]);
    }
    reader.rollback().await.unwrap();
    let after: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 'a'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(after, -300);
    // And another process's view of the file (a second store) agrees.
    let other = Store::connect(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_records")
        .fetch_one(other.pool())
        .await
        .unwrap();
    assert_eq!(n, 3);
    other.close().await;
    store.close().await;
}

/// Every field of a batch lands as written, on both stores: integers beyond 2^53 (where a
/// float would round), text that JSON must escape, absent optionals, several accounts and keys.
async fn a_batch_round_trips_exactly(store: &Store) {
    let big: i64 = (1 << 53) + 1;
    for (id, email) in [("a", "a@example.com"), ("b", "b@example.com")] {
        store.create_account(id, email).await.unwrap();
    }
    store
        .insert_key(&KeyRow {
            id: "k1".to_owned(),
            account_id: "a".to_owned(),
            name: "k".to_owned(),
            key_hash: "h1".to_owned(),
            prefix: "sk-tg-1".to_owned(),
            spend_cap: None,
            spent: Amount(0),
            expires_at: None,
            allowed_models: None,
            created_at: now_ms(),
            revoked_at: None,
        })
        .await
        .unwrap();
    let reason = "top-up \"quoted\", back\\slash, new\nline, ünïcode ✓, 'single'";
    let credit = |id: &str, account: &str, amount: i64| {
        Record::Entry(LedgerEntry {
            entry_id: id.to_owned(),
            account_id: account.to_owned(),
            kind: EntryKind::Credit,
            amount: Amount(amount),
            key_id: None,
            reason: Some(reason.to_owned()),
            created_at: 1_700_000_000_123,
        })
    };
    let usage = UsageRecord {
        request_id: "req-1".into(),
        account_id: "a".to_owned(),
        key_id: Some("k1".to_owned()),
        model: "gpt-4o-mini".to_owned(),
        provider: "mock \"quoted\"".to_owned(),
        prompt_tokens: big as u64,
        completion_tokens: 16,
        cached_tokens: 0,
        cost: Amount(big - 2),
        uncollected: Amount(3),
        status: 200,
        stream: true,
        usage_source: UsageSource::Estimated,
        latency_ms: 12,
        created_at: 1_700_000_000_456,
    };
    let failed = UsageRecord {
        request_id: "req-2".into(),
        account_id: "b".to_owned(),
        key_id: None,
        status: 502,
        stream: false,
        cost: Amount(0),
        uncollected: Amount(0),
        usage_source: UsageSource::Upstream,
        ..usage.clone()
    };
    let flags = store
        .commit_batch(&[
            credit("c-a", "a", 3 * big),
            credit("c-b", "b", big),
            Record::Call(usage.clone()),
            Record::Call(failed.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(flags, vec![true, true, true, true]);
    assert_eq!(
        store.rechecked_batches(),
        0,
        "an all-new batch goes the fast way"
    );

    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(3 * big - (big - 2))
    );
    assert_eq!(
        store.account("b").await.unwrap().unwrap().balance,
        Amount(big)
    );
    assert_eq!(
        store.key("k1").await.unwrap().unwrap().spent,
        Amount(big - 2)
    );
    assert_eq!(store.usage("a", 10).await.unwrap(), vec![usage]);
    assert_eq!(store.usage("b", 10).await.unwrap(), vec![failed]);
    let reasons: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT entry_id, reason, created_at FROM ledger WHERE kind = 'credit' ORDER BY entry_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        reasons,
        vec![
            ("c-a".to_owned(), Some(reason.to_owned()), 1_700_000_000_123),
            ("c-b".to_owned(), Some(reason.to_owned()), 1_700_000_000_123),
        ]
    );
}

#[tokio::test]
async fn a_batch_round_trips_exactly_on_sqlite() {
    let (store, _dir) = sqlite().await;
    a_batch_round_trips_exactly(&store).await;
}

#[tokio::test]
async fn a_batch_round_trips_exactly_on_postgres() {
    on_postgres(a_batch_round_trips_exactly).await;
}

/// What an account starting reads (its balance, and which of its calls the store has) comes
/// from one state of the store, while batches commit alongside: the balance less the calls
/// the store lacks is the same in every read.
async fn a_snapshot_with_calls_sees_one_state(store: &Store) {
    store.create_account("a", "a@example.com").await.unwrap();
    let n = 150;
    let ids: Vec<crate::RequestId> = (0..n).map(|i| format!("r{i}").into()).collect();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..n {
                store
                    .commit_batch(&[charge(&format!("r{i}"), "a", 1 << (i % 20))])
                    .await
                    .unwrap();
            }
        })
    };
    let all: i64 = (0..n).map(|i| 1i64 << (i % 20)).sum();
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let (snapshot, found) = store.account_snapshot("a", &ids).await.unwrap().unwrap();
        let lacking: i64 = (0..n)
            .filter(|i| !found.contains(&format!("r{i}")))
            .map(|i| 1i64 << (i % 20))
            .sum();
        assert_eq!(
            snapshot.balance.nanos() - lacking,
            -all,
            "read {reads}: {} of {n} calls found",
            found.len()
        );
        reads += 1;
    }
    writer.await.unwrap();
}

#[tokio::test]
async fn a_snapshot_with_calls_sees_one_state_on_sqlite() {
    let (store, _dir) = sqlite().await;
    a_snapshot_with_calls_sees_one_state(&store).await;
}

#[tokio::test]
async fn a_snapshot_with_calls_sees_one_state_on_postgres() {
    on_postgres(a_snapshot_with_calls_sees_one_state).await;
}

#[tokio::test]
async fn an_entry_counts_once_on_postgres() {
    on_postgres(an_entry_counts_once).await;
}

/// Batches larger than one statement's chunk, and of sizes that are no power of two, with an
/// old call hidden among new ones, then an old call beside a new entry. Every new record counts
/// once and no old one again, whichever way the batch went in; and only the batches that hold
/// an old record go the slow way.
async fn large_batches_with_old_records_count_each_record_once(store: &Store) {
    let accounts = ["a", "b", "c"];
    for id in accounts {
        store
            .create_account(id, &format!("{id}@example.com"))
            .await
            .unwrap();
    }
    let mut expected = [0i64; 3];
    let batch = |range: std::ops::Range<i64>, expected: &mut [i64; 3]| -> Vec<Record> {
        range
            .map(|i| {
                let n = (i % 3) as usize;
                expected[n] -= i;
                charge(&format!("r{i}"), accounts[n], i)
            })
            .collect()
    };

    let first = batch(0..1, &mut expected);
    assert_eq!(store.commit_batch(&first).await.unwrap(), vec![true]);
    assert_eq!(store.rechecked_batches(), 0);
    // 299 new records with the first one again in the middle.
    let mut second = batch(1..300, &mut expected);
    second.insert(150, first[0].clone());
    let flags = store.commit_batch(&second).await.unwrap();
    assert_eq!(flags.iter().filter(|f| **f).count(), 299);
    assert!(!flags[150]);
    assert_eq!(store.rechecked_batches(), 1);
    // 201 new records, then a new credit beside an old call.
    let third = batch(300..501, &mut expected);
    assert_eq!(store.commit_batch(&third).await.unwrap(), vec![true; 201]);
    assert_eq!(store.rechecked_batches(), 1);
    let late = entry("late", "a", EntryKind::Credit, 5);
    expected[0] += 5;
    assert_eq!(
        store.commit_batch(&[late, third[0].clone()]).await.unwrap(),
        vec![true, false]
    );
    assert_eq!(store.rechecked_batches(), 2);

    for (n, id) in accounts.iter().enumerate() {
        assert_eq!(
            store.account(id).await.unwrap().unwrap().balance,
            Amount(expected[n]),
            "balance of {id}"
        );
    }
    let (entries, usages): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM ledger), (SELECT COUNT(*) FROM usage_records)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((entries, usages), (1, 501));
}

#[tokio::test]
async fn large_batches_with_old_records_count_each_record_once_on_sqlite() {
    let (store, _dir) = sqlite().await;
    large_batches_with_old_records_count_each_record_once(&store).await;
}

#[tokio::test]
async fn large_batches_with_old_records_count_each_record_once_on_postgres() {
    on_postgres(large_batches_with_old_records_count_each_record_once).await;
}

/// A call must name an account that exists, and an account that calls name stays: on SQLite
/// by the foreign key, on Postgres by the triggers of migration 0003, which check each
/// statement's accounts once. A batch with a call of an unknown account is refused whole,
/// whether it went the fast way or, holding an old call as well, the slow way; the refusal is
/// one the ledger writer sets aside rather than retries.
async fn calls_name_accounts_that_exist(store: &Store) {
    store.create_account("a", "a@example.com").await.unwrap();
    store.create_account("b", "b@example.com").await.unwrap();
    let usage_rows = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM usage_records")
            .fetch_one(store.pool())
            .await
            .unwrap()
    };

    let refused = store
        .commit_batch(&[charge("r1", "a", 10), charge("r2", "nobody", 20)])
        .await
        .unwrap_err();
    assert!(refused.is_rejection(), "{refused}");
    assert_eq!(usage_rows().await, 0);
    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(0)
    );

    assert_eq!(
        store.commit_batch(&[charge("r1", "a", 10)]).await.unwrap(),
        vec![true]
    );
    let before = store.rechecked_batches();
    let refused = store
        .commit_batch(&[charge("r1", "a", 10), charge("r3", "nobody", 30)])
        .await
        .unwrap_err();
    assert!(refused.is_rejection(), "{refused}");
    if store.backend() == Backend::Postgres {
        // The COPY stopped at the old call, so the unknown account met the slow way's check.
        // (SQLite's all-new inserts skip the old call and stop at the unknown account.)
        assert_eq!(store.rechecked_batches(), before + 1);
    }
    assert_eq!(usage_rows().await, 1);
    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(-10)
    );

    for statement in [
        "DELETE FROM accounts WHERE id = 'a'",
        "UPDATE accounts SET id = 'z' WHERE id = 'a'",
        "UPDATE usage_records SET account_id = 'nobody' WHERE request_id = 'r1'",
    ] {
        let refused = sqlx::query(statement)
            .execute(store.pool())
            .await
            .map_err(StoreError::from)
            .unwrap_err();
        assert!(refused.is_rejection(), "{statement}: {refused}");
    }
    // What the rule allows goes through: a call's other fields change, a call moves to an
    // account that exists (and back), and an account that no call names goes.
    for statement in [
        "UPDATE usage_records SET model = 'n' WHERE request_id = 'r1'",
        "UPDATE usage_records SET account_id = 'b' WHERE request_id = 'r1'",
        "UPDATE usage_records SET account_id = 'a' WHERE request_id = 'r1'",
        "DELETE FROM accounts WHERE id = 'b'",
    ] {
        let done = sqlx::query(statement).execute(store.pool()).await.unwrap();
        assert_eq!(done.rows_affected(), 1, "{statement}");
    }
}

#[tokio::test]
async fn calls_name_accounts_that_exist_on_sqlite() {
    let (store, _dir) = sqlite().await;
    calls_name_accounts_that_exist(&store).await;
}

#[tokio::test]
async fn calls_name_accounts_that_exist_on_postgres() {
    on_postgres(calls_name_accounts_that_exist).await;
}

/// A store from before migration 0002, where a charged call wrote a ledger entry of kind
/// `charge` beside its usage record, upgrades in place: those entries go, every balance, key
/// spend and call stays, and the ledger takes no charge entry after.
async fn a_store_from_before_one_row_per_call_upgrades(url: &str, backend: &str) {
    sqlx::any::install_default_drivers();
    let old = tempfile::tempdir().unwrap();
    let first = format!(
        "{}/../migrations/{backend}/0001_core.sql",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::copy(first, old.path().join("0001_core.sql")).unwrap();
    let pool = AnyPool::connect(url).await.unwrap();
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    for sql in [
        "INSERT INTO accounts (id, email, balance, created_at) VALUES ('a', 'a@example.com', 893, 1)",
        "INSERT INTO api_keys (id, account_id, name, key_hash, prefix, spent, created_at) \
         VALUES ('k', 'a', 'k', 'h', 'p', 100, 1)",
        "INSERT INTO ledger (entry_id, account_id, kind, amount, key_id, reason, created_at) \
         VALUES ('c1', 'a', 'credit', 1000, NULL, 'deposit', 1), \
         ('r1', 'a', 'charge', -100, 'k', NULL, 2), ('r2', 'a', 'charge', -7, NULL, NULL, 3)",
        "INSERT INTO usage_records (request_id, account_id, key_id, model, provider, \
         prompt_tokens, completion_tokens, cached_tokens, cost, uncollected, status, stream, \
         usage_source, latency_ms, created_at) VALUES \
         ('r1', 'a', 'k', 'm', 'p', 1, 2, 0, 100, 0, 200, 0, 'upstream', 1, 2), \
         ('r2', 'a', NULL, 'm', 'p', 1, 2, 0, 7, 0, 200, 1, 'upstream', 1, 3), \
         ('r3', 'a', 'k', 'm', 'p', 1, 0, 0, 0, 0, 502, 0, 'upstream', 1, 4)",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;

    let store = Store::connect(url).await.unwrap();
    let entries: Vec<(String, String)> =
        sqlx::query_as("SELECT entry_id, kind FROM ledger ORDER BY seq")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(entries, vec![("c1".to_owned(), "credit".to_owned())]);
    assert_eq!(store.usage("a", 10).await.unwrap().len(), 3);
    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(893)
    );
    assert_eq!(store.key("k").await.unwrap().unwrap().spent, Amount(100));

    // Old and new records count once, by the new rules.
    let new_call = Record::Call(UsageRecord {
        key_id: Some("k".to_owned()),
        ..call("r4", "a", 3)
    });
    let flags = store
        .commit_batch(&[
            charge("r1", "a", 100),
            new_call,
            entry("c2", "a", EntryKind::Credit, 10),
        ])
        .await
        .unwrap();
    assert_eq!(flags, vec![false, true, true]);
    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(900)
    );
    assert_eq!(store.key("k").await.unwrap().unwrap().spent, Amount(103));
    let (snapshot, _) = store.account_snapshot("a", &[]).await.unwrap().unwrap();
    assert_eq!(snapshot.balance, Amount(900));
    assert_eq!(snapshot.key_spent, vec![("k".to_owned(), Amount(103))]);

    let refused = sqlx::query(
        "INSERT INTO ledger (entry_id, account_id, kind, amount, created_at) \
         VALUES ('r5', 'a', 'charge', -1, 5)",
    )
    .execute(store.pool())
    .await
    .map_err(StoreError::from)
    .unwrap_err();
    assert!(refused.is_rejection(), "{refused}");
    store.close().await;
}

#[tokio::test]
async fn a_sqlite_store_from_before_one_row_per_call_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/old.db?mode=rwc", dir.path().display());
    a_store_from_before_one_row_per_call_upgrades(&url, "sqlite").await;
}

#[tokio::test]
async fn a_postgres_store_from_before_one_row_per_call_upgrades() {
    let Some(name) = empty_postgres().await else {
        return;
    };
    let url = postgres_url(&name);
    a_store_from_before_one_row_per_call_upgrades(&url, "postgres").await;
    let store = Store::connect(&url).await.unwrap();
    drop_postgres(store, name).await;
}
