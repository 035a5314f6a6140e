//! What reaches the upstream: the client's request as sent, byte for byte, with only the
//! gateway's own edits (the upstream's model name, a lowered `max_tokens`, the usage chunk
//! of a stream); and nothing at all for a body a full JSON parse would refuse.
//!
//! The upstream here records every body it is sent and answers with a fixed completion, or
//! with the failures a test scripts for it (`tests/gateway/failover.rs`).

use crate::common::*;
use crate::proxy::plain_provider;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tollgate::config::ModelConfig;
use tollgate::mock::MockOptions;
use warp::Filter;

/// An upstream that keeps the bodies it is sent.
pub(crate) struct Recorder {
    pub(crate) upstream: Mock,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

/// How a [`Recorder`] answers one request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reply {
    /// An error of this status, in the OpenAI shape.
    Fail(u16),
    /// 429 with `retry-after` of this many seconds.
    Busy(u64),
}

const COMPLETION: &str = r#"{"id":"c1","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}"#;

const STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"ok\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1,\"total_tokens\":8}}\n\n",
    "data: [DONE]\n\n",
);

impl Recorder {
    pub(crate) async fn start() -> Recorder {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let (kept, replies) = (bodies.clone(), script.clone());
        let route = warp::post()
            .and(warp::body::bytes())
            .map(move |body: Bytes| {
                let stream = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("stream").and_then(Value::as_bool))
                    .unwrap_or(false);
                kept.lock().unwrap().push(body);
                if let Some(reply) = replies.lock().unwrap().pop_front() {
                    return failure(reply);
                }
                let (content_type, answer) = if stream {
                    ("text/event-stream", STREAM)
                } else {
                    ("application/json", COMPLETION)
                };
                let mut resp = warp::reply::Response::new(answer.into());
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                resp
            });
        Recorder {
            upstream: Mock::serve(route).await,
            bodies,
            script,
        }
    }

    /// The next requests are answered with `replies`, in order; those after them as before.
    pub(crate) fn then(&self, replies: &[Reply]) {
        self.script.lock().unwrap().extend(replies);
    }

    /// The `model` of every body sent so far, in order.
    pub(crate) fn models(&self) -> Vec<String> {
        self.bodies()
            .iter()
            .map(|b| {
                serde_json::from_str::<Value>(b).unwrap()["model"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    pub(crate) fn bodies(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }
}

fn failure(reply: Reply) -> warp::reply::Response {
    let status = match reply {
        Reply::Fail(status) => status,
        Reply::Busy(_) => 429,
    };
    let body = json!({"error": {"message": format!("scripted {status}"), "type": "scripted", "code": null}});
    let mut resp = warp::reply::Response::new(body.to_string().into());
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Reply::Busy(secs) = reply {
        resp.headers_mut().insert("retry-after", secs.into());
    }
    resp
}

/// A gateway whose model `renamed` (upstream name `vendor-model-7`, 1 USDT per million
/// tokens either way) goes to the recorder.
pub(crate) async fn harness(recorder: &Recorder) -> Option<Harness> {
    let addr = recorder.upstream.addr;
    Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.providers
            .push(plain_provider("recorder", addr, Some("direct".to_owned())));
        c.models.push(ModelConfig {
            id: "renamed".to_owned(),
            provider: "recorder".to_owned(),
            upstream_model: "vendor-model-7".to_owned(),
            input_per_mtok: "1".to_owned(),
            output_per_mtok: "1".to_owned(),
            max_output_tokens: 100_000,
            ..Default::default()
        });
    })
    .await
}

async fn post_raw(h: &Harness, key: &str, body: &str) -> reqwest::Response {
    h.http
        .post(format!("{}/v1/chat/completions", h.base))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_conversation_goes_upstream_byte_for_byte() {
    let recorder = Recorder::start().await;
    let Some(h) = harness(&recorder).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    // Escapes, spacing, number spellings and fields the gateway knows nothing of: a decode and
    // re-encode would change each of them.
    let first = r#"{"role":"user","content":"caf\u00e9, \"quoted\",\n\ttabbed \ud83d\ude00"}"#;
    let second = r#"{ "role" : "assistant",  "content" : "ok" }"#;
    let tools = r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{}}}}]"#;
    let body = format!(
        r#"{{"model":"renamed", "messages":[ {first} ,
            {second}], "temperature":1.0e0, "seed":12345678901234567890, "tools":{tools},
            "max_tokens":5}}"#
    );
    let resp = post_raw(&h, &key, &body).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "ok");

    let sent = recorder.bodies();
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    for verbatim in [
        first,
        second,
        r#""temperature":1.0e0"#,
        r#""seed":12345678901234567890"#,
    ] {
        assert!(sent.contains(verbatim), "{verbatim} not in {sent}");
    }
    assert!(sent.contains(&format!(r#""tools":{tools}"#)), "{sent}");
    let sent: Value = serde_json::from_str(sent).unwrap();
    assert_eq!(sent["model"], "vendor-model-7");
    assert_eq!(sent["max_tokens"], 5);
    assert_eq!(sent["messages"].as_array().unwrap().len(), 2);
    assert!(sent.get("stream_options").is_none());

    // Charged for the recorder's usage: 8 tokens at 1 USDT per million.
    let usage = h.usage_once_settled(&account).await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["cost"], "0.000008");
    h.stop().await;
}

#[tokio::test]
async fn the_gateway_edits_only_max_tokens_the_model_and_the_usage_option() {
    let recorder = Recorder::start().await;
    let Some(h) = harness(&recorder).await else {
        return;
    };
    // 0.001 USDT pays for 1,000 tokens: the body's bytes as the input bound, the rest output.
    let (_, key) = h.funded("0.001").await;
    let body = json!({
        "model": "renamed",
        "messages": [{"role": "user", "content": "hello"}],
        "max_completion_tokens": 50_000,
        "stream": true,
        "stream_options": {"include_usage": false, "include_obfuscation": false},
    });
    let resp = h.chat(&key, &body).await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // The client did not ask for the usage chunk, so it does not get it.
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "{events:?}"
    );

    let sent = recorder.bodies();
    assert_eq!(sent.len(), 1);
    let sent: Value = serde_json::from_str(&sent[0]).unwrap();
    assert_eq!(sent["model"], "vendor-model-7");
    let lowered = sent["max_completion_tokens"].as_u64().unwrap();
    let input_bound = serde_json::to_vec(&body).unwrap().len() as u64;
    assert_eq!(lowered, 1_000 - input_bound);
    assert!(sent.get("max_tokens").is_none(), "{sent}");
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true, "include_obfuscation": false})
    );
    assert_eq!(sent["messages"], body["messages"]);
    h.stop().await;
}

#[tokio::test]
async fn what_a_full_parse_refuses_never_reaches_the_upstream() {
    let recorder = Recorder::start().await;
    let Some(h) = harness(&recorder).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let refused = [
        // A lone surrogate, in a message and in a field the gateway does not read.
        r#"{"model":"renamed","messages":[{"role":"user","content":"\ud800"}]}"#,
        r#"{"model":"renamed","messages":[{"role":"user","content":"x"}],"user":"\udfff"}"#,
        // A number no float holds.
        r#"{"model":"renamed","messages":[{"role":"user","content":"x"}],"temperature":1e400}"#,
        // Nesting past the parser's limit, inside a message.
        &format!(
            r#"{{"model":"renamed","messages":[{{"role":"user","content":{}1{}}}]}}"#,
            "[".repeat(200),
            "]".repeat(200)
        ),
        // Not every message an object.
        r#"{"model":"renamed","messages":[ {"role":"user","content":"x"} , 5]}"#,
        r#"{"model":"renamed","messages":{"role":"user","content":"x"}}"#,
        r#"{"model":"renamed","messages":[]}"#,
    ];
    for body in refused {
        let resp = post_raw(&h, &key, body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_error_shape(&v, "invalid_request_error");
    }
    assert!(recorder.bodies().is_empty());
    assert_eq!(h.balance(&account).await.to_string(), "1");

    // A field sent twice is the last one sent, as a full parse reads it.
    let resp = post_raw(
        &h,
        &key,
        r#"{"model":"no-such-model","model":"renamed","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let sent = recorder.bodies();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].matches("\"model\"").count(), 1, "{}", sent[0]);
    h.stop().await;
}
