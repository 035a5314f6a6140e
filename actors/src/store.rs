//! The durable store: SQLite (the embedded default) or Postgres, chosen by the URL.
//!
//! Only actors and the admin paths talk to it; the request hot path never does. Queries are
//! written once in the SQL both databases accept (`$N` parameters, `ON CONFLICT`, `RETURNING`),
//! except the ledger's batch statements, which unpack a JSON parameter in each one's dialect
//! (and, for a batch whose records are all new, a faster form in each: plain inserts on
//! SQLite, binary `COPY` on Postgres).

mod copy;

use crate::money::Amount;
use copy::BinaryRows;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AnyPool, Row};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database url `{0}` (use sqlite://… or postgres://…)")]
    UnsupportedUrl(String),
    #[error(
        "`{0}` is an in-memory SQLite database: it would lose every charge when the process \
         exits (and each connection would see a database of its own); name a file, \
         sqlite://path/to/tollgate.db"
    )]
    InMemory(String),
    #[error("cannot create the database directory: {0}")]
    Directory(#[source] std::io::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("email `{0}` is already registered")]
    DuplicateEmail(String),
}

impl StoreError {
    /// The database received the statement and refused it (a constraint, a value it cannot
    /// hold), as opposed to a connection that failed: sending it again changes nothing.
    pub fn is_rejection(&self) -> bool {
        let StoreError::Database(sqlx::Error::Database(db)) = self else {
            return false;
        };
        if !matches!(db.kind(), sqlx::error::ErrorKind::Other) {
            return true; // unique, foreign-key, not-null or check violation
        }
        match db.code().as_deref() {
            // Postgres SQLSTATE: class 22 (data exception), 23 (integrity constraint).
            // Class 57 and 08 (shutdown, connection) are not here: those are retried.
            Some(c) if c.len() == 5 => c.starts_with("22") || c.starts_with("23"),
            // SQLite (extended) result codes: TOOBIG, CONSTRAINT, MISMATCH, RANGE.
            // BUSY and LOCKED are not here: those are retried.
            Some(c) => c
                .parse::<u32>()
                .is_ok_and(|n| matches!(n & 0xff, 18 | 19 | 20 | 25)),
            None => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    /// Where ledger batches are committed. On SQLite a pool of its own with one connection:
    /// every batch then finds that connection's page cache and prepared statements as the
    /// last batch left them. Taking the shared pool's connections in turn (sqlx hands out
    /// the one idle longest) made each batch re-read the pages the others had written,
    /// since WAL invalidates a connection's cache whenever another connection commits.
    /// Batches are committed one at a time anyway (the ledger writer ships one shipment at a
    /// time, and SQLite takes one writer at a time). On Postgres, the shared pool.
    writer: AnyPool,
    /// Postgres: one connection of the driver's own, for the batches that go in by `COPY`
    /// (sqlx's `Any` connections cannot). One, so that the balance updates it prepares are
    /// prepared once; batches come one at a time anyway.
    copier: Option<PgPool>,
    /// Batches that could not go the fast way because one of their records was stored
    /// already (a replay after a crash), and were committed record by record.
    rechecked: Arc<AtomicU64>,
    backend: Backend,
}

#[derive(Clone, Debug)]
pub struct AccountRow {
    pub id: String,
    pub email: String,
    pub balance: Amount,
    pub created_at: i64,
}

#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub key_hash: String,
    pub prefix: String,
    pub spend_cap: Option<Amount>,
    pub spent: Amount,
    pub expires_at: Option<i64>,
    pub allowed_models: Option<Vec<String>>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Credit,
    Adjustment,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Credit => "credit",
            EntryKind::Adjustment => "adjustment",
        }
    }
}

/// A movement of money that is not a call: a credit (a deposit) or an operator's adjustment.
/// `entry_id` is unique: writing the same entry twice is a no-op. What a call is charged is
/// in its [`UsageRecord`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LedgerEntry {
    pub entry_id: String,
    pub account_id: String,
    pub kind: EntryKind,
    /// Signed: credits positive, adjustments either way.
    pub amount: Amount,
    pub key_id: Option<String>,
    pub reason: Option<String>,
    pub created_at: i64,
}

/// One proxied call: its metadata (never content) and what the balance paid for it (`cost`).
/// `request_id` is unique: writing the same call twice is a no-op.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    pub request_id: crate::RequestId,
    pub account_id: String,
    pub key_id: Option<String>,
    pub model: String,
    pub provider: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// What the balance paid: the call's charge (zero for a call that cost nothing).
    pub cost: Amount,
    /// What the call cost beyond that, when the balance ran dry.
    pub uncollected: Amount,
    pub status: u16,
    pub stream: bool,
    pub usage_source: UsageSource,
    pub latency_ms: u64,
    pub created_at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// Token counts reported by the upstream.
    Upstream,
    /// Counted by Tollgate because the upstream reported none (e.g. client disconnect).
    Estimated,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Estimated => "estimated",
        }
    }
    fn parse(s: &str) -> UsageSource {
        if s == "estimated" {
            UsageSource::Estimated
        } else {
            UsageSource::Upstream
        }
    }
}

/// What the ledger writer commits: one row in the store, of either table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", try_from = "RecordWire")]
pub enum Record {
    /// A call, with its charge (a row of `usage_records`).
    Call(UsageRecord),
    /// A credit or an adjustment (a row of `ledger`).
    Entry(LedgerEntry),
}

impl Record {
    /// The account whose money the record moves.
    pub fn account_id(&self) -> &str {
        match self {
            Record::Call(u) => &u.account_id,
            Record::Entry(e) => &e.account_id,
        }
    }
}

/// A record as journal lines hold it: `{"call":…}` or `{"entry":…}`, or, in a journal written
/// before migration 0002, `{"ledger":…,"usage":…}`, where a call came with a ledger entry of
/// kind `charge` for the same amount. Such a call reads as its usage record alone, which is
/// how the migration left the store: it deleted those entries.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RecordWire {
    Call {
        call: UsageRecord,
    },
    Entry {
        entry: LedgerEntry,
    },
    Legacy {
        ledger: Option<serde_json::Value>,
        usage: Option<UsageRecord>,
    },
}

impl TryFrom<RecordWire> for Record {
    type Error = String;

    fn try_from(wire: RecordWire) -> Result<Record, String> {
        Ok(match wire {
            RecordWire::Call { call }
            | RecordWire::Legacy {
                usage: Some(call), ..
            } => Record::Call(call),
            RecordWire::Entry { entry } => Record::Entry(entry),
            RecordWire::Legacy {
                ledger: Some(entry),
                usage: None,
            } => Record::Entry(serde_json::from_value(entry).map_err(|e| e.to_string())?),
            RecordWire::Legacy {
                ledger: None,
                usage: None,
            } => return Err("a record with neither a call nor an entry".to_owned()),
        })
    }
}

/// An account's durable state, as an account actor loads it on start.
#[derive(Clone, Debug)]
pub struct AccountSnapshot {
    pub balance: Amount,
    pub key_spent: Vec<(String, Amount)>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn u64_to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn i64_to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Connects and applies the migrations for the backend the URL names.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let (pool, writer, copier) = match backend {
            Backend::Sqlite => {
                if sqlite_in_memory(url) {
                    return Err(StoreError::InMemory(url.to_owned()));
                }
                let url = sqlite_url_with_create(url).map_err(StoreError::Directory)?;
                let pool = sqlite_pool(4, None).connect(&url).await?;
                SQLITE_MIGRATIONS.run(&pool).await?;
                // Opened after the migrations, so that it never sees the schema change.
                let writer = sqlite_pool(1, Some(SQLITE_WRITER_CACHE))
                    .connect(&url)
                    .await?;
                (pool, writer, None)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(url)
                    .await?;
                POSTGRES_MIGRATIONS.run(&pool).await?;
                let copier = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(url)
                    .await?;
                (pool.clone(), pool, Some(copier))
            }
        };
        Ok(Store {
            pool,
            writer,
            copier,
            rechecked: Arc::default(),
            backend,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        if let Some(copier) = &self.copier {
            copier.close().await;
        }
        self.writer.close().await;
        self.pool.close().await;
    }

    /// Whether the store answers within two seconds (a readiness probe must not hang).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let probe = sqlx::query("SELECT 1").execute(&self.pool);
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(result) => result.map(|_| ()).map_err(StoreError::from),
            Err(_) => Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
        }
    }

    // ---- accounts -------------------------------------------------------------------------

    pub async fn create_account(&self, id: &str, email: &str) -> Result<AccountRow, StoreError> {
        let created_at = now_ms();
        let result = sqlx::query(
            "INSERT INTO accounts (id, email, balance, created_at) VALUES ($1, $2, 0, $3)",
        )
        .bind(id)
        .bind(email)
        .bind(created_at)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(AccountRow {
                id: id.to_owned(),
                email: email.to_owned(),
                balance: Amount::ZERO,
                created_at,
            }),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                Err(StoreError::DuplicateEmail(email.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn account(&self, id: &str) -> Result<Option<AccountRow>, StoreError> {
        let row = sqlx::query("SELECT id, email, balance, created_at FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| account_row(&r)).transpose()
    }

    pub async fn account_by_email(&self, email: &str) -> Result<Option<AccountRow>, StoreError> {
        let row =
            sqlx::query("SELECT id, email, balance, created_at FROM accounts WHERE email = $1")
                .bind(email)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| account_row(&r)).transpose()
    }

    /// The account's balance and its keys' spend, and which of `calls` (charged to it, perhaps not yet in the
    /// store) the store has, read in one transaction that sees one state of the store: a
    /// batch committing meanwhile is either in both the balance and the answer, or in
    /// neither. Without calls to ask about, the snapshot alone.
    pub async fn account_snapshot(
        &self,
        id: &str,
        calls: &[crate::RequestId],
    ) -> Result<Option<(AccountSnapshot, KeySet)>, StoreError> {
        if calls.is_empty() {
            let snapshot = snapshot_of(&self.pool, id).await?;
            return Ok(snapshot.map(|s| (s, KeySet::default())));
        }
        let mut tx = self.pool.begin().await?;
        // SQLite reads one snapshot from a transaction's first read to its end (WAL);
        // Postgres does so only from REPEATABLE READ up (READ COMMITTED, its default, takes a
        // new one per statement).
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let sql = BatchSql::of(self.backend).committed_calls;
        let committed = keys_of(&mut *tx, sql, calls, "request_id").await?;
        let snapshot = snapshot_of(&mut *tx, id).await?;
        tx.rollback().await?;
        Ok(snapshot.map(|s| (s, committed)))
    }

    // ---- keys -----------------------------------------------------------------------------

    pub async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError> {
        let models = key
            .allowed_models
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_else(|_| "[]".to_owned()));
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, name, key_hash, prefix, spend_cap, spent, \
             expires_at, allowed_models, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, NULL)",
        )
        .bind(&key.id)
        .bind(&key.account_id)
        .bind(&key.name)
        .bind(&key.key_hash)
        .bind(&key.prefix)
        .bind(key.spend_cap.map(Amount::nanos))
        .bind(key.expires_at)
        .bind(models)
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyRow>, StoreError> {
        let row = sqlx::query(&format!("{KEY_COLUMNS} WHERE key_hash = $1"))
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| key_row(&r)).transpose()
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
        let row = sqlx::query(&format!("{KEY_COLUMNS} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| key_row(&r)).transpose()
    }

    /// Hands every key not revoked to `each`, one row at a time: with 100,000 keys, reading
    /// them all into a vector first took about 100 MB at start that the process kept.
    pub async fn each_active_key(&self, mut each: impl FnMut(KeyRow)) -> Result<(), StoreError> {
        use futures::TryStreamExt;
        let sql = format!("{KEY_COLUMNS} WHERE revoked_at IS NULL");
        let mut rows = sqlx::query(&sql).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            each(key_row(&row)?);
        }
        Ok(())
    }

    /// Marks a key revoked; returns it as it now is, or `None` if there is no such key.
    pub async fn revoke_key(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.key(id).await
    }

    // ---- ledger ---------------------------------------------------------------------------

    /// Commits a batch in one transaction. Returns, per record, whether it was new (`true`) or
    /// had been committed before (`false`; nothing is applied twice).
    ///
    /// A batch is first tried as all new: on SQLite by plain inserts that return nothing
    /// ([`Store::commit_new_batch`]), on Postgres by binary `COPY` ([`copy_new_batch`]). Only
    /// if one of its records turns out to be there already (a replay after a crash) is it
    /// rolled back and committed again by the statements below, which return the keys they
    /// inserted ([`Store::rechecked_batches`] counts those).
    ///
    /// Otherwise each table gets one statement whatever the batch size: the rows travel as one
    /// JSON array parameter that the database unpacks itself (see [`BatchSql`]). The statements'
    /// text never changes, so each is prepared once per connection (a `VALUES` list for the
    /// batch's exact size would be parsed and planned anew for every size).
    pub async fn commit_batch(&self, records: &[Record]) -> Result<Vec<bool>, StoreError> {
        // The same record twice in one batch (a resend racing its original) counts once.
        let mut entry_ids = IdSet::with_capacity_and_hasher(records.len(), Default::default());
        let mut call_ids = IdSet::with_capacity_and_hasher(records.len(), Default::default());
        let mut entries: Vec<&LedgerEntry> = Vec::new();
        let mut calls: Vec<&UsageRecord> = Vec::with_capacity(records.len());
        for record in records {
            match record {
                Record::Call(u) if call_ids.insert(&*u.request_id) => calls.push(u),
                Record::Entry(e) if entry_ids.insert(e.entry_id.as_str()) => entries.push(e),
                _ => {}
            }
        }
        let all_new = match &self.copier {
            Some(copier) => copy_new_batch(copier, &entries, &calls).await?,
            None => self.commit_new_batch(&entries, &calls).await?,
        };
        if all_new {
            // All new: each id's first record in the batch is the new one (the sets hold each
            // id once; `remove` answers true for its first record only).
            let (mut first_entry, mut first_call) = (entry_ids, call_ids);
            return Ok(newness(
                records,
                |id| first_entry.remove(id),
                |id| first_call.remove(id),
            ));
        }

        self.rechecked.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tollgate_ledger_batches_rechecked_total").increment(1);
        let sql = BatchSql::of(self.backend);
        let mut tx = self.writer.begin().await?;
        let mut inserted_entries = KeySet::default();
        if !entries.is_empty() {
            let rows: Vec<_> = entries
                .iter()
                .map(|e| {
                    (
                        &e.entry_id,
                        &e.account_id,
                        e.kind.as_str(),
                        e.amount.nanos(),
                        &e.key_id,
                        &e.reason,
                        e.created_at,
                    )
                })
                .collect();
            inserted_entries = keys_of(&mut *tx, sql.insert_ledger, &rows, "entry_id").await?;
        }
        let mut inserted_calls = KeySet::default();
        if !calls.is_empty() {
            let rows: Vec<_> = calls
                .iter()
                .map(|u| {
                    (
                        &u.request_id,
                        &u.account_id,
                        &u.key_id,
                        &u.model,
                        &u.provider,
                        u64_to_i64(u.prompt_tokens),
                        u64_to_i64(u.completion_tokens),
                        u64_to_i64(u.cached_tokens),
                        u.cost.nanos(),
                        u.uncollected.nanos(),
                        i64::from(u.status),
                        i64::from(u.stream),
                        u.usage_source.as_str(),
                        u64_to_i64(u.latency_ms),
                        u.created_at,
                    )
                })
                .collect();
            inserted_calls = keys_of(&mut *tx, sql.insert_usage, &rows, "request_id").await?;
        }

        // Balances and per-key spend move only by records that are new.
        let (account_delta, key_spent) = deltas(
            entries
                .iter()
                .copied()
                .filter(|e| inserted_entries.contains(&e.entry_id)),
            calls
                .iter()
                .copied()
                .filter(|u| inserted_calls.contains(&*u.request_id)),
        );
        if !account_delta.is_empty() {
            sqlx::query(sql.add_to_balances)
                .bind(json_rows(&account_delta)?)
                .execute(&mut *tx)
                .await?;
        }
        if !key_spent.is_empty() {
            sqlx::query(sql.add_to_key_spent)
                .bind(json_rows(&key_spent)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        // `remove`: only the first of duplicates in the batch reports itself as new.
        Ok(newness(
            records,
            |id| inserted_entries.remove(id),
            |id| inserted_calls.remove(id),
        ))
    }

    /// SQLite: commits `entries` and `calls` (each free of duplicates) if none of them is in
    /// the store yet, and says whether it did; otherwise rolls back and changes nothing.
    ///
    /// Inserts that return no rows, each row's fields bound as parameters: sqlx hands every
    /// returned row from SQLite's thread to ours one message at a time, and unpacking JSON
    /// rows in SQLite parsed each row once per column. The statements come in a few fixed
    /// sizes ([`SqliteValues`]), so each is prepared once per connection.
    async fn commit_new_batch(
        &self,
        entries: &[&LedgerEntry],
        calls: &[&UsageRecord],
    ) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let inserted = execute_values(&mut tx, &SQLITE_INSERT_LEDGER, entries, |q, e| {
            q.bind(e.entry_id.as_str())
                .bind(e.account_id.as_str())
                .bind(e.kind.as_str())
                .bind(e.amount.nanos())
                .bind(e.key_id.as_deref())
                .bind(e.reason.as_deref())
                .bind(e.created_at)
        })
        .await?;
        if inserted != entries.len() as u64 {
            tx.rollback().await?;
            return Ok(false);
        }
        let inserted = execute_values(&mut tx, &SQLITE_INSERT_USAGE, calls, |q, u| {
            q.bind(&*u.request_id)
                .bind(u.account_id.as_str())
                .bind(u.key_id.as_deref())
                .bind(u.model.as_str())
                .bind(u.provider.as_str())
                .bind(u64_to_i64(u.prompt_tokens))
                .bind(u64_to_i64(u.completion_tokens))
                .bind(u64_to_i64(u.cached_tokens))
                .bind(u.cost.nanos())
                .bind(u.uncollected.nanos())
                .bind(i64::from(u.status))
                .bind(i64::from(u.stream))
                .bind(u.usage_source.as_str())
                .bind(u64_to_i64(u.latency_ms))
                .bind(u.created_at)
        })
        .await?;
        if inserted != calls.len() as u64 {
            tx.rollback().await?;
            return Ok(false);
        }
        let (account_delta, key_spent) = deltas(entries.iter().copied(), calls.iter().copied());
        execute_values(&mut tx, &SQLITE_ADD_TO_BALANCES, &account_delta, bind_delta).await?;
        execute_values(&mut tx, &SQLITE_ADD_TO_KEY_SPENT, &key_spent, bind_delta).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// How many batches [`Store::commit_batch`] has had to commit record by record since
    /// this store was opened (each held a record that was stored already).
    pub fn rechecked_batches(&self) -> u64 {
        self.rechecked.load(Ordering::Relaxed)
    }

    pub async fn usage(
        &self,
        account_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT request_id, account_id, key_id, model, provider, prompt_tokens, \
             completion_tokens, cached_tokens, cost, uncollected, status, stream, usage_source, \
             latency_ms, created_at FROM usage_records WHERE account_id = $1 \
             ORDER BY created_at DESC, request_id DESC LIMIT $2",
        )
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRecord {
                    request_id: r.try_get::<String, _>("request_id")?.into(),
                    account_id: r.try_get("account_id")?,
                    key_id: r.try_get("key_id")?,
                    model: r.try_get("model")?,
                    provider: r.try_get("provider")?,
                    prompt_tokens: i64_to_u64(r.try_get("prompt_tokens")?),
                    completion_tokens: i64_to_u64(r.try_get("completion_tokens")?),
                    cached_tokens: i64_to_u64(r.try_get("cached_tokens")?),
                    cost: Amount(r.try_get("cost")?),
                    uncollected: Amount(r.try_get("uncollected")?),
                    status: u16::try_from(r.try_get::<i64, _>("status")?).unwrap_or(0),
                    stream: r.try_get::<i64, _>("stream")? != 0,
                    usage_source: UsageSource::parse(&r.try_get::<String, _>("usage_source")?),
                    latency_ms: i64_to_u64(r.try_get("latency_ms")?),
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

const KEY_COLUMNS: &str = "SELECT id, account_id, name, key_hash, prefix, spend_cap, spent, \
     expires_at, allowed_models, created_at, revoked_at FROM api_keys";

/// The page cache of the connection that commits the ledger's batches (SQLite's
/// `cache_size`, negative: in KiB; 16 MiB), where the other connections keep SQLite's 2 MiB.
/// With calls spread over many accounts, each batch updates a balance, a key's spend and a
/// leaf of the per-account index for every account in it, pages all over the file; a larger
/// cache keeps them between batches. Measured with 300 accounts: SQLite's CPU a record 13.1
/// µs with 2 MiB, 11.0–11.6 with 16 MiB or 32 MiB (BENCHMARKS item 50). The cache fills
/// with whatever the batches wrote last, so it is that much more memory in any case.
const SQLITE_WRITER_CACHE: &str = "PRAGMA cache_size = -16384";

/// Options for a pool of `connections` SQLite connections, each set up the same way, with
/// the `cache` pragma if one is given.
fn sqlite_pool(connections: u32, cache: Option<&'static str>) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(connections)
        // A round trip to the connection's worker thread per acquire, for a file that does not
        // go away.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                for pragma in [
                    // WAL with FULL sync: a committed batch survives kill -9 and power loss.
                    "PRAGMA journal_mode = WAL",
                    "PRAGMA synchronous = FULL",
                    "PRAGMA busy_timeout = 10000",
                    "PRAGMA foreign_keys = ON",
                    // Copy the WAL back into the database when it holds 10,000 pages (40 MiB)
                    // rather than SQLite's 1,000: the copy runs in the connection that
                    // commits, and the pages a batch rewrites (balances, the indexes' last
                    // leaves) are mostly the ones the batches before it rewrote, each copied
                    // once per checkpoint however often it changed.
                    "PRAGMA wal_autocheckpoint = 10000",
                ]
                .into_iter()
                .chain(cache)
                {
                    sqlx::query(pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
}

fn account_row(r: &AnyRow) -> Result<AccountRow, StoreError> {
    Ok(AccountRow {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        balance: Amount(r.try_get("balance")?),
        created_at: r.try_get("created_at")?,
    })
}

fn key_row(r: &AnyRow) -> Result<KeyRow, StoreError> {
    let models: Option<String> = r.try_get("allowed_models")?;
    Ok(KeyRow {
        id: r.try_get("id")?,
        account_id: r.try_get("account_id")?,
        name: r.try_get("name")?,
        key_hash: r.try_get("key_hash")?,
        prefix: r.try_get("prefix")?,
        spend_cap: r.try_get::<Option<i64>, _>("spend_cap")?.map(Amount),
        spent: Amount(r.try_get("spent")?),
        expires_at: r.try_get("expires_at")?,
        allowed_models: models.and_then(|m| serde_json::from_str(&m).ok()),
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

/// The account's balance and its keys' spend: one round trip (a row per key, or one with no
/// key); none when there is no account.
async fn snapshot_of<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
) -> Result<Option<AccountSnapshot>, StoreError> {
    let rows = sqlx::query(
        "SELECT a.balance, k.id AS key_id, k.spent FROM accounts a \
         LEFT JOIN api_keys k ON k.account_id = a.id WHERE a.id = $1",
    )
    .bind(id)
    .fetch_all(executor)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let balance = Amount(first.try_get::<i64, _>("balance")?);
    let mut key_spent = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(key_id) = row.try_get::<Option<String>, _>("key_id")? {
            key_spent.push((key_id, Amount(row.try_get::<i64, _>("spent")?)));
        }
    }
    Ok(Some(AccountSnapshot { balance, key_spent }))
}

/// Runs one of [`BatchSql`]'s statements on `rows`; returns the `column` of every row it
/// returned (for an insert, the keys of the rows it added).
async fn keys_of<'e, T: serde::Serialize>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
    sql: &'e str,
    rows: &[T],
    column: &str,
) -> Result<KeySet, StoreError> {
    let mut keys = KeySet::with_capacity_and_hasher(rows.len(), Default::default());
    for row in sqlx::query(sql)
        .bind(json_rows(rows)?)
        .fetch_all(executor)
        .await?
    {
        keys.insert(row.try_get::<String, _>(column)?);
    }
    Ok(keys)
}

/// A batch's rows as one JSON array of arrays, for [`BatchSql`]'s statements. Integers stay
/// exact (JSON integers within `i64`; both databases read them as 64-bit integers).
fn json_rows<T: serde::Serialize>(rows: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(rows).map_err(|e| StoreError::Database(sqlx::Error::Encode(Box::new(e))))
}

/// Per record, whether it was new: asked of its entry id or of its call's request id.
fn newness<'a>(
    records: &'a [Record],
    mut entry_is_new: impl FnMut(&'a str) -> bool,
    mut call_is_new: impl FnMut(&'a str) -> bool,
) -> Vec<bool> {
    records
        .iter()
        .map(|r| match r {
            Record::Call(u) => call_is_new(&u.request_id),
            Record::Entry(e) => entry_is_new(&e.entry_id),
        })
        .collect()
}

/// Binds an `(id, amount)` row of [`deltas`].
fn bind_delta<'q>(q: AnyQuery<'q>, (id, amount): &'q (&'q str, i64)) -> AnyQuery<'q> {
    q.bind(*id).bind(*amount)
}

/// What `entries` and `calls` move: per account, the entries' amounts less the calls' costs;
/// per key, what its calls spent (positive). Calls that cost nothing move nothing. Sorted by
/// id, so that concurrent writers would take row locks in one order.
fn deltas<'a>(
    entries: impl Iterator<Item = &'a LedgerEntry>,
    calls: impl Iterator<Item = &'a UsageRecord>,
) -> (Deltas<'a>, Deltas<'a>) {
    let mut account_delta: std::collections::BTreeMap<&str, i64> = Default::default();
    let mut key_spent: std::collections::BTreeMap<&str, i64> = Default::default();
    for e in entries {
        *account_delta.entry(e.account_id.as_str()).or_default() += e.amount.nanos();
    }
    for u in calls.filter(|u| u.cost != Amount::ZERO) {
        *account_delta.entry(u.account_id.as_str()).or_default() -= u.cost.nanos();
        if let Some(key) = u.key_id.as_deref() {
            *key_spent.entry(key).or_default() += u.cost.nanos();
        }
    }
    (
        account_delta.into_iter().collect(),
        key_spent.into_iter().collect(),
    )
}

/// Amounts by account or key id, in id order.
type Deltas<'a> = Vec<(&'a str, i64)>;

/// Ids of one batch. Entry ids are the gateway's request ids, or deposit and credit ids a
/// client cannot make collide at will; a batch holds at most `ledger.max_batch` of them.
type IdSet<'a> = std::collections::HashSet<&'a str, crate::IdHasher>;

/// The keys a statement of [`BatchSql`] returned.
pub type KeySet = std::collections::HashSet<String, crate::IdHasher>;

/// A SQLite statement that takes its rows as `(?, …)` groups, one per row, between `head` and
/// `tail`. A batch goes in chunks whose sizes are powers of two up to [`Self::MAX_ROWS`], so
/// there are only a few statement texts, each built once and prepared once per connection.
struct SqliteValues {
    head: &'static str,
    tail: &'static str,
    columns: usize,
    texts: std::sync::OnceLock<Vec<String>>,
}

impl SqliteValues {
    /// 128 rows of 15 fields: 1,920 parameters, far under SQLite's limit of 32,766.
    const MAX_ROWS: usize = 128;

    const fn new(head: &'static str, columns: usize, tail: &'static str) -> SqliteValues {
        SqliteValues {
            head,
            tail,
            columns,
            texts: std::sync::OnceLock::new(),
        }
    }

    /// The largest chunk of at most `rows` rows, and its statement.
    fn chunk(&self, rows: usize) -> (usize, &str) {
        let texts = self.texts.get_or_init(|| {
            let group = format!("({})", vec!["?"; self.columns].join(", "));
            std::iter::successors(Some(1usize), |n| Some(n * 2))
                .take_while(|n| *n <= Self::MAX_ROWS)
                .map(|n| {
                    format!(
                        "{} {}{}",
                        self.head,
                        vec![group.as_str(); n].join(", "),
                        self.tail
                    )
                })
                .collect()
        });
        let fit = rows.clamp(1, Self::MAX_ROWS).ilog2() as usize;
        (1 << fit, texts[fit].as_str())
    }
}

static SQLITE_INSERT_LEDGER: SqliteValues = SqliteValues::new(
    "INSERT INTO ledger (entry_id, account_id, kind, amount, key_id, reason, created_at) VALUES",
    7,
    " ON CONFLICT (entry_id) DO NOTHING",
);
static SQLITE_ADD_TO_BALANCES: SqliteValues = SqliteValues::new(
    "UPDATE accounts SET balance = balance + v.column2 FROM (VALUES",
    2,
    ") AS v WHERE accounts.id = v.column1",
);
static SQLITE_ADD_TO_KEY_SPENT: SqliteValues = SqliteValues::new(
    "UPDATE api_keys SET spent = spent + v.column2 FROM (VALUES",
    2,
    ") AS v WHERE api_keys.id = v.column1",
);
static SQLITE_INSERT_USAGE: SqliteValues = SqliteValues::new(
    "INSERT INTO usage_records (request_id, account_id, key_id, model, provider, \
    prompt_tokens, completion_tokens, cached_tokens, cost, uncollected, status, stream, \
    usage_source, latency_ms, created_at) VALUES",
    15,
    " ON CONFLICT (request_id) DO NOTHING",
);

/// Runs `statement` on `rows` in chunks, each row's fields bound by `bind`; returns how many
/// rows the statement changed.
async fn execute_values<'q, T>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    statement: &'static SqliteValues,
    rows: &'q [T],
    bind: impl Fn(AnyQuery<'q>, &'q T) -> AnyQuery<'q>,
) -> Result<u64, StoreError> {
    let mut changed = 0;
    let mut rest = rows;
    while !rest.is_empty() {
        let (n, sql) = statement.chunk(rest.len());
        let (chunk, tail) = rest.split_at(n);
        // Room for every parameter up front, rather than doubling as they are bound.
        let mut arguments = sqlx::any::AnyArguments::default();
        sqlx::Arguments::reserve(&mut arguments, n * statement.columns, 0);
        let query = chunk.iter().fold(sqlx::query_with(sql, arguments), &bind);
        changed += query.execute(&mut **tx).await?.rows_affected();
        rest = tail;
    }
    Ok(changed)
}

/// Postgres: commits `entries` and `calls` (each free of duplicates) if none of them is in the
/// store yet, and says whether it did; otherwise rolls back and changes nothing. The rows go
/// in by binary `COPY`, which has no `ON CONFLICT`: a record that is there already fails the
/// whole `COPY` with a unique violation, and that is the answer "not all new".
///
/// Measured on the bench machine, per call record, in Postgres's own CPU: about 8 µs this
/// way against 11–12 µs through `jsonb_array_elements` (BENCHMARKS item 45).
async fn copy_new_batch(
    copier: &PgPool,
    entries: &[&LedgerEntry],
    calls: &[&UsageRecord],
) -> Result<bool, StoreError> {
    let mut tx = copier.begin().await?;
    match copy_rows(&mut tx, entries, calls).await {
        Ok(()) => {}
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            tx.rollback().await?;
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    }
    let (account_delta, key_spent) = deltas(entries.iter().copied(), calls.iter().copied());
    if !account_delta.is_empty() {
        sqlx::query(POSTGRES_BATCH.add_to_balances)
            .bind(json_rows(&account_delta)?)
            .execute(&mut *tx)
            .await?;
    }
    if !key_spent.is_empty() {
        sqlx::query(POSTGRES_BATCH.add_to_key_spent)
            .bind(json_rows(&key_spent)?)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Postgres's SQLSTATE for a unique (or primary key) violation.
const UNIQUE_VIOLATION: &str = "23505";

const COPY_LEDGER: &str = "COPY ledger (entry_id, account_id, kind, amount, key_id, reason, \
    created_at) FROM STDIN (FORMAT binary)";

const COPY_USAGE: &str = "COPY usage_records (request_id, account_id, key_id, model, provider, \
    prompt_tokens, completion_tokens, cached_tokens, cost, uncollected, status, stream, \
    usage_source, latency_ms, created_at) FROM STDIN (FORMAT binary)";

async fn copy_rows(
    conn: &mut PgConnection,
    entries: &[&LedgerEntry],
    calls: &[&UsageRecord],
) -> Result<(), sqlx::Error> {
    if !entries.is_empty() {
        let mut rows = BinaryRows::new(7, entries.len());
        for e in entries {
            rows.row()
                .text(&e.entry_id)
                .text(&e.account_id)
                .text(e.kind.as_str())
                .int8(e.amount.nanos())
                .opt_text(e.key_id.as_deref())
                .opt_text(e.reason.as_deref())
                .int8(e.created_at);
        }
        copy_in(conn, COPY_LEDGER, rows, entries.len()).await?;
    }
    if !calls.is_empty() {
        let mut rows = BinaryRows::new(15, calls.len());
        for u in calls {
            rows.row()
                .text(&u.request_id)
                .text(&u.account_id)
                .opt_text(u.key_id.as_deref())
                .text(&u.model)
                .text(&u.provider)
                .int8(u64_to_i64(u.prompt_tokens))
                .int8(u64_to_i64(u.completion_tokens))
                .int8(u64_to_i64(u.cached_tokens))
                .int8(u.cost.nanos())
                .int8(u.uncollected.nanos())
                .int8(i64::from(u.status))
                .int8(i64::from(u.stream))
                .text(u.usage_source.as_str())
                .int8(u64_to_i64(u.latency_ms))
                .int8(u.created_at);
        }
        copy_in(conn, COPY_USAGE, rows, calls.len()).await?;
    }
    Ok(())
}

/// One `COPY … FROM STDIN`, which must take exactly `expected` rows.
async fn copy_in(
    conn: &mut PgConnection,
    statement: &str,
    rows: BinaryRows,
    expected: usize,
) -> Result<(), sqlx::Error> {
    let data = rows
        .finish()
        .ok_or_else(|| sqlx::Error::Protocol("a text field of 2 GiB or more".to_owned()))?;
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(data).await?;
    let copied = copy.finish().await?;
    if copied != expected as u64 {
        return Err(sqlx::Error::Protocol(format!(
            "COPY took {copied} rows of {expected}"
        )));
    }
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// The batch statements, each taking the rows as one JSON array of arrays ([`json_rows`]).
/// The two dialects differ only in how they unpack it. SQLite: `json_each` and `->>` (`WHERE
/// true` is SQLite's rule for `INSERT … SELECT … ON CONFLICT`; the bundled SQLite has no
/// `jsonb_each`). Postgres: `jsonb_array_elements`, `->>`
/// and a cast for each integer (with `json`, each `->>` would parse the row's text again).
struct BatchSql {
    insert_ledger: &'static str,
    add_to_balances: &'static str,
    add_to_key_spent: &'static str,
    insert_usage: &'static str,
    committed_calls: &'static str,
}

impl BatchSql {
    fn of(backend: Backend) -> &'static BatchSql {
        match backend {
            Backend::Sqlite => &SQLITE_BATCH,
            Backend::Postgres => &POSTGRES_BATCH,
        }
    }
}

static SQLITE_BATCH: BatchSql = BatchSql {
    insert_ledger:
        "INSERT INTO ledger (entry_id, account_id, kind, amount, key_id, reason, created_at) \
        SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, r.value ->> 3, r.value ->> 4, \
        r.value ->> 5, r.value ->> 6 FROM json_each(?) AS r WHERE true \
        ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id",
    add_to_balances: "UPDATE accounts SET balance = balance + (r.value ->> 1) \
        FROM json_each(?) AS r WHERE accounts.id = (r.value ->> 0)",
    add_to_key_spent: "UPDATE api_keys SET spent = spent + (r.value ->> 1) \
        FROM json_each(?) AS r WHERE api_keys.id = (r.value ->> 0)",
    insert_usage: "INSERT INTO usage_records (request_id, account_id, key_id, model, provider, \
        prompt_tokens, completion_tokens, cached_tokens, cost, uncollected, status, stream, \
        usage_source, latency_ms, created_at) \
        SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, r.value ->> 3, r.value ->> 4, \
        r.value ->> 5, r.value ->> 6, r.value ->> 7, r.value ->> 8, r.value ->> 9, \
        r.value ->> 10, r.value ->> 11, r.value ->> 12, r.value ->> 13, r.value ->> 14 \
        FROM json_each(?) AS r WHERE true \
        ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
    committed_calls: "SELECT request_id FROM usage_records \
        WHERE request_id IN (SELECT value FROM json_each(?))",
};

static POSTGRES_BATCH: BatchSql = BatchSql {
    insert_ledger:
        "INSERT INTO ledger (entry_id, account_id, kind, amount, key_id, reason, created_at) \
        SELECT r ->> 0, r ->> 1, r ->> 2, (r ->> 3)::bigint, r ->> 4, r ->> 5, (r ->> 6)::bigint \
        FROM jsonb_array_elements($1::jsonb) AS r \
        ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id",
    add_to_balances: "UPDATE accounts SET balance = balance + (r ->> 1)::bigint \
        FROM jsonb_array_elements($1::jsonb) AS r WHERE accounts.id = r ->> 0",
    add_to_key_spent: "UPDATE api_keys SET spent = spent + (r ->> 1)::bigint \
        FROM jsonb_array_elements($1::jsonb) AS r WHERE api_keys.id = r ->> 0",
    insert_usage: "INSERT INTO usage_records (request_id, account_id, key_id, model, provider, \
        prompt_tokens, completion_tokens, cached_tokens, cost, uncollected, status, stream, \
        usage_source, latency_ms, created_at) \
        SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, (r ->> 5)::bigint, (r ->> 6)::bigint, \
        (r ->> 7)::bigint, (r ->> 8)::bigint, (r ->> 9)::bigint, (r ->> 10)::bigint, \
        (r ->> 11)::bigint, r ->> 12, (r ->> 13)::bigint, (r ->> 14)::bigint \
        FROM jsonb_array_elements($1::jsonb) AS r \
        ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
    committed_calls: "SELECT request_id FROM usage_records WHERE request_id IN \
        (SELECT jsonb_array_elements_text($1::jsonb))",
};

/// Whether a SQLite URL names an in-memory database (`sqlite::memory:`, `?mode=memory`).
fn sqlite_in_memory(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    path == ":memory:" || query.split('&').any(|pair| pair == "mode=memory")
}

/// For `sqlite://path`, makes sure the file's directory exists and asks SQLite to create it.
fn sqlite_url_with_create(url: &str) -> std::io::Result<String> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or("");
    if !path.is_empty() && path != ":memory:" {
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
    }
    Ok(if url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    })
}

#[cfg(test)]
pub(crate) mod tests;
