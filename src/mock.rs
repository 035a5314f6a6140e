//! A mock OpenAI-compatible upstream, for tests, demos and load tests.
//!
//! It answers `POST …/chat/completions`, streamed or not, echoing the words of the last user
//! message (so a test can see content pass through) with usage figures it computes the same
//! way every time: prompt tokens = Σ(ceil(len(content)/4) + 4) + 3 over the messages, and one
//! completion token per word sent, `min(chunks, max_tokens)` of them.
//!
//! It also answers `POST …/messages` as Anthropic's Messages API does (the same words and
//! the same token formula, `system` counted as one more message), for providers of kind
//! `anthropic`; there `mock-tool` answers with a call of tool `lookup`.
//!
//! Upstream model names with special behaviour: `mock-error` (500), `mock-bad-request` (400),
//! `mock-rate-limited` (429, `retry-after: 7`), `mock-hang` (never answers), `mock-no-usage` (omits usage),
//! `mock-break` (a stream that ends after its first word, without `[DONE]`), `mock-linger`
//! (a stream whose body ends 100 ms after its `[DONE]`).

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use http::{HeaderValue, StatusCode};
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use warp::reply::Response;
use warp::Filter;

#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Delay before the first byte of the answer.
    pub latency: Duration,
    /// Completion tokens (one word per streamed chunk) when max_tokens does not say fewer.
    pub chunks: u64,
    pub chunk_interval: Duration,
    /// Each streamed content chunk carries `"mock_sent_us"`, the wall clock in microseconds
    /// when the mock handed it to its connection. A client on the same machine can then tell
    /// each chunk's transit, and how much a proxy in between stretched the gaps between
    /// chunks, without the spread of the mock's own timer (`examples/stream_probe.rs`).
    pub stamp_chunks: bool,
    /// A streamed answer goes out whole, in one write, once its last event is made (after
    /// `chunks × chunk_interval`): as from an upstream behind a buffering proxy, or one
    /// faster than its reader. The gateway then reads many events at once.
    pub burst: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            latency: Duration::ZERO,
            chunks: 16,
            chunk_interval: Duration::ZERO,
            stamp_chunks: false,
            burst: false,
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    options: MockOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let options = Arc::new(options);
    let route = warp::post()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .then(
            move |path: warp::path::FullPath, headers: http::HeaderMap, body: Bytes| {
                let options = options.clone();
                async move {
                    let path = path.as_str();
                    if path.ends_with("/chat/completions") {
                        complete(&options, &body).await
                    } else if path.ends_with("/messages") {
                        messages(&options, &headers, &body).await
                    } else {
                        error(StatusCode::NOT_FOUND, "no such route")
                    }
                }
            },
        );
    // Our own server, so the mock, like the gateway, sends each chunk without Nagle's delay.
    // No header timeout: a client's pooled idle connections stay open, as a real upstream's do
    // for longer than any test or benchmark here waits.
    let limits = crate::config::Limits {
        header_read_timeout_ms: 0,
        body_read_timeout_ms: 0,
        ..Default::default()
    };
    crate::server::serve(listener, route, &limits, shutdown).await;
}

/// Microseconds since the Unix epoch: a clock that two processes on one machine share.
fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "mock_error", "code": null}});
    let mut r = Response::new(Bytes::from(body.to_string()).into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

async fn complete(options: &MockOptions, body: &[u8]) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_owned();
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match model.as_str() {
        "mock-error" => return error(StatusCode::INTERNAL_SERVER_ERROR, "mock failure"),
        "mock-bad-request" => {
            return error(StatusCode::BAD_REQUEST, "mock says the request is wrong")
        }
        "mock-rate-limited" => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "mock rate limit");
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("7"));
            return r;
        }
        "mock-hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return error(StatusCode::GATEWAY_TIMEOUT, "hung");
        }
        _ => {}
    }
    let prompt_tokens: u64 = messages
        .iter()
        .map(|m| (text_of(m.get("content")).len() as u64).div_ceil(4) + 4)
        .sum::<u64>()
        + 3;
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| text_of(m.get("content")))
        .unwrap_or_default();
    let mut words: Vec<String> = last_user.split_whitespace().map(str::to_owned).collect();
    if words.is_empty() {
        words.push("ok".to_owned());
    }
    let limit = request
        .get("max_completion_tokens")
        .or(request.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let n = options.chunks.min(limit);
    let finish = if n < options.chunks { "length" } else { "stop" };
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n});
    let with_usage = model != "mock-no-usage";
    let id = format!("chatcmpl-mock{}", uuid::Uuid::now_v7().simple());
    let created = tollgate_actors::store::now_ms() / 1000;
    // No sleep at all for zero latency: even a zero sleep waits for the timer's next tick (~1 ms).
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }

    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let content: Vec<&str> = (0..n as usize)
            .map(|i| words[i % words.len()].as_str())
            .collect();
        let mut body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content.join(" ")}, "finish_reason": finish}],
        });
        if with_usage {
            body["usage"] = usage;
        }
        let mut r = Response::new(Bytes::from(body.to_string()).into());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return r;
    }

    let include_usage = with_usage
        && request
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let interval = options.chunk_interval;
    let breaks = model == "mock-break";
    let lingers = model == "mock-linger";
    let stamps = options.stamp_chunks;
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let frame = |c: Value| Bytes::from(format!("data: {c}\n\n"));
        if tx
            .send(Ok(frame(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))))
            .await
            .is_err()
        {
            return;
        }
        for i in 0..n as usize {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            let word = if i == 0 {
                words[0].clone()
            } else {
                format!(" {}", words[i % words.len()])
            };
            let mut content = chunk(json!({"content": word}), Value::Null);
            if stamps {
                content["mock_sent_us"] = json!(wall_clock_us());
            }
            if tx.send(Ok(frame(content))).await.is_err() {
                return;
            }
            if breaks {
                // The body ends here: no finish_reason, no usage, no [DONE].
                return;
            }
        }
        if tx
            .send(Ok(frame(chunk(json!({}), json!(finish)))))
            .await
            .is_err()
        {
            return;
        }
        if include_usage {
            let last = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage});
            if tx
                .send(Ok(Bytes::from(format!("data: {last}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        if lingers {
            // The body's end (the chunked encoding's last chunk) follows later, on its own.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let events = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r = if options.burst {
        let whole = events.try_fold(BytesMut::new(), |mut whole, event| async move {
            whole.extend_from_slice(&event);
            Ok(whole)
        });
        let once = futures::stream::once(async move { whole.await.map(BytesMut::freeze) });
        warp::reply::Reply::into_response(warp::reply::stream(once))
    } else {
        warp::reply::Reply::into_response(warp::reply::stream(events))
    };
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// An error in the Messages API's shape.
fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut r = error(status, message);
    *r.body_mut() = Bytes::from(body.to_string()).into();
    r
}

/// Text of Messages content: a string, or its blocks' text (tool results' too), joined.
fn message_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| match b.get("content") {
                Some(inner) => Some(message_text(Some(inner))),
                None => b.get("text").and_then(Value::as_str).map(str::to_owned),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// `POST …/messages`, as Anthropic's Messages API answers: `anthropic-version` and
/// `max_tokens` required, the answer a message or a stream of its events.
async fn messages(options: &MockOptions, headers: &http::HeaderMap, body: &[u8]) -> Response {
    let invalid = |m: &str| anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", m);
    if !headers.contains_key("anthropic-version") {
        return invalid("anthropic-version: header is required");
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return invalid("body is not JSON");
    };
    let Some(max_tokens) = request.get("max_tokens").and_then(Value::as_u64) else {
        return invalid("max_tokens: Field required");
    };
    let model = request["model"].as_str().unwrap_or("mock").to_owned();
    match model.as_str() {
        "mock-error" => {
            return anthropic_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "mock failure",
            )
        }
        "mock-rate-limited" => {
            let mut r = anthropic_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "mock rate limit",
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("7"));
            return r;
        }
        _ => {}
    }
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let texts: Vec<String> = request
        .get("system")
        .map(|s| message_text(Some(s)))
        .into_iter()
        .chain(messages.iter().map(|m| message_text(m.get("content"))))
        .collect();
    let prompt: u64 = texts
        .iter()
        .map(|t| (t.len() as u64).div_ceil(4) + 4)
        .sum::<u64>()
        + 3;
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| message_text(m.get("content")))
        .unwrap_or_default();
    let mut words: Vec<String> = last_user.split_whitespace().map(str::to_owned).collect();
    if words.is_empty() {
        words.push("ok".to_owned());
    }
    let n = options.chunks.min(max_tokens);
    let id = format!("msg_mock{}", uuid::Uuid::now_v7().simple());
    let tool = model == "mock-tool";
    let stop_reason = if tool {
        "tool_use"
    } else if n < options.chunks {
        "max_tokens"
    } else {
        "end_turn"
    };
    let text: Vec<&str> = (0..n as usize)
        .map(|i| words[i % words.len()].as_str())
        .collect();
    let input = json!({"q": text.join(" ")});
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }

    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let content = if tool {
            json!([{"type": "tool_use", "id": "toolu_mock", "name": "lookup", "input": input}])
        } else {
            json!([{"type": "text", "text": text.join(" ")}])
        };
        let message = json!({"id": id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": prompt, "output_tokens": n,
                "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}});
        let mut r = Response::new(Bytes::from(message.to_string()).into());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return r;
    }

    let frame = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![frame(
        "message_start",
        json!({"type": "message_start", "message": {"id": id, "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": prompt, "output_tokens": 1}}}),
    )];
    if tool {
        let json = input.to_string();
        let (first, rest) = json.split_at(json.len() / 2);
        events.push(frame("content_block_start", json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_mock", "name": "lookup", "input": {}}})));
        for part in [first, rest] {
            events.push(frame(
                "content_block_delta",
                json!({"type": "content_block_delta",
                "index": 0, "delta": {"type": "input_json_delta", "partial_json": part}}),
            ));
        }
    } else {
        events.push(frame(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ));
        events.push(frame("ping", json!({"type": "ping"})));
        for (i, word) in text.iter().enumerate() {
            let word = if i == 0 {
                (*word).to_owned()
            } else {
                format!(" {word}")
            };
            events.push(frame(
                "content_block_delta",
                json!({"type": "content_block_delta",
                "index": 0, "delta": {"type": "text_delta", "text": word}}),
            ));
            if model == "mock-break" {
                break;
            }
        }
    }
    if model != "mock-break" {
        events.push(frame(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(frame(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": n}}),
        ));
        events.push(frame("message_stop", json!({"type": "message_stop"})));
    }
    let stream = futures::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, std::io::Error>(Bytes::from(e))),
    );
    let mut r = warp::reply::Reply::into_response(warp::reply::stream(stream));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}
