//! Database outage: a private PostgreSQL cluster is stopped under traffic and started again.
//! Charges keep going to the node's journal until the backlog is full, then new calls get 503;
//! a restart in between loses nothing; on recovery everything journaled is committed, once.

use crate::common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tollgate::mock::MockOptions;
use tollgate_actors::Amount;

/// A PostgreSQL cluster of this test's own, on its own port, that it may stop and start.
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn as_postgres_user(program: &Path, args: &[&str]) -> std::process::Output {
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut cmd = if is_root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    };
    cmd.args(args).output().expect("run a PostgreSQL program")
}

impl PrivatePostgres {
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists());
        let Some(bin) = bin else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("PostgreSQL server binaries (initdb, pg_ctl) are required under CI=true");
            }
            eprintln!("SKIPPED: no PostgreSQL server binaries under /usr/lib/postgresql; this test needs them");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let out = as_postgres_user(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PrivatePostgres {
            bin,
            data,
            // Stopped and started again on this port while other tests open connections.
            port: stable_port(),
            _dir: dir,
        };
        pg.up();
        Some(pg)
    }

    fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.data.display()
        );
        let log = self.data.join("server.log");
        let out = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\nserver.log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops it as a crash would: no checkpoint, connections cut.
    fn down(&self) {
        let out = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_journals_then_refuses_then_recovers() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let mock = Mock::start(MockOptions {
        latency: Duration::from_millis(5),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        tollgate::config::Config::from_toml(&config_toml(&pg.url(), dir.path(), mock.addr))
            .unwrap();
    config.ledger.max_buffer = 8;
    config.ledger.drain_timeout_ms = 300;
    let listener = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let gateway = tollgate::start(listener().await, config.clone())
        .await
        .unwrap();
    let base = format!("http://{}", gateway.addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    let (account, key) = seed_account(&http, &base, "outage@example.com", "1").await;
    let chat = |base: &str, stream: bool| {
        let (http, key, base) = (http.clone(), key.clone(), base.to_owned());
        async move {
            let body = json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 4, "messages": [{"role": "user", "content": "outage"}]});
            let resp = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let text = resp.text().await.unwrap();
            (status, id, text, retry)
        }
    };
    assert_eq!(chat(&base, false).await.0, 200, "healthy before the outage");
    gateway.app().system.billing.flush().await.unwrap();

    // While the store is down, charges are durable in the journal: calls complete until the
    // backlog (max_buffer = 8 records) is full; after that new calls are refused.
    pg.down();
    let mut completed = Vec::new();
    let mut refused = None;
    for i in 0..40 {
        let (status, id, text, retry) = chat(&base, i % 2 == 1).await;
        match status {
            200 => {
                assert!(
                    text.ends_with("data: [DONE]\n\n") || text.contains("\"usage\""),
                    "{text}"
                );
                completed.push(id);
            }
            503 => {
                assert_eq!(retry.as_deref(), Some("1"), "a refusal says when to retry");
                refused = Some(text);
                break;
            }
            s => panic!("unexpected {s}: {text}"),
        }
    }
    assert_eq!(completed.len(), 8, "the journal took max_buffer charges");
    let refused: Value =
        serde_json::from_str(&refused.expect("refused once the backlog is full")).unwrap();
    assert_error_shape(&refused, "service_unavailable");
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The recorder is one per process and other tests' gateways share it, so the series is
    // checked here and the figure on this gateway.
    assert!(
        metrics.contains("tollgate_ledger_queue_depth "),
        "the backlog is visible to operators"
    );
    assert_eq!(gateway.app().system.billing.backlog(), 8);
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready while the store is down");

    // Stopping with the store still down leaves the charges in the journal...
    gateway.shutdown().await;
    let segments = std::fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".log")
        })
        .count();
    assert!(segments >= 1, "the unshipped charges are still journaled");

    // ...and the next start ships them, once.
    pg.up();
    let gateway = tollgate::start(listener().await, config).await.unwrap();
    let base = format!("http://{}", gateway.addr);
    // The replayed backlog counts against max_buffer until it is shipped.
    gateway.app().system.billing.flush().await.unwrap();
    assert_eq!(chat(&base, false).await.0, 200, "healthy after recovery");
    gateway.app().system.billing.flush().await.unwrap();

    let pool = sqlx::AnyPool::connect(&pg.url()).await.unwrap();
    let charged: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM usage_records WHERE cost > 0")
            .fetch_all(&pool)
            .await
            .unwrap();
    for id in &completed {
        assert!(
            charged.contains(id),
            "{id} answered during the outage has its charge"
        );
    }
    let l = ledger(&pool, &account).await;
    assert_eq!(
        l.charge_count as usize,
        completed.len() + 2,
        "every completed call charged once"
    );
    assert_eq!(l.ledger_sum, l.balance);
    let v: Value = http
        .get(format!("{base}/admin/accounts/{account}"))
        .bearer_auth(ADMIN)
        .send_json()
        .await;
    assert_eq!(v["balance"], Amount(l.balance).to_string());
    assert_eq!(v["reserved"], "0", "no reservation leaked");
    pool.close().await;
    gateway.shutdown().await;
}
