//! Providers of kind `anthropic`: chat calls (and Messages API calls) served by Anthropic's
//! Messages API upstream, here the mock's `…/messages`, which answers as Anthropic does.

use crate::common::*;
use crate::proxy::plain_provider;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tollgate::config::{ModelConfig, ProviderConfig};
use tollgate::mock::MockOptions;
use warp::Filter;

fn claude(id: &str, upstream_model: &str) -> ModelConfig {
    ModelConfig {
        id: id.to_owned(),
        provider: "claude".to_owned(),
        upstream_model: upstream_model.to_owned(),
        input_per_mtok: "3".to_owned(),
        output_per_mtok: "15".to_owned(),
        max_output_tokens: 1000,
        ..Default::default()
    }
}

/// A gateway whose provider `claude` is the mock's Messages API, at `upstream`.
async fn harness(upstream: std::net::SocketAddr, mock: MockOptions) -> Option<Harness> {
    Harness::start_with(Backend::Sqlite, mock, |c| {
        c.providers.push(ProviderConfig {
            kind: "anthropic".to_owned(),
            // Any variable the environment holds: cargo sets this one for every test.
            api_key_env: Some("CARGO_PKG_NAME".to_owned()),
            retry_backoff_ms: 10,
            ..plain_provider("claude", upstream, Some("direct".to_owned()))
        });
        c.models.push(claude("claude", "claude-mock"));
        c.models.push(claude("claude-tool", "mock-tool"));
        c.models.push(claude("claude-broken", "mock-error"));
    })
    .await
}

fn ask(model: &str, text: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_calls_to_an_anthropic_provider_are_answered_and_billed_as_chat() {
    let upstream = Mock::start(MockOptions::default()).await;
    let Some(h) = harness(upstream.addr, MockOptions::default()).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let price =
        |prompt, completion| expected_cost(3_000_000_000, 15_000_000_000, prompt, completion);

    // Not streamed: the system prompt went as `system` (the mock counts it as a message).
    let r = h
        .chat(&key, &ask("claude", "hello anthropic upstream", 3))
        .await;
    assert_eq!(r.status(), 200);
    let cost = charged(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "hello anthropic upstream"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let prompt = mock_prompt_tokens(&["Be brief.", "hello anthropic upstream"]);
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(cost, price(prompt, 3));

    // Streamed: chat chunks, the usage chunk when asked for, [DONE] after the charge.
    let mut body = ask("claude", "streamed from anthropic", 3);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_events(h.chat(&key, &body).await).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "streamed from anthropic");
    let usage = chunks
        .iter()
        .rev()
        .find_map(|c| c.get("usage").filter(|u| !u.is_null()))
        .unwrap();
    let prompt = mock_prompt_tokens(&["Be brief.", "streamed from anthropic"]);
    assert_eq!(
        (&usage["prompt_tokens"], &usage["completion_tokens"]),
        (&json!(prompt), &json!(3))
    );
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));

    // A tool call, whole and streamed: the arguments are the JSON of the upstream's input.
    let r = h.chat(&key, &ask("claude-tool", "find tollgate", 2)).await;
    let v: Value = r.json().await.unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(
        (&call["id"], &call["function"]["name"]),
        (&json!("toolu_mock"), &json!("lookup"))
    );
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"q": "find tollgate"}));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let mut body = ask("claude-tool", "find tollgate", 2);
    body["stream"] = json!(true);
    let events = sse_events(h.chat(&key, &body).await).await;
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["function"]["name"], "lookup");
    let streamed: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&streamed).unwrap(), arguments);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));

    // A client of the Messages API, through the chat path, to a Messages upstream.
    let r = h
        .http
        .post(format!("{}/v1/messages", h.base))
        .header("x-api-key", &key)
        .json(&json!({"model": "claude", "max_tokens": 2, "messages": [{"role": "user", "content": "round trip"}]}))
        .send()
        .await
        .unwrap();
    let m: Value = r.json().await.unwrap();
    assert_eq!(
        m["content"],
        json!([{"type": "text", "text": "round trip"}]),
        "{m}"
    );
    assert_eq!(m["stop_reason"], "max_tokens");

    // The upstream's failure in its own shape: retried, then 502 with its status recorded;
    // what it cannot carry is refused before it is sent.
    let r = h.chat(&key, &ask("claude-broken", "x", 2)).await;
    assert_eq!(r.status(), 502);
    let mut body = ask("claude", "x", 2);
    body["logprobs"] = json!(true);
    let r = h.chat(&key, &body).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`logprobs`"),
        "{v}"
    );

    let usage = h.usage(&account).await;
    let statuses: Vec<u64> = usage
        .iter()
        .map(|u| u["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 200, 200, 200, 200, 200], "{usage:?}");
    assert!(usage.iter().all(|u| u["provider"] == "claude"));
    let (_, total) = h.recorded(&account).await;
    h.assert_charged_once_from_one_usdt(&account, total).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_provider_gets_its_key_version_and_a_max_tokens() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let route = warp::post()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .map(
            move |path: warp::path::FullPath, headers: http::HeaderMap, body: bytes::Bytes| {
                let header = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
                kept.lock().unwrap().push((
                    path.as_str().to_owned(),
                    header("x-api-key"),
                    header("anthropic-version"),
                    header("authorization"),
                    serde_json::from_slice::<Value>(&body).unwrap(),
                ));
                let message = json!({"id": "msg_1", "type": "message", "role": "assistant",
                "model": "claude-mock", "content": [{"type": "text", "text": "hi"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 5, "output_tokens": 1}});
                let mut r = warp::reply::Response::new(message.to_string().into());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            },
        );
    let upstream = Mock::serve(route).await;
    let Some(h) = harness(upstream.addr, MockOptions::default()).await else {
        return;
    };
    let (_, key) = h.funded("1").await;
    let body = json!({"model": "claude", "temperature": 1.7, "stop": "END", "user": "u-1",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "required", "parallel_tool_calls": false,
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {"role": "user", "content": "and?"}
    ]});
    let r = h.chat(&key, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    let seen = seen.lock().unwrap().clone();
    let (path, api_key, version, authorization, sent) = &seen[0];
    assert_eq!(path, "/v1/messages");
    assert_eq!(api_key.as_deref(), Some(env!("CARGO_PKG_NAME")));
    assert_eq!(version.as_deref(), Some("2023-06-01"));
    assert_eq!(authorization, &None);
    assert_eq!(
        sent,
        &json!({
            "model": "claude-mock",
            // The model's own output limit: the client set none, and the API wants one.
            "max_tokens": 1000,
            "temperature": 1.0,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u-1"},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "done"},
                    {"type": "text", "text": "and?"}]}
            ]
        })
    );
    h.stop().await;
}
