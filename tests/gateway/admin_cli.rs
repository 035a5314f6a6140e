//! `tollgate admin …`: the real binary as a client of a running gateway's admin API.

use crate::common::*;
use serde_json::{json, Value};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Exit 0; the stdout.
    fn ok(self) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// Exit 1, nothing on stdout, `error: …` on stderr; the stderr.
    fn failed(self) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        assert!(self.stdout.is_empty(), "stdout: {}", self.stdout);
        assert!(
            self.stderr.starts_with("error: "),
            "stderr: {}",
            self.stderr
        );
        self.stderr
    }

    fn json(self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }
}

/// `tollgate admin --url <url> --token <token> <args…>`, off the async workers.
async fn admin(url: &str, token: &str, args: &[&str]) -> Run {
    let mut argv: Vec<String> = ["admin", "--url", url, "--token", token]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(&argv)
            .env_remove("TOLLGATE_URL")
            .env_remove("TOLLGATE_ADMIN_TOKEN")
            .output()
            .expect("run tollgate admin");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

/// The first whitespace-separated word starting with `prefix`, trailing punctuation dropped.
fn word<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.split_whitespace()
        .find(|w| w.starts_with(prefix))
        .map(|w| w.trim_end_matches(['.', ',', ')']))
        .unwrap_or_else(|| panic!("no `{prefix}…` in: {text}"))
}

/// The header line's columns, in order.
fn header(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let cli = |args: &'static [&'static str]| admin(&h.base, ADMIN, args);

    // Accounts: the human output names the new account; --json is the API's object.
    let out = admin(
        &h.base,
        ADMIN,
        &["accounts", "create", "--email", "Ops@Example.com"],
    )
    .await
    .ok();
    let account = word(&out, "acct_").to_owned();
    assert!(out.contains("ops@example.com"), "{out}");
    assert_eq!(h.balance(&account).await.to_string(), "0");
    let v = admin(
        &h.base,
        ADMIN,
        &["--json", "accounts", "create", "--email", "j@example.com"],
    )
    .await
    .json();
    assert_eq!(v["object"], "account");
    assert_eq!(v["email"], "j@example.com");
    assert_eq!(v["balance"], "0");
    assert!(v["id"].as_str().unwrap().starts_with("acct_"), "{v}");
    // --json may also follow the subcommand.
    let v = admin(&h.base, ADMIN, &["accounts", "show", &account, "--json"])
        .await
        .json();
    assert_eq!(v["id"], account.as_str());
    assert_eq!(v["email"], "ops@example.com");

    // Credits: the new balance, exact; idempotent with a key; negative is a debit.
    let credit = ["credit", &account, "12.000000001", "--reason", "wire 42"];
    let with_key = [&credit[..], &["--idempotency-key", "wire-42"]].concat();
    for _ in 0..2 {
        let out = admin(&h.base, ADMIN, &with_key).await.ok();
        assert!(out.contains("Credited 12.000000001 USDT"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["balance", "12.000000001", "USDT"]),
            "{out}"
        );
    }
    let v = admin(
        &h.base,
        ADMIN,
        &[
            "--json",
            "credit",
            &account,
            "-2.5",
            "--reason",
            "refund",
            "--idempotency-key",
            "refund-1",
        ],
    )
    .await
    .json();
    assert_eq!(v["amount"], "-2.5");
    assert_eq!(v["balance"], "9.500000001");
    assert_eq!(v["entry_id"], format!("adj:{account}:refund-1"));
    let out = admin(&h.base, ADMIN, &["accounts", "show", &account])
        .await
        .ok();
    assert!(out.contains("9.500000001 USDT"), "{out}");

    // Keys: the full key, once, with the note; it works against the client API.
    let expires = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600)
        .to_string();
    let out = admin(
        &h.base,
        ADMIN,
        &[
            "keys",
            "create",
            &account,
            "--name",
            "ci",
            "--spend-cap",
            "5",
            "--expires-at",
            &expires,
            "--allow-model",
            "gpt-4o-mini",
            "--allow-model",
            "pricey",
        ],
    )
    .await
    .ok();
    let key = word(&out, "sk-tg-").to_owned();
    let key_id = word(&out, "key_").to_owned();
    assert!(out.contains("shown only once"), "{out}");
    assert!(out.contains("gpt-4o-mini, pricey"), "{out}");
    assert!(out.contains("5 USDT"), "{out}");
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
    let r = h.chat(&key, &chat).await;
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let _ = r.text().await.unwrap();
    let v = admin(
        &h.base,
        ADMIN,
        &["--json", "keys", "create", &account, "--name", "script"],
    )
    .await
    .json();
    assert!(v["key"].as_str().unwrap().starts_with("sk-tg-"), "{v}");
    assert_eq!(v["object"], "api_key");
    assert_eq!(v["account_id"], account.as_str());
    assert_eq!(v["allowed_models"], Value::Null);

    // Usage: a table with the record just made; --json has the API's fields.
    let out = admin(&h.base, ADMIN, &["usage", &account, "--limit", "10"])
        .await
        .ok();
    assert_eq!(
        header(&out)[..6],
        [
            "REQUEST_ID",
            "MODEL",
            "PROMPT",
            "COMPLETION",
            "COST",
            "STATUS"
        ]
    );
    assert_eq!(out.lines().count(), 2, "{out}");
    let line = out.lines().nth(1).unwrap();
    assert!(line.starts_with(&request_id), "{out}");
    assert!(line.contains("gpt-4o-mini"), "{out}");
    let v = admin(&h.base, ADMIN, &["--json", "usage", &account])
        .await
        .json();
    let u = &v["data"][0];
    assert_eq!(u["request_id"], request_id.as_str());
    assert!(u["cost"].is_string(), "{v}");
    assert!(line.contains(u["cost"].as_str().unwrap()), "{out}");
    let out = admin(
        &h.base,
        ADMIN,
        &["usage", "--json", &account, "--limit", "0"],
    )
    .await
    .code;
    assert_eq!(out, Some(2), "clap rejects --limit 0");

    let balance = h.balance(&account).await;
    assert!(balance.to_string() != "9.500000001", "the call was charged");

    // Revoking: effective at once.
    let v = admin(&h.base, ADMIN, &["--json", "keys", "revoke", &key_id])
        .await
        .json();
    assert_eq!(v["revoked"], true);
    assert_eq!(h.chat(&key, &chat).await.status(), 401);
    let err = admin(&h.base, ADMIN, &["keys", "revoke", "key_nope"])
        .await
        .failed();
    assert!(err.contains("(not_found)"), "{err}");

    // Actors: an indented tree; providers: a table.
    let out = cli(&["actors"]).await.ok();
    assert_eq!(
        header(&out),
        ["NAME", "KIND", "STATUS", "RESTARTS", "MAILBOX", "UPTIME"]
    );
    let root = out.lines().nth(1).unwrap();
    assert!(
        root.starts_with("root ") && root.contains("supervisor"),
        "{out}"
    );
    assert!(out.lines().skip(2).all(|l| l.starts_with("  ")), "{out}");
    assert!(out.contains(&format!("    account:{account}")), "{out}");
    let v = cli(&["actors", "--json"]).await.json();
    assert_eq!(v["name"], "root");
    assert!(!v["children"].as_array().unwrap().is_empty(), "{v}");
    // Fewer accounts listed than there are: the rest are counted under the directory.
    let out = cli(&["actors", "--accounts", "0"]).await.ok();
    assert!(!out.contains("account:"), "{out}");
    assert!(out.contains("\n    (1 more)"), "{out}");
    let out = admin(&h.base, ADMIN, &["actors", "--account", &account])
        .await
        .ok();
    assert!(out.contains(&format!("    account:{account}")), "{out}");
    assert!(!out.contains("more)"), "{out}");
    let code = admin(&h.base, ADMIN, &["actors", "--accounts", "1001"])
        .await
        .code;
    assert_eq!(code, Some(2), "clap rejects --accounts 1001");
    let out = cli(&["providers"]).await.ok();
    assert_eq!(
        header(&out),
        [
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
            "FAILOVERS"
        ]
    );
    // No limits a minute configured: shown as "-".
    let mock_row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(mock_row[5..7], ["-", "-"], "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("mock "), "{out}");
    let v = cli(&["--json", "providers"]).await.json();
    assert_eq!(v["data"][0]["name"], "mock");
    assert!(v["data"][0]["leases_granted"].as_u64().unwrap() >= 1, "{v}");

    // Errors: the API's message and code on stderr, exit 1.
    let err = admin(&h.base, "wrong", &["actors"]).await.failed();
    assert!(
        err.contains("Invalid admin token. (invalid_admin_token)"),
        "{err}"
    );
    let err = admin(&h.base, "wrong", &["--json", "providers"])
        .await
        .failed();
    assert!(err.contains("(invalid_admin_token)"), "{err}");
    for args in [
        &["accounts", "show", "acct_nope"][..],
        &["usage", "acct_nope"],
        &["credit", "acct_nope", "1", "--reason", "x"],
        &["keys", "create", "acct_nope", "--name", "x"],
    ] {
        let err = admin(&h.base, ADMIN, args).await.failed();
        assert!(err.contains("No account `acct_nope`. (not_found)"), "{err}");
    }
    let err = admin(
        &h.base,
        ADMIN,
        &["credit", &account, "1.5e3", "--reason", "x"],
    )
    .await
    .failed();
    assert!(err.contains("(invalid_request_error)"), "{err}");
    let err = admin(
        &h.base,
        ADMIN,
        &["accounts", "create", "--email", "ops@example.com"],
    )
    .await
    .failed();
    assert!(err.contains("(conflict)"), "{err}");

    // No gateway there: a clear message, exit 1.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let err = admin(&closed, ADMIN, &["actors"]).await.failed();
    assert!(
        err.contains(&format!("cannot connect to the gateway at {closed}")),
        "{err}"
    );

    // The balance never moved through any of the failures.
    assert_eq!(h.balance(&account).await, balance);
    h.stop().await;
}
