//! Database outage: a private PostgreSQL cluster is stopped under traffic and started again.
//! In-flight calls keep their reservations and wait for their charge; once the ledger buffer is
//! full new calls get 503; on recovery everything buffered is committed, once.

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
            port: free_port(),
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
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
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
async fn postgres_outage_buffers_then_refuses_then_recovers() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let mock = Mock::start(MockOptions {
        latency: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let mut config =
        tollgate::config::Config::from_toml(&config_toml(&pg.url(), mock.addr)).unwrap();
    config.ledger.max_buffer = 8;
    let gateway = tollgate::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        config,
    )
    .await
    .unwrap();
    let base = format!("http://{}", gateway.addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let admin =
        |m: reqwest::Method, p: &str| http.request(m, format!("{base}{p}")).bearer_auth(ADMIN);

    let (account, key) = seed_account(&http, &base, "outage@example.com", "1").await;
    let chat = |stream: bool| {
        let (http, key, base) = (http.clone(), key.clone(), base.clone());
        tokio::spawn(async move {
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
            let text = resp.text().await.unwrap();
            (status, id, text)
        })
    };
    assert_eq!(
        chat(false).await.unwrap().0,
        200,
        "healthy before the outage"
    );

    pg.down();
    let mut calls = Vec::new();
    let mut refused = None;
    for i in 0..60 {
        calls.push(chat(i % 2 == 1));
        tokio::time::sleep(Duration::from_millis(25)).await;
        if let Some(done) = calls.iter().position(|c| c.is_finished()) {
            let (status, _, text) = calls.remove(done).await.unwrap();
            assert_eq!(
                status, 503,
                "nothing completes while the store is down: {text}"
            );
            refused = Some(text);
            break;
        }
    }
    let refused: Value =
        serde_json::from_str(&refused.expect("new calls are refused once the buffer is full"))
            .unwrap();
    assert_error_shape(&refused, "service_unavailable");
    assert!(
        calls.len() >= 8,
        "the buffer held the in-flight charges: {}",
        calls.len()
    );
    // The stuck ledger writer's mailbox shows the waiting records.
    let tree: Value = http
        .get(format!("{base}/admin/actors"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ledger_node = tree["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "ledger")
        .unwrap()
        .clone();
    assert!(
        ledger_node["mailbox_depth"].as_i64().unwrap() >= 1,
        "{ledger_node}"
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tollgate_actor_mailbox_depth{kind=\"ledger\"}"));
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready while the store is down");

    pg.up();
    let mut completed = Vec::new();
    for c in calls {
        let (status, id, text) = c.await.unwrap();
        match status {
            200 => {
                assert!(
                    text.ends_with("data: [DONE]\n\n") || text.contains("\"usage\""),
                    "{text}"
                );
                completed.push(id);
            }
            503 => {}
            s => panic!("unexpected {s}: {text}"),
        }
    }
    assert!(
        completed.len() >= 8,
        "buffered calls completed after recovery: {}",
        completed.len()
    );
    assert_eq!(chat(false).await.unwrap().0, 200, "healthy after recovery");

    let pool = sqlx::AnyPool::connect(&pg.url()).await.unwrap();
    let l = ledger(&pool, &account).await;
    assert_eq!(
        l.charge_count as usize,
        completed.len() + 2,
        "every completed call charged once"
    );
    assert_eq!(l.ledger_sum, l.balance);
    assert_eq!(l.charges, l.usage_cost_sum);
    let v: Value = admin(reqwest::Method::GET, &format!("/admin/accounts/{account}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["balance"], Amount(l.balance).to_string());
    assert_eq!(v["reserved"], "0", "no reservation leaked");
    pool.close().await;
    gateway.shutdown().await;
}
