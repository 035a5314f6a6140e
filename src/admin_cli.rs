//! `tollgate admin …`: a command-line client of the admin HTTP API, for operators.
//!
//! Each subcommand is one admin call (see [`crate::http::admin`]). The default output is plain,
//! aligned text for people; `--json` prints the API's JSON as it came, pretty-printed, for
//! scripts. Amounts stay the API's decimal strings: nothing here parses money.
//!
//! Errors go to stderr as `error: <message> (<code>)` and the process exits with status 1.

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use reqwest::header::{CONTENT_TYPE, USER_AGENT};
use reqwest::{Method, Url};
use serde_json::{json, Value};
use std::fmt;
use std::io::Write;
use std::time::Duration;

/// How long one admin call may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Base URL of the gateway.
    #[arg(
        long,
        env = "TOLLGATE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true,
        display_order = 100
    )]
    pub url: String,
    /// The gateway's admin token.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Print the API's JSON response as-is (pretty-printed), for scripts.
    #[arg(long, global = true, display_order = 101)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create or show accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Credit an account, or debit it with a negative amount (never below zero). Audited.
    Credit {
        /// The account, `acct_…`.
        account_id: String,
        /// USDT as a decimal string, e.g. `10.5`; negative (e.g. `-2.5`) is a debit.
        #[arg(allow_hyphen_values = true)]
        amount: String,
        /// Why: recorded with the ledger entry.
        #[arg(long)]
        reason: String,
        /// Repeating a credit with the same key applies it once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Create or revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// An account's usage records, newest first (metadata only).
    Usage {
        /// The account, `acct_…`.
        account_id: String,
        /// How many records (1 to 1000; the gateway's default is 50).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
    },
    /// The live supervisor tree, with the account actors worst off first (not running, most
    /// restarts, deepest mailbox).
    Actors {
        /// How many account actors to list (0 to 1000; the gateway's default is 100).
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1000))]
        accounts: Option<u32>,
        /// Only this account's actor, `acct_…`.
        #[arg(long, conflicts_with = "accounts")]
        account: Option<String>,
    },
    /// Providers: requests in flight, concurrency limits, leases.
    Providers,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account (balance 0).
    Create {
        #[arg(long)]
        email: String,
    },
    /// Show an account's email, balance and reserved amount.
    Show {
        /// The account, `acct_…`.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key for an account. The full key is printed once and never again.
    Create {
        /// The account the key spends from, `acct_…`.
        account_id: String,
        /// A label for the key.
        #[arg(long)]
        name: String,
        /// Most this key may spend, in USDT (decimal string).
        #[arg(long, value_name = "USDT")]
        spend_cap: Option<String>,
        /// When the key stops working, in Unix seconds.
        #[arg(long, value_name = "UNIX_SECONDS")]
        expires_at: Option<i64>,
        /// A model this key may use; repeat for several. Without it, every model.
        #[arg(long = "allow-model", value_name = "MODEL")]
        allow_models: Vec<String>,
    },
    /// Revoke a key, effective at once.
    Revoke {
        /// The key's id, `key_…` (not the key itself).
        key_id: String,
    },
}

/// Runs one admin command and returns the process exit status: 0, or 1 once the error has
/// been printed to stderr.
pub async fn run(args: AdminArgs) -> i32 {
    let result = match execute(&args).await {
        Ok(text) => write_stdout(&text),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// Writes to stdout without panicking when the reader has gone (`tollgate admin … | head`).
fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow!("writing to stdout: {e}")),
    }
}

async fn execute(args: &AdminArgs) -> anyhow::Result<String> {
    let client = Client::new(&args.url, &args.token)?;
    let value = request(&client, &args.command).await?;
    if args.json {
        let mut text = serde_json::to_string_pretty(&value)?;
        text.push('\n');
        Ok(text)
    } else {
        render(&args.command, &value)
    }
}

/// The one admin call behind each subcommand.
async fn request(client: &Client, command: &AdminCommand) -> anyhow::Result<Value> {
    match command {
        AdminCommand::Accounts(AccountsCommand::Create { email }) => {
            client
                .call(
                    Method::POST,
                    &["accounts"],
                    None,
                    Some(json!({"email": email})),
                )
                .await
        }
        AdminCommand::Accounts(AccountsCommand::Show { id }) => {
            client
                .call(Method::GET, &["accounts", id], None, None)
                .await
        }
        AdminCommand::Credit {
            account_id,
            amount,
            reason,
            idempotency_key,
        } => {
            let mut body = json!({"amount": amount, "reason": reason});
            if let Some(k) = idempotency_key {
                body["idempotency_key"] = json!(k);
            }
            client
                .call(
                    Method::POST,
                    &["accounts", account_id, "credits"],
                    None,
                    Some(body),
                )
                .await
        }
        AdminCommand::Keys(KeysCommand::Create {
            account_id,
            name,
            spend_cap,
            expires_at,
            allow_models,
        }) => {
            let mut body = json!({"name": name});
            if let Some(cap) = spend_cap {
                body["spend_cap"] = json!(cap);
            }
            if let Some(at) = expires_at {
                body["expires_at"] = json!(at);
            }
            if !allow_models.is_empty() {
                body["allowed_models"] = json!(allow_models);
            }
            client
                .call(
                    Method::POST,
                    &["accounts", account_id, "keys"],
                    None,
                    Some(body),
                )
                .await
        }
        AdminCommand::Keys(KeysCommand::Revoke { key_id }) => {
            client
                .call(Method::DELETE, &["keys", key_id], None, None)
                .await
        }
        AdminCommand::Usage { account_id, limit } => {
            let query = limit.map(|n| ("limit", n.to_string()));
            client
                .call(Method::GET, &["accounts", account_id, "usage"], query, None)
                .await
        }
        AdminCommand::Actors { accounts, account } => {
            let query = match (accounts, account) {
                (_, Some(id)) => Some(("account", id.clone())),
                (Some(n), None) => Some(("accounts", n.to_string())),
                (None, None) => None,
            };
            client.call(Method::GET, &["actors"], query, None).await
        }
        AdminCommand::Providers => client.call(Method::GET, &["providers"], None, None).await,
    }
}

/// An error the admin API reported in its `{"error": {"message", "type", "code"}}` shape.
#[derive(Debug)]
struct ApiFailure {
    message: String,
    code: String,
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiFailure {}

struct Client {
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl Client {
    fn new(url: &str, token: &str) -> anyhow::Result<Client> {
        let base = Url::parse(url).map_err(|e| anyhow!("--url `{url}` is not a URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            bail!("--url `{url}` must be an http:// or https:// URL");
        }
        if token.is_empty() {
            bail!("the admin token is empty: pass --token or set TOLLGATE_ADMIN_TOKEN");
        }
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base,
            token: token.to_owned(),
        })
    }

    /// `<base>/admin/<segments…>`, each segment percent-encoded.
    fn url(&self, segments: &[&str], query: Option<(&str, String)>) -> anyhow::Result<Url> {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        url.path_segments_mut()
            .map_err(|()| anyhow!("--url `{}` cannot take a path", self.base))?
            .pop_if_empty()
            .push("admin")
            .extend(segments);
        if let Some((k, v)) = query {
            url.query_pairs_mut().append_pair(k, &v);
        }
        Ok(url)
    }

    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: Option<(&str, String)>,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = self.url(segments, query)?;
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(&self.token)
            .header(
                USER_AGENT,
                concat!("tollgate-admin/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(body) = body {
            req = req
                .header(CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&body)?);
        }
        let resp = req.send().await.map_err(|e| self.send_error(&e))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| anyhow!("reading the gateway's answer: {}", root_cause(&e)))?;
        let value: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return value.ok_or_else(|| {
                anyhow!("the gateway answered {status} with a body that is not JSON")
            });
        }
        if let Some(err) = value.as_ref().and_then(|v| v.get("error")) {
            let message = err["message"]
                .as_str()
                .map_or_else(|| status.to_string(), str::to_owned);
            let code = err["code"]
                .as_str()
                .or_else(|| err["type"].as_str())
                .map_or_else(|| status.as_u16().to_string(), str::to_owned);
            return Err(ApiFailure { message, code }.into());
        }
        let text = String::from_utf8_lossy(&bytes);
        let snippet: String = text.trim().chars().take(200).collect();
        if snippet.is_empty() {
            bail!("the gateway answered {status}");
        }
        bail!("the gateway answered {status}: {snippet}")
    }

    fn send_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let base = self.base.as_str().trim_end_matches('/');
        if e.is_timeout() {
            anyhow!(
                "the gateway at {base} did not answer within {}s",
                TIMEOUT.as_secs()
            )
        } else if e.is_connect() {
            anyhow!(
                "cannot connect to the gateway at {base}: {} (is it running? check --url or TOLLGATE_URL)",
                root_cause(e)
            )
        } else {
            anyhow!("request to the gateway at {base} failed: {}", root_cause(e))
        }
    }
}

/// The innermost error's message: "Connection refused (os error 111)" rather than reqwest's
/// "error sending request for url (…)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

// ---------------------------------------------------------------------------------------------
// Human-readable output.

fn render(command: &AdminCommand, v: &Value) -> anyhow::Result<String> {
    match command {
        AdminCommand::Accounts(AccountsCommand::Create { .. }) => Ok(format!(
            "Created account {}.\n\n{}",
            text(&v["id"]),
            account_fields(v)
        )),
        AdminCommand::Accounts(AccountsCommand::Show { .. }) => Ok(account_fields(v)),
        AdminCommand::Credit { .. } => Ok(render_credit(v)),
        AdminCommand::Keys(KeysCommand::Create { .. }) => render_new_key(v),
        AdminCommand::Keys(KeysCommand::Revoke { .. }) => Ok(format!(
            "Revoked key {} ({}); it stops working at once.\n\n{}",
            text(&v["id"]),
            text(&v["name"]),
            key_fields(v)
        )),
        AdminCommand::Usage { account_id, .. } => render_usage(account_id, v),
        AdminCommand::Actors { .. } => Ok(render_actors(v)),
        AdminCommand::Providers => render_providers(v),
    }
}

fn account_fields(v: &Value) -> String {
    table(
        &[
            row(["id", &text(&v["id"])]),
            row(["email", &text(&v["email"])]),
            row(["balance", &usdt(&v["balance"])]),
            row(["reserved", &usdt(&v["reserved"])]),
            row(["created", &time_ms(&v["created_at"])]),
        ],
        &[],
    )
}

fn render_credit(v: &Value) -> String {
    let amount = text(&v["amount"]);
    let account = text(&v["id"]);
    // The sign is read off the API's decimal string: money is never parsed here.
    let headline = match amount.strip_prefix('-') {
        Some(abs) => format!("Debited {abs} USDT from {account}."),
        None => format!("Credited {amount} USDT to {account}."),
    };
    let fields = table(
        &[
            row(["balance", &usdt(&v["balance"])]),
            row(["reserved", &usdt(&v["reserved"])]),
            row(["entry", &text(&v["entry_id"])]),
        ],
        &[],
    );
    format!("{headline}\n\n{fields}")
}

fn render_new_key(v: &Value) -> anyhow::Result<String> {
    let key = v["key"]
        .as_str()
        .ok_or_else(|| anyhow!("the gateway's answer has no `key`"))?;
    Ok(format!(
        "Created key {} ({}) for account {}.\n\n    {key}\n\n\
         This is the full API key. It is shown only once and cannot be retrieved again:\n\
         store it now.\n\n{}",
        text(&v["id"]),
        text(&v["name"]),
        text(&v["account_id"]),
        key_fields(v)
    ))
}

fn key_fields(v: &Value) -> String {
    let cap = match &v["spend_cap"] {
        Value::Null => "none".to_owned(),
        c => usdt(c),
    };
    let expires = match &v["expires_at"] {
        Value::Null => "never".to_owned(),
        t => t.as_i64().map_or_else(|| text(t), format_unix_secs),
    };
    let models = match v["allowed_models"].as_array() {
        None => "all".to_owned(),
        Some(list) => list.iter().map(text).collect::<Vec<_>>().join(", "),
    };
    let revoked = if v["revoked"].as_bool() == Some(true) {
        "yes"
    } else {
        "no"
    };
    table(
        &[
            row(["id", &text(&v["id"])]),
            row(["account", &text(&v["account_id"])]),
            row(["prefix", &text(&v["prefix"])]),
            row(["spend cap", &cap]),
            row(["spent", &usdt(&v["spent"])]),
            row(["expires", &expires]),
            row(["allowed models", &models]),
            row(["revoked", revoked]),
            row(["created", &time_ms(&v["created_at"])]),
        ],
        &[],
    )
}

fn render_usage(account: &str, v: &Value) -> anyhow::Result<String> {
    let data = list(v)?;
    if data.is_empty() {
        return Ok(format!("No usage records for {account}.\n"));
    }
    let mut costs: Vec<String> = data.iter().map(|u| text(&u["cost"])).collect();
    align_decimals(&mut costs);
    let mut rows = vec![row([
        "REQUEST_ID",
        "MODEL",
        "PROMPT",
        "COMPLETION",
        "COST",
        "STATUS",
        "CREATED",
    ])];
    for (u, cost) in data.iter().zip(costs) {
        rows.push(vec![
            text(&u["request_id"]),
            text(&u["model"]),
            text(&u["prompt_tokens"]),
            text(&u["completion_tokens"]),
            cost,
            text(&u["status"]),
            time_ms(&u["created_at"]),
        ]);
    }
    use Align::{Left as L, Right as R};
    Ok(table(&rows, &[L, L, R, R, R, L, L]))
}

fn render_actors(v: &Value) -> String {
    fn walk(node: &Value, depth: usize, rows: &mut Vec<Vec<String>>) {
        rows.push(vec![
            format!("{}{}", "  ".repeat(depth), text(&node["name"])),
            text(&node["kind"]),
            text(&node["status"]),
            text(&node["restarts"]),
            text(&node["mailbox_depth"]),
            node["uptime_secs"]
                .as_u64()
                .map_or_else(|| text(&node["uptime_secs"]), format_uptime),
        ]);
        let children = node["children"].as_array().map_or(&[][..], Vec::as_slice);
        for child in children {
            walk(child, depth + 1, rows);
        }
        let more = node["children_total"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map_or(0, |n| n.saturating_sub(children.len()));
        if more > 0 {
            let mut row = vec![format!("{}({more} more)", "  ".repeat(depth + 1))];
            row.resize(6, String::new());
            rows.push(row);
        }
    }
    let mut rows = vec![row([
        "NAME", "KIND", "STATUS", "RESTARTS", "MAILBOX", "UPTIME",
    ])];
    walk(v, 0, &mut rows);
    use Align::{Left as L, Right as R};
    table(&rows, &[L, L, L, R, R, R])
}

fn render_providers(v: &Value) -> anyhow::Result<String> {
    let data = list(v)?;
    if data.is_empty() {
        return Ok("No providers.\n".to_owned());
    }
    let mut rows = vec![row([
        "NAME",
        "KIND",
        "HEALTH",
        "IN_FLIGHT",
        "MAX_CONCURRENCY",
        "REQUESTS/MIN",
        "TOKENS/MIN",
        "LEASES_GRANTED",
        "LEASES_REFUSED",
        "RETRIES",
        "FAILOVERS",
    ])];
    for p in data {
        rows.push(vec![
            text(&p["name"]),
            text(&p["kind"]),
            text(&p["health"]),
            text(&p["in_flight"]),
            text(&p["max_concurrency"]),
            text(&p["requests_per_minute"]),
            text(&p["tokens_per_minute"]),
            text(&p["leases_granted"]),
            text(&p["leases_refused"]),
            text(&p["retries"]),
            text(&p["failovers"]),
        ]);
    }
    use Align::{Left as L, Right as R};
    Ok(table(&rows, &[L, L, L, R, R, R, R, R, R, R, R]))
}

fn list(v: &Value) -> anyhow::Result<&Vec<Value>> {
    v["data"]
        .as_array()
        .ok_or_else(|| anyhow!("the gateway's answer has no `data` list"))
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// A JSON value as a table cell: strings bare, `null` as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// A decimal USDT string from the API, with its unit.
fn usdt(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        other => format!("{} USDT", text(other)),
    }
}

fn time_ms(v: &Value) -> String {
    v.as_i64()
        .map_or_else(|| text(v), |ms| format_unix_secs(ms.div_euclid(1000)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Lays rows out in columns two spaces apart. `align` gives each column's alignment (left
/// where missing); widths count characters; lines carry no trailing spaces.
fn table(rows: &[Vec<String>], align: &[Align]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if align.get(i) == Some(&Align::Right) {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Pads decimal strings so their points line up when the column is right-aligned:
/// `1.5` and `0.00000015` become `1.5       ` and `0.00000015`. Text only; no parsing.
fn align_decimals(cells: &mut [String]) {
    let frac_len = |s: &str| s.find('.').map_or(0, |dot| s.len() - dot);
    let widest = cells.iter().map(|c| frac_len(c)).max().unwrap_or(0);
    for c in cells.iter_mut() {
        let pad = widest - frac_len(c);
        c.extend(std::iter::repeat_n(' ', pad));
    }
}

/// `2024-05-01 12:00:00 UTC`.
fn format_unix_secs(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `45s`, `3m07s`, `2h05m`, `4d03h`.
fn format_uptime(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            row(["NAME", "N", "NOTE"]),
            row(["a", "1000", "x"]),
            row(["longer", "7", ""]),
        ];
        let out = table(&rows, &[Align::Left, Align::Right]);
        assert_eq!(out, "NAME       N  NOTE\na       1000  x\nlonger     7\n");
    }

    #[test]
    fn decimals_line_up_on_the_point() {
        let mut cells = vec!["1.5".to_owned(), "0.00000015".to_owned(), "2".to_owned()];
        align_decimals(&mut cells);
        assert_eq!(cells, ["1.5       ", "0.00000015", "2         "]);
        let rows: Vec<Vec<String>> = cells.into_iter().map(|c| vec![c, "x".into()]).collect();
        let out = table(&rows, &[Align::Right]);
        assert_eq!(out, "1.5         x\n0.00000015  x\n2           x\n");
    }

    #[test]
    fn times() {
        assert_eq!(format_unix_secs(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_secs(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_secs(1_714_564_800), "2024-05-01 12:00:00 UTC");
        assert_eq!(format_unix_secs(-1), "1969-12-31 23:59:59 UTC");
        assert_eq!(format_uptime(45), "45s");
        assert_eq!(format_uptime(187), "3m07s");
        assert_eq!(format_uptime(7500), "2h05m");
        assert_eq!(format_uptime(4 * 86_400 + 3 * 3600), "4d03h");
    }

    #[test]
    fn urls_are_built_from_encoded_segments() {
        let c = Client::new("http://127.0.0.1:8080/", "t").ok();
        let url = c.and_then(|c| {
            c.url(&["accounts", "a/b?c"], Some(("limit", "5".into())))
                .ok()
        });
        assert_eq!(
            url.map(String::from).as_deref(),
            Some("http://127.0.0.1:8080/admin/accounts/a%2Fb%3Fc?limit=5")
        );
        let c = Client::new("https://gw.example/prefix", "t").ok();
        let url = c.and_then(|c| c.url(&["actors"], None).ok());
        assert_eq!(
            url.map(String::from).as_deref(),
            Some("https://gw.example/prefix/admin/actors")
        );
    }
}
