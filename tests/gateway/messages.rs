//! The Anthropic Messages API (`POST /v1/messages`) over the wire: what a Messages request
//! becomes upstream, a stream the upstream breaks off, and requests the gateway refuses. The
//! official Anthropic SDK's own run is in `sdk.rs`.

use crate::common::*;
use crate::forwarding::{harness, Recorder};
use serde_json::{json, Value};

async fn post(h: &Harness, key: &str, body: &Value) -> reqwest::Response {
    h.http
        .post(format!("{}/v1/messages", h.base))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_messages_request_goes_upstream_as_the_chat_request_it_means() {
    let recorder = Recorder::start().await;
    let Some(h) = harness(&recorder).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let request = json!({
        "model": "renamed",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in the picture, and the weather?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hidden", "signature": "s"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "rain"}]},
                {"type": "text", "text": "Thanks."}
            ]}
        ],
        "tools": [{"name": "weather", "description": "Weather by city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_k": 40,
        "metadata": {"user_id": "user-7"}
    });
    let r = post(&h, &key, &request).await;
    assert_eq!(r.status(), 200);
    let message: Value = r.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["content"], json!([{"type": "text", "text": "ok"}]));
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 7, "output_tokens": 1,
            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0})
    );

    let sent: Value = serde_json::from_str(&recorder.bodies()[0]).unwrap();
    assert_eq!(
        sent,
        json!({
            "model": "vendor-model-7",
            "max_tokens": 50,
            "messages": [
                {"role": "system", "content": "Be brief.\n\nUse tools."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in the picture, and the weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                ]},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [
                    {"id": "toolu_1", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
                {"role": "user", "content": [{"type": "text", "text": "Thanks."}]}
            ],
            "tools": [{"type": "function", "function": {"name": "weather",
                "description": "Weather by city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "stop": ["END"],
            "temperature": 0.5,
            "user": "user-7"
        })
    );
    // Charged once, on the upstream's usage, like any call.
    h.assert_charged_once_from_one_usdt(
        &account,
        expected_cost(1_000_000_000, 1_000_000_000, 7, 1),
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn a_stream_the_upstream_breaks_off_ends_with_an_error_event_and_is_charged() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let body = json!({"model": "breaks", "max_tokens": 10, "stream": true,
        "messages": [{"role": "user", "content": "x y"}]});
    let r = post(&h, &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let data = data.strip_prefix("data: ").unwrap();
            (
                name.strip_prefix("event: ").unwrap(),
                serde_json::from_str(data).unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "error"
        ],
        "{text}"
    );
    assert_eq!(
        events[2].1["delta"],
        json!({"type": "text_delta", "text": "x"})
    );
    assert_eq!(events[3].1["error"]["type"], "api_error");
    let u = &h.usage(&account).await[0];
    assert_eq!(
        (&u["status"], &u["completion_tokens"]),
        (&json!(502), &json!(1))
    );
    h.stop().await;
}

#[tokio::test]
async fn what_the_messages_api_cannot_carry_is_refused_in_both_error_shapes() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let ask = json!([{"role": "user", "content": "x"}]);
    for (body, says) in [
        (
            json!({"model": "gpt-4o-mini", "messages": ask}),
            "`max_tokens` is required",
        ),
        (
            json!({"model": "gpt-4o-mini", "max_tokens": 5}),
            "`messages` is required",
        ),
        (
            json!({"max_tokens": 5, "messages": ask}),
            "`model` is required",
        ),
        (
            json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": ask, "thinking": {"type": "enabled"}}),
            "`thinking` is not supported",
        ),
        (
            json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
            "`document` are not supported",
        ),
        (
            json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": ask, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "server tools are not supported",
        ),
        (
            json!({"model": "gpt-4o-mini", "max_tokens": -1, "messages": ask}),
            "`max_tokens` must be",
        ),
    ] {
        let r = post(&h, &key, &body).await;
        assert_eq!(r.status(), 400, "{body}");
        assert!(r.headers().contains_key("x-request-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_error_shape(&v, "invalid_request_error");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message} (wanted {says})");
    }
    // No key, by either header: 401 in the same shape.
    let r = h
        .http
        .post(format!("{}/v1/messages", h.base))
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": ask}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_error_shape(&v, "invalid_api_key");
    assert!(
        h.usage(&account).await.is_empty(),
        "nothing reached the upstream"
    );
    h.stop().await;
}
