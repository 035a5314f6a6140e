//! Test harness: a real database per test (SQLite file or a fresh Postgres database), the mock
//! upstream on a loopback port, and the gateway started with `tollgate::start` or as the real
//! binary. Everything talks real HTTP.

use serde_json::{json, Value};
use sqlx::Row;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate::config::Config;
use tollgate::mock::MockOptions;
use tollgate::Gateway;
use tollgate_actors::Amount;

pub const ADMIN: &str = "test-admin-token";
pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per store: `both_stores!(name)` expects `async fn name(Backend)`.
#[macro_export]
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    };
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    _backend: Backend,
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestDb {
    /// `None` (with a line saying why) when Postgres is not reachable outside CI; under
    /// `CI=true` a missing Postgres fails the test instead.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => Some(TestDb {
                url: format!("sqlite://{}/tollgate.db", dir.path().display()),
                _backend: backend,
                dir,
                pg_name: None,
            }),
            Backend::Postgres => {
                sqlx::any::install_default_drivers();
                let admin = match sqlx::AnyPool::connect(PG_ADMIN_URL).await {
                    Ok(p) => p,
                    Err(e) => {
                        if std::env::var("CI").is_ok_and(|v| v == "true") {
                            panic!("PostgreSQL is required under CI=true but {PG_ADMIN_URL} is unreachable: {e}");
                        }
                        eprintln!("SKIPPED: PostgreSQL not reachable at {PG_ADMIN_URL} ({e}); this test needs it");
                        return None;
                    }
                };
                let name = format!("tollgate_test_{}", uuid::Uuid::now_v7().simple());
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .expect("create database");
                admin.close().await;
                Some(TestDb {
                    url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                    _backend: backend,
                    dir,
                    pg_name: Some(name),
                })
            }
        }
    }

    pub async fn pool(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::pool::PoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .expect("connect test db")
    }

    pub async fn drop_db(self) {
        if let Some(name) = &self.pg_name {
            if let Ok(admin) = sqlx::AnyPool::connect(PG_ADMIN_URL).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await;
                admin.close().await;
            }
        }
    }
}

/// An upstream's streamed answer for a route of a test's own ([`Mock::serve`]): `events` as
/// the body of a `text/event-stream` response.
pub fn sse_reply<S, B>(events: S) -> warp::reply::Response
where
    S: futures::Stream<Item = Result<B, std::io::Error>> + Send + Sync + 'static,
    B: Into<bytes::Bytes>,
{
    let mut resp = warp::reply::Reply::into_response(warp::reply::stream(events));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    resp
}

/// The mock upstream on a loopback port; stops when dropped.
pub struct Mock {
    pub addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Mock {
    pub async fn start(options: MockOptions) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tollgate::mock::serve(listener, options, async move {
            let _ = rx.await;
        }));
        Mock { addr, _stop: tx }
    }

    /// An upstream of the test's own, answering with `route`.
    pub async fn serve<F>(route: F) -> Mock
    where
        F: warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let limits = tollgate::config::Limits::default();
            tollgate::server::serve(listener, route, &limits, async move {
                let _ = rx.await;
            })
            .await
        });
        Mock { addr, _stop: tx }
    }
}

/// The config every test starts from: mock upstream, three priced models, the given store.
/// A gateway's config for the tests; its charge journal lives in `dir`, one per test.
pub fn config_toml(
    database_url: &str,
    dir: &std::path::Path,
    mock: std::net::SocketAddr,
) -> String {
    let journal = dir.join("journal");
    let journal = journal.display();
    format!(
        r#"
listen = "127.0.0.1:0"
database_url = "{database_url}"
admin_token = "{ADMIN}"

[ledger]
journal_dir = "{journal}"

[[providers]]
name = "mock"
kind = "openai-compatible"
base_url = "http://{mock}/v1"
proxy = "direct"
request_timeout_ms = 3000
stream_idle_timeout_ms = 3000

[[models]]
id = "gpt-4o-mini"
provider = "mock"
upstream_model = "gpt-4o-mini"
input_per_mtok = "0.15"
output_per_mtok = "0.60"
max_output_tokens = 4096

[[models]]
id = "pricey"
provider = "mock"
upstream_model = "pricey"
input_per_mtok = "3"
output_per_mtok = "15.000000001"
max_output_tokens = 1000

[[models]]
id = "broken"
provider = "mock"
upstream_model = "mock-error"
input_per_mtok = "1"
output_per_mtok = "1"

[[models]]
id = "hangs"
provider = "mock"
upstream_model = "mock-hang"
input_per_mtok = "1"
output_per_mtok = "1"

[[models]]
id = "refuses"
provider = "mock"
upstream_model = "mock-bad-request"
input_per_mtok = "1"
output_per_mtok = "1"

[[models]]
id = "throttled"
provider = "mock"
upstream_model = "mock-rate-limited"
input_per_mtok = "1"
output_per_mtok = "1"

[[models]]
id = "breaks"
provider = "mock"
upstream_model = "mock-break"
input_per_mtok = "1"
output_per_mtok = "1"
max_output_tokens = 100

[[models]]
id = "no-usage"
provider = "mock"
upstream_model = "mock-no-usage"
input_per_mtok = "1"
output_per_mtok = "2"
"#
    )
}

/// A gateway in this process, on its own database and mock upstream.
pub struct Harness {
    pub gateway: Gateway,
    pub base: String,
    pub http: reqwest::Client,
    pub db: TestDb,
    _mock: Mock,
}

impl Harness {
    pub async fn start(backend: Backend) -> Option<Harness> {
        Self::start_with(backend, MockOptions::default(), |_| {}).await
    }

    pub async fn start_with(
        backend: Backend,
        mock: MockOptions,
        tweak: impl FnOnce(&mut Config),
    ) -> Option<Harness> {
        let db = TestDb::new(backend).await?;
        let mock = Mock::start(mock).await;
        let mut config =
            Config::from_toml(&config_toml(&db.url, db.dir.path(), mock.addr)).expect("config");
        tweak(&mut config);
        let listener = tollgate::server::bind("127.0.0.1:0", config.limits.listen_backlog)
            .await
            .expect("bind");
        let gateway = tollgate::start(listener, config)
            .await
            .expect("start gateway");
        let base = format!("http://{}", gateway.addr);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Some(Harness {
            gateway,
            base,
            http,
            db,
            _mock: mock,
        })
    }

    /// Waits until every charge the gateway has answered is in the store.
    pub async fn flush(&self) {
        self.gateway
            .app()
            .system
            .billing
            .flush()
            .await
            .expect("ledger flush");
    }

    /// The test database, once every charge the gateway has answered is in it.
    pub async fn pool(&self) -> sqlx::AnyPool {
        self.flush().await;
        self.db.pool().await
    }

    pub async fn stop(self) {
        self.gateway.shutdown().await;
        self.db.drop_db().await;
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN)
    }

    /// What the store says about an account once every answered charge is in it.
    pub async fn ledger(&self, account: &str) -> Ledger {
        let pool = self.pool().await;
        let l = ledger(&pool, account).await;
        pool.close().await;
        l
    }

    /// The account directory's node of `/admin/actors{query}`.
    pub async fn directory(&self, query: &str) -> Value {
        let tree: Value = self
            .admin(reqwest::Method::GET, &format!("/admin/actors{query}"))
            .send_json()
            .await;
        node(&tree, "accounts")
            .unwrap_or_else(|| panic!("no directory in {tree}"))
            .clone()
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics_text(&self) -> String {
        self.admin(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn account(&self, email: &str) -> String {
        let r = self
            .admin(reqwest::Method::POST, "/admin/accounts")
            .json(&json!({"email": email}))
            .send()
            .await
            .expect("create account");
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.expect("json")["id"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    pub async fn credit(&self, account: &str, amount: &str) -> Value {
        let r = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/accounts/{account}/credits"),
            )
            .json(&json!({"amount": amount, "reason": "test funding"}))
            .send()
            .await
            .expect("credit");
        assert_eq!(r.status(), 200, "credit {amount}");
        r.json().await.expect("json")
    }

    pub async fn key(&self, account: &str, extra: Value) -> (String, String) {
        let mut body = json!({"name": "test"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let r = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/accounts/{account}/keys"),
            )
            .json(&body)
            .send()
            .await
            .expect("create key");
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.expect("json");
        (
            v["id"].as_str().expect("id").to_owned(),
            v["key"].as_str().expect("key").to_owned(),
        )
    }

    /// A funded account and a key for it.
    pub async fn funded(&self, amount: &str) -> (String, String) {
        let account = self
            .account(&format!("{}@example.com", uuid::Uuid::now_v7().simple()))
            .await;
        self.credit(&account, amount).await;
        let (_, key) = self.key(&account, json!({})).await;
        (account, key)
    }

    pub async fn chat(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("chat request")
    }

    /// The account as the admin API shows it (email, balance, reserved).
    pub async fn account_view(&self, account: &str) -> Value {
        self.admin(reqwest::Method::GET, &format!("/admin/accounts/{account}"))
            .send()
            .await
            .expect("get account")
            .json()
            .await
            .expect("json")
    }

    pub async fn balance(&self, account: &str) -> Amount {
        self.account_view(account).await["balance"]
            .as_str()
            .expect("balance")
            .parse()
            .expect("amount")
    }

    pub async fn usage(&self, account: &str) -> Vec<Value> {
        let v: Value = self
            .admin(
                reqwest::Method::GET,
                &format!("/admin/accounts/{account}/usage?limit=1000"),
            )
            .send()
            .await
            .expect("usage")
            .json()
            .await
            .expect("json");
        v["data"].as_array().cloned().unwrap_or_default()
    }

    /// The statuses of the account's usage records, sorted, and what they cost together.
    pub async fn recorded(&self, account: &str) -> (Vec<u64>, Amount) {
        let usage = self.usage(account).await;
        let mut statuses: Vec<u64> = usage
            .iter()
            .map(|u| u["status"].as_u64().expect("status"))
            .collect();
        statuses.sort();
        let cost = usage.iter().map(|u| cost_of(u).nanos()).sum();
        (statuses, Amount(cost))
    }

    /// The account's usage records once the first has landed (a call settling in the
    /// background, its client gone); empty if none has within 5 s.
    pub async fn usage_once_settled(&self, account: &str) -> Vec<Value> {
        self.usage_once_n_settled(account, 1).await
    }

    /// The account's usage records once `n` have landed; what there is after 5 s otherwise.
    pub async fn usage_once_n_settled(&self, account: &str, n: usize) -> Vec<Value> {
        let mut usage = Vec::new();
        for _ in 0..100 {
            usage = self.usage(account).await;
            if usage.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        usage
    }

    /// An account funded with 1 USDT was charged `cost`, once: in its balance, and in a
    /// ledger that adds up to it.
    pub async fn assert_charged_once_from_one_usdt(&self, account: &str, cost: Amount) {
        assert_eq!(
            self.balance(account).await,
            Amount(1_000_000_000 - cost.nanos())
        );
        let l = self.ledger(account).await;
        assert_eq!(l.ledger_sum, l.balance);
        assert_eq!(l.charges, cost.nanos());
    }
}

/// Sends a request and reads its body as JSON (whatever the status).
pub trait SendJson {
    async fn send_json(self) -> Value;
}

impl SendJson for reqwest::RequestBuilder {
    async fn send_json(self) -> Value {
        self.send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("a JSON body")
    }
}

/// What the store says about an account, straight from SQL.
#[derive(Debug, PartialEq, Eq)]
pub struct Ledger {
    /// `accounts.balance`, which every commit moves.
    pub balance: i64,
    /// What the rows add up to: credits less charges. Equal to `balance` in a sound store.
    pub ledger_sum: i64,
    /// The calls' costs (usage records).
    pub charges: i64,
    /// The ledger's entries: credits and adjustments.
    pub credits: i64,
    /// Calls that cost something.
    pub charge_count: i64,
    /// Calls recorded, charged or not.
    pub usage_count: i64,
}

pub async fn ledger(pool: &sqlx::AnyPool, account: &str) -> Ledger {
    let one = |sql: &'static str| {
        let pool = pool.clone();
        let account = account.to_owned();
        async move {
            sqlx::query(sql)
                .bind(account)
                .fetch_one(&pool)
                .await
                .expect(sql)
                .try_get::<i64, _>(0)
                .expect("i64")
        }
    };
    let charges = one(
        "SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) FROM usage_records WHERE account_id = $1",
    )
    .await;
    let credits =
        one("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger WHERE account_id = $1")
            .await;
    Ledger {
        balance: one("SELECT balance FROM accounts WHERE id = $1").await,
        ledger_sum: credits - charges,
        charges,
        credits,
        charge_count: one("SELECT COUNT(*) FROM usage_records WHERE account_id = $1 AND cost > 0")
            .await,
        usage_count: one("SELECT COUNT(*) FROM usage_records WHERE account_id = $1").await,
    }
}

/// The mock's prompt-token formula: Σ(ceil(len/4) + 4) + 3.
pub fn mock_prompt_tokens(contents: &[&str]) -> u64 {
    contents
        .iter()
        .map(|c| (c.len() as u64).div_ceil(4) + 4)
        .sum::<u64>()
        + 3
}

/// Cost at per-Mtok prices given as nano-USDT per Mtok, rounded up: the rule written out again.
pub fn expected_cost(
    input_nanos_per_mtok: u128,
    output_nanos_per_mtok: u128,
    prompt: u64,
    completion: u64,
) -> Amount {
    let micro = prompt as u128 * input_nanos_per_mtok + completion as u128 * output_nanos_per_mtok;
    Amount(micro.div_ceil(1_000_000) as i64)
}

/// A usage record's cost (from `/admin/accounts/{id}/usage`).
pub fn cost_of(record: &Value) -> Amount {
    record["cost"]
        .as_str()
        .expect("cost is text")
        .parse()
        .expect("cost is an amount")
}

/// What a non-streamed answer says it cost (`x-tollgate-cost`).
pub fn charged(resp: &reqwest::Response) -> Amount {
    resp.headers()["x-tollgate-cost"]
        .to_str()
        .expect("x-tollgate-cost is text")
        .parse()
        .expect("x-tollgate-cost is an amount")
}

/// Reads an SSE body to the end; returns the `data:` payloads.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("sse body");
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

pub fn assert_error_shape(v: &Value, code: &str) {
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message in {v}"
    );
    assert!(e["type"].is_string(), "type in {v}");
    assert_eq!(e["code"], code, "code in {v}");
}

/// The real `tollgate` binary, serving on a port of its own.
pub struct Server {
    child: tokio::process::Child,
    pub base: String,
}

/// A free port below the kernel's ephemeral range, for a server a test stops and starts again
/// on the same port: a port from [`free_port`] is ephemeral, and while its server is down any
/// outgoing connection of the tests running meanwhile may be given it.
pub fn stable_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let span = low.saturating_sub(10_000).max(1);
    let start = u16::try_from(std::process::id() % u32::from(span)).unwrap_or(0);
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = low - 1 - (start.wrapping_add(offset) % span);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range ({low})")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An `env` entry for [`Server::spawn_with_env`]: start the gateway with this soft limit on
/// open descriptors.
pub const SOFT_NOFILE: &str = "TEST_SOFT_NOFILE";
/// As [`SOFT_NOFILE`], for both the soft and the hard limit.
pub const NOFILE: &str = "TEST_NOFILE";

/// Starts `tollgate ARGS…` with its stdout and stderr appended to `log`, `RUST_LOG` set to
/// `rust_log`, and these environment variables. With [`SOFT_NOFILE`] or [`NOFILE`] among
/// `env`, it starts from a shell that first lowers its descriptor limit (the soft one, or both)
/// to that.
pub fn spawn_tollgate(
    args: &[std::ffi::OsString],
    log: &std::path::Path,
    rust_log: &str,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let err = out.try_clone().unwrap();
    let limit = env.iter().find_map(|(k, v)| match *k {
        SOFT_NOFILE => Some(format!("ulimit -Sn {v}")),
        NOFILE => Some(format!("ulimit -n {v}")),
        _ => None,
    });
    let mut command = match limit {
        Some(ulimit) => {
            let mut c = tokio::process::Command::new("sh");
            c.args(["-c", &format!("{ulimit} && exec \"$0\" \"$@\"")])
                .arg(env!("CARGO_BIN_EXE_tollgate"));
            c
        }
        None => tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate")),
    };
    command
        .args(args)
        .env("RUST_LOG", rust_log)
        .env_remove("DATABASE_URL")
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tollgate")
}

impl Server {
    /// Starts `tollgate serve` and waits until it answers `/healthz`. Its stdout and stderr
    /// are appended to `log`.
    pub async fn spawn(
        config: &std::path::Path,
        port: u16,
        log: &std::path::Path,
        rust_log: &str,
    ) -> Server {
        Self::spawn_with_env(config, port, log, rust_log, &[]).await
    }

    /// As [`Server::spawn`], with these environment variables set for the gateway.
    pub async fn spawn_with_env(
        config: &std::path::Path,
        port: u16,
        log: &std::path::Path,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let mut args: Vec<std::ffi::OsString> = vec!["serve".into(), "--config".into()];
        args.push(config.into());
        args.extend(["--listen".into(), format!("127.0.0.1:{port}").into()]);
        let child = spawn_tollgate(&args, log, rust_log, env);
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..400 {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
                if r.status() == 200 {
                    return Server { child, base };
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "tollgate did not become healthy; log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway is running")
    }

    /// kill -9.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and wait for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exit in time")
            .unwrap()
    }

    pub fn admin(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        http.request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN)
    }
}

/// Creates a funded account with one key on the gateway at `base`, through the admin API.
pub async fn seed_account(
    http: &reqwest::Client,
    base: &str,
    email: &str,
    amount: &str,
) -> (String, String) {
    let post = |path: String, body: Value| {
        let req = http
            .post(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .json(&body);
        async move {
            let r = req.send().await.expect("admin call");
            assert!(r.status().is_success(), "admin call: {}", r.status());
            r.json::<Value>().await.expect("json")
        }
    };
    let account = post("/admin/accounts".to_owned(), json!({"email": email})).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    post(
        format!("/admin/accounts/{account}/credits"),
        json!({"amount": amount, "reason": "test funding"}),
    )
    .await;
    let key = post(
        format!("/admin/accounts/{account}/keys"),
        json!({"name": "k"}),
    )
    .await["key"]
        .as_str()
        .expect("key")
        .to_owned();
    (account, key)
}

/// The sum of the `cost` fields of usage records, in nano-USDT.
pub fn billed(usage: &[Value]) -> i64 {
    usage
        .iter()
        .map(|u| {
            u["cost"]
                .as_str()
                .expect("cost")
                .parse::<Amount>()
                .expect("amount")
                .nanos()
        })
        .sum()
}

/// `name value` from the Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The node of the supervision tree named `name`.
pub fn node<'a>(tree: &'a Value, name: &str) -> Option<&'a Value> {
    if tree["name"] == name {
        return Some(tree);
    }
    tree["children"]
        .as_array()?
        .iter()
        .find_map(|c| node(c, name))
}
