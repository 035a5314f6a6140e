//! The official SDKs against the gateway, each driven by a script in `tests/sdk/`: OpenAI's
//! Python SDK (the models listed and retrieved, a call, a stream with and without its usage
//! chunk, and the errors as the SDK raises them) and Anthropic's (the Messages API: a
//! message, a stream, its events, the errors); then the store behind them. Each SDK is
//! installed from PyPI into a virtualenv under the tests' target directory the first time
//! (about 15 s); without Python or PyPI a test says so and passes, except under `CI=true`,
//! where it fails.

use crate::common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The SDKs: what pip installs, and the module to import.
const OPENAI_SDK: (&str, &str) = ("openai==3.57.0", "openai");
const ANTHROPIC_SDK: (&str, &str) = ("anthropic==2.14.0", "anthropic");

/// A Python with the SDK, or why there is none.
async fn python_with_sdk((package, module): (&str, &str)) -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(package.replace("==", "-"));
    let python = dir.join("bin/python");
    let has_sdk = |python: PathBuf| async move {
        tokio::process::Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if has_sdk(python.clone()).await {
        return Ok(python);
    }
    // Made aside and moved into place whole, so that a broken install is never taken for one.
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let run = |program: PathBuf, args: Vec<String>| async move {
        let out = tokio::process::Command::new(&program)
            .args(&args)
            .output()
            .await
            .map_err(|e| format!("{}: {e}", program.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} {}: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let venv = vec!["-m".into(), "venv".into(), partial.display().to_string()];
    run("python3".into(), venv).await?;
    let install = vec!["install".into(), "-q".into(), package.into()];
    run(partial.join("bin/pip"), install).await?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(|e| e.to_string())?;
    // A virtualenv's scripts name the folder it was made in; the interpreter itself does not.
    if has_sdk(python.clone()).await {
        Ok(python)
    } else {
        Err(format!("{package} installed, but not importable"))
    }
}

/// What `script` (in tests/sdk/) printed, run with `sdk`'s Python against the gateway with
/// `key` (`TOLLGATE_KEY`) and the key of an account without money (`TOLLGATE_BROKE_KEY`),
/// which it checks was never charged; `None` if the test is skipped.
async fn run_script(h: &Harness, sdk: (&str, &str), script: &str, key: &str) -> Option<Value> {
    let python = match python_with_sdk(sdk).await {
        Ok(p) => p,
        Err(why) => {
            let package = sdk.0;
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("the official SDK {package} (from PyPI) is required under CI=true: {why}");
            }
            eprintln!(
                "SKIPPED: the official SDK {package} could not be installed from PyPI: {why}"
            );
            return None;
        }
    };
    let broke = h.account(&format!("broke-{}@example.com", sdk.1)).await;
    let (_, broke_key) = h.key(&broke, json!({})).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(script)
            .env("TOLLGATE_BASE", &h.base)
            .env("TOLLGATE_KEY", key)
            .env("TOLLGATE_BROKE_KEY", &broke_key)
            .output(),
    )
    .await
    .expect("the SDK's script finished")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(h.usage(&broke).await.is_empty());
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_unchanged_but_for_base_url_and_key() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let Some(seen) = run_script(&h, OPENAI_SDK, "openai_sdk.py", &key).await else {
        return;
    };

    assert!(seen["models"]
        .as_array()
        .unwrap()
        .contains(&json!("gpt-4o-mini")));
    assert_eq!(
        seen["retrieved"],
        json!({"id": "gpt-4o-mini", "owned_by": "mock",
            "pricing": {"currency": "USDT", "input_per_mtok": "0.15", "output_per_mtok": "0.6"}})
    );

    let chat = &seen["chat"];
    assert_eq!(chat["content"], "hello from the sdk", "{seen}");
    assert_eq!(chat["finish_reason"], "length");
    let prompt = mock_prompt_tokens(&["hello from the sdk"]);
    assert_eq!(chat["prompt_tokens"], prompt);
    assert_eq!(chat["completion_tokens"], 4);
    let cost = expected_cost(150_000_000, 600_000_000, prompt, 4);
    assert_eq!(chat["cost"], cost.to_string());

    let stream = &seen["stream"];
    assert_eq!(stream["content"], "streamed through the sdk", "{seen}");
    let streamed_prompt = mock_prompt_tokens(&["streamed through the sdk"]);
    assert_eq!(
        stream["usage"],
        json!([{"prompt_tokens": streamed_prompt, "completion_tokens": 4}])
    );
    let quiet = &seen["stream_without_usage"];
    assert_eq!(quiet["content"], "no usage asked for");
    assert_eq!(
        quiet["usage"],
        json!([]),
        "the usage chunk was not asked for"
    );

    let errors = &seen["errors"];
    let error = |name: &str| {
        let e = &errors[name];
        (
            e["class"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {errors}")),
            e["status"].as_u64().unwrap(),
            e["code"].as_str().unwrap(),
        )
    };
    assert_eq!(
        error("bad_key"),
        ("AuthenticationError", 401, "invalid_api_key")
    );
    assert_eq!(
        error("no_such_model"),
        ("NotFoundError", 404, "model_not_found")
    );
    assert_eq!(
        error("retrieve_missing"),
        ("NotFoundError", 404, "model_not_found")
    );
    assert_eq!(
        error("no_money"),
        ("APIStatusError", 402, "insufficient_balance")
    );
    assert_eq!(
        error("bad_request"),
        ("BadRequestError", 400, "invalid_request_error")
    );
    assert_eq!(
        error("throttled"),
        ("RateLimitError", 429, "rate_limit_exceeded")
    );
    assert_eq!(errors["throttled"]["retry_after"], "7");
    assert_eq!(
        error("upstream_failed"),
        ("InternalServerError", 502, "upstream_error")
    );

    // Behind the SDK: three calls charged, the two upstream failures recorded free, the
    // refusals not recorded at all; the call's id is its record's.
    let (statuses, charged) = h.recorded(&account).await;
    assert_eq!(statuses, [200, 200, 200, 429, 500]);
    let usage = h.usage(&account).await;
    assert!(usage.iter().any(|u| u["request_id"] == chat["request_id"]));
    h.assert_charged_once_from_one_usdt(&account, charged).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_unchanged_but_for_base_url_and_key() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let Some(seen) = run_script(&h, ANTHROPIC_SDK, "anthropic_sdk.py", &key).await else {
        return;
    };

    // The system prompt and the conversation reach the upstream as chat messages (the mock
    // counts their tokens); the answer comes back as a message, its id the call's.
    let message = &seen["message"];
    let prompt = mock_prompt_tokens(&["You are terse.", "hello from claude's sdk"]);
    assert_eq!(
        (&message["role"], &message["model"], &message["stop_reason"]),
        (
            &json!("assistant"),
            &json!("gpt-4o-mini"),
            &json!("max_tokens")
        ),
        "{seen}"
    );
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "hello from claude's sdk", "citations": null}])
    );
    assert_eq!(
        message["usage"],
        json!({"input_tokens": prompt, "output_tokens": 4})
    );
    assert_eq!(message["id"], message["request_id"]);
    let cost = expected_cost(150_000_000, 600_000_000, prompt, 4);
    assert_eq!(message["cost"], cost.to_string());

    let stream = &seen["stream"];
    let prompt =
        mock_prompt_tokens(&["first question", "first answer", "streamed to claude's sdk"]);
    assert_eq!(stream["text"], "streamed to claude's sdk", "{seen}");
    assert_eq!(stream["final_text"], stream["text"]);
    assert_eq!(stream["stop_reason"], "max_tokens");
    assert_eq!(
        stream["usage"],
        json!({"input_tokens": prompt, "output_tokens": 4})
    );
    assert_eq!(
        seen["events"],
        json!([
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ])
    );

    let errors = &seen["errors"];
    let error = |name: &str| {
        let e = &errors[name];
        assert_eq!(e["type"], "error", "{name}: {errors}");
        (
            e["class"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {errors}")),
            e["status"].as_u64().unwrap(),
        )
    };
    assert_eq!(error("bad_key"), ("AuthenticationError", 401));
    assert_eq!(error("no_such_model"), ("NotFoundError", 404));
    assert_eq!(error("no_money"), ("PaymentRequiredError", 402));
    assert_eq!(error("bad_request"), ("BadRequestError", 400));
    assert_eq!(error("throttled"), ("RateLimitError", 429));
    assert_eq!(errors["throttled"]["retry_after"], "7");
    assert_eq!(error("upstream_failed"), ("InternalServerError", 502));

    let (statuses, charged) = h.recorded(&account).await;
    assert_eq!(statuses, [200, 200, 200, 429, 500]);
    h.assert_charged_once_from_one_usdt(&account, charged).await;
    h.stop().await;
}
