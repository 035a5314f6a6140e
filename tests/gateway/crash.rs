//! kill -9 under load, then restart: every request whose response completed has its usage
//! record, charged once, and balance = credits - charges.

use crate::both_stores;
use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate::mock::MockOptions;

async fn kill9_under_load_loses_no_charge(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let mock = Mock::start(MockOptions {
        chunks: 8,
        chunk_interval: Duration::from_millis(3),
        ..Default::default()
    })
    .await;
    let config = db.dir.path().join("tollgate.toml");
    std::fs::write(&config, config_toml(&db.url, db.dir.path(), mock.addr)).unwrap();
    let log = db.dir.path().join("tollgate.log");
    let port = stable_port(); // the gateway is restarted on it
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let server = Server::spawn(&config, port, &log, "info").await;
    let (account, key) = seed_account(&http, &server.base, "crash@example.com", "100").await;

    let completed: Arc<Mutex<HashSet<String>>> = Default::default();
    let mut server = Some(server);
    for round in 0..3 {
        let base = format!("http://127.0.0.1:{port}");
        let workers: Vec<_> = (0..24)
            .map(|w| {
                let (http, key, base, completed) = (http.clone(), key.clone(), base.clone(), completed.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let stream = (w + i) % 2 == 0;
                        let body = json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 8,
                            "messages": [{"role": "user", "content": format!("round {round} worker {w} request {i}")}]});
                        let Ok(resp) = http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key).json(&body).send().await else {
                            return;
                        };
                        let id = resp.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned());
                        let ok = resp.status() == 200;
                        let Ok(text) = resp.text().await else { return };
                        if ok && (!stream || text.ends_with("data: [DONE]\n\n")) {
                            completed.lock().unwrap().insert(id.unwrap());
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.take().unwrap().kill9().await;
        for w in workers {
            let _ = w.await;
        }
        server = Some(restart_after_kill(&config, port, &log, &http, &account).await);
        let pool = db.pool().await;
        let so_far = completed.lock().unwrap().clone();
        check_invariants(&pool, &account, &so_far).await;
        pool.close().await;
    }
    let server = server.unwrap();
    let completed = completed.lock().unwrap().clone();
    assert!(
        completed.len() > 50,
        "load was real: {} completed",
        completed.len()
    );

    let pool = db.pool().await;
    let l = check_invariants(&pool, &account, &completed).await;
    // The restarted gateway's view is the store's.
    let v: Value = server
        .admin(&http, Method::GET, &format!("/admin/accounts/{account}"))
        .send_json()
        .await;
    assert_eq!(v["balance"], tollgate_actors::Amount(l.balance).to_string());
    assert!(server.terminate().await.success(), "SIGTERM exits 0");
    pool.close().await;
    db.drop_db().await;
}
both_stores!(kill9_under_load_loses_no_charge);

/// Starts the gateway again after a `kill -9`, reads the account through it, and waits until
/// the journal the killed process left is in the store.
async fn restart_after_kill(
    config: &std::path::Path,
    port: u16,
    log: &std::path::Path,
    http: &reqwest::Client,
    account: &str,
) -> Server {
    let server = Server::spawn(config, port, log, "info").await;
    let resp = server
        .admin(http, Method::GET, &format!("/admin/accounts/{account}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_for_the_replay(&server, http).await;
    server
}

/// Until the gateway's backlog of records not yet in the store is empty.
async fn wait_for_the_replay(server: &Server, http: &reqwest::Client) {
    for _ in 0..400 {
        let text = server
            .admin(http, Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&text, "tollgate_ledger_queue_depth") == Some(0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the replayed journal did not reach the store");
}

/// After a restart: every completed response has its usage record, charged, and balance =
/// credits - charges.
async fn check_invariants(
    pool: &sqlx::AnyPool,
    account: &str,
    completed: &HashSet<String>,
) -> Ledger {
    let charged: HashSet<String> =
        sqlx::query("SELECT request_id FROM usage_records WHERE status = 200 AND cost > 0")
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
    let missing: Vec<_> = completed
        .iter()
        .filter(|id| !charged.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} completed responses without a durable charge: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let l = ledger(pool, account).await;
    assert_eq!(l.credits, 100_000_000_000);
    assert_eq!(l.ledger_sum, l.balance, "balance = credits - charges");
    // One row a call: the ledger holds the credit and no charge.
    let entries: i64 = sqlx::query("SELECT COUNT(*) FROM ledger")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(entries, 1);

    l
}

/// Charges answered from the journal alone: nothing is shipped to the store before the
/// `kill -9`, so every charge the restarted gateway has must come from the journal it left.
async fn kill9_before_shipping_replays_the_journal(backend: Backend) {
    kill9_before_shipping(backend, "write").await;
}
both_stores!(kill9_before_shipping_replays_the_journal);

/// The same with `journal_sync = "fsync"`, where the ledger writer journals each charge and
/// syncs it before answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_before_shipping_replays_the_synced_journal() {
    kill9_before_shipping(Backend::Sqlite, "fsync").await;
}

/// After a `kill -9` that left an account's charges in the journal, the account is served
/// without waiting for the replay to reach the store: its balance counts them already. Here
/// the store's write lock is held from before the restart, so nothing of the replay ships
/// until the end; before, the account's first call waited for it (30 s, then 503).
async fn an_account_is_served_before_its_replayed_charges_reach_the_store(backend: Backend) {
    let Some(JournalOnly {
        db,
        _mock,
        config,
        normal,
    }) = JournalOnly::start(backend, "").await
    else {
        return;
    };
    let log = db.dir.path().join("tollgate.log");
    let port = stable_port();
    let http = reqwest::Client::new();
    let server = Server::spawn(&config, port, &log, "info").await;
    let (account, key) = seed_account(&http, &server.base, "replay@example.com", "100").await;
    let call = async |base: &str| {
        let body = json!({"model": "gpt-4o-mini", "max_tokens": 8,
            "messages": [{"role": "user", "content": "before the replay"}]});
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
    };
    let balance = async |server: &Server| -> String {
        let v: Value = server
            .admin(&http, Method::GET, &format!("/admin/accounts/{account}"))
            .send_json()
            .await;
        v["balance"].as_str().unwrap().to_owned()
    };
    for _ in 0..5 {
        assert_eq!(call(&server.base).await, 200);
    }
    let journaled = balance(&server).await;
    assert_ne!(journaled, "100.000000000");
    server.kill9().await;

    // Shipments block on this lock; reading an account does not.
    let pool = db.pool().await;
    let mut lock = pool.begin().await.unwrap();
    let take_lock = match backend {
        Backend::Postgres => "LOCK TABLE usage_records IN EXCLUSIVE MODE",
        Backend::Sqlite => "DELETE FROM usage_records WHERE request_id = ''",
    };
    sqlx::query(take_lock).execute(&mut *lock).await.unwrap();

    std::fs::write(&config, &normal).unwrap();
    let server = Server::spawn(&config, port, &log, "info").await;
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        let before = balance(&server).await;
        let status = call(&server.base).await;
        (before, status, balance(&server).await)
    })
    .await
    .expect("served while the replay cannot ship");
    assert_eq!(served.0, journaled, "the replayed charges are counted");
    assert_eq!(served.1, 200);
    let in_store: i64 = sqlx::query("SELECT COUNT(*) FROM usage_records")
        .fetch_one(&mut *lock)
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_store, 0, "nothing of the replay has shipped");
    lock.rollback().await.unwrap();

    wait_for_the_replay(&server, &http).await;
    let l = ledger(&pool, &account).await;
    assert_eq!(l.charge_count, 6);
    assert_eq!(l.ledger_sum, l.balance);
    assert_eq!(
        tollgate_actors::Amount(l.balance).to_string(),
        served.2,
        "the store comes to what the gateway counted"
    );
    pool.close().await;
    assert!(server.terminate().await.success());
    db.drop_db().await;
}
both_stores!(an_account_is_served_before_its_replayed_charges_reach_the_store);

/// A test database, a mock upstream, and a gateway config with an hour between shipments
/// (and `ledger` settings added): the store sees no call until a restart on `normal`, the
/// same config without them.
struct JournalOnly {
    db: TestDb,
    _mock: Mock,
    config: std::path::PathBuf,
    normal: String,
}

impl JournalOnly {
    async fn start(backend: Backend, ledger: &str) -> Option<JournalOnly> {
        let db = TestDb::new(backend).await?;
        let mock = Mock::start(MockOptions::default()).await;
        let normal = config_toml(&db.url, db.dir.path(), mock.addr);
        let config = db.dir.path().join("tollgate.toml");
        let unshipping = format!("[ledger]\nship_interval_ms = 3600000\n{ledger}");
        std::fs::write(&config, normal.replacen("[ledger]\n", &unshipping, 1)).unwrap();
        Some(JournalOnly {
            db,
            _mock: mock,
            config,
            normal,
        })
    }
}

async fn kill9_before_shipping(backend: Backend, sync: &str) {
    let Some(JournalOnly {
        db,
        _mock,
        config,
        normal,
    }) = JournalOnly::start(backend, &format!("journal_sync = \"{sync}\"\n")).await
    else {
        return;
    };
    let log = db.dir.path().join("tollgate.log");
    let port = stable_port(); // the gateway is restarted on it
    let http = reqwest::Client::new();
    let server = Server::spawn(&config, port, &log, "info").await;
    let (account, key) = seed_account(&http, &server.base, "journal@example.com", "100").await;

    let mut completed = HashSet::new();
    for i in 0..20 {
        let stream = i % 2 == 0;
        let body = json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 8,
            "messages": [{"role": "user", "content": format!("request {i}")}]});
        let resp = http
            .post(format!("{}/v1/chat/completions", server.base))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let text = resp.text().await.unwrap();
        assert!(!stream || text.ends_with("data: [DONE]\n\n"), "{text}");
        completed.insert(id);
    }
    let pool = db.pool().await;
    let l = ledger(&pool, &account).await;
    assert_eq!(l.charge_count, 0, "nothing was shipped before the kill");
    pool.close().await;
    server.kill9().await;

    std::fs::write(&config, normal).unwrap();
    let server = restart_after_kill(&config, port, &log, &http, &account).await;
    let pool = db.pool().await;
    let l = check_invariants(&pool, &account, &completed).await;
    assert_eq!(l.charge_count, 20);
    pool.close().await;
    assert!(server.terminate().await.success());
    db.drop_db().await;
}
