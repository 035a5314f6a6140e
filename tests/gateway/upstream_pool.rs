//! The gateway's upstream connections (`actors/src/upstream.rs`): kept alive and reused
//! between calls, streamed or not; never reused once the upstream closed them, whether it
//! said so (`Connection: close`) or just hung up while they were idle; closed after the idle
//! timeout; and each call's response read by the call's own task without losing a byte.
//! Connections are counted where the upstream accepts them, not by the gateway's own figures.

use crate::common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::mock::MockOptions;

/// What an upstream of this file's own saw: connections accepted, and connections the gateway
/// has closed since.
#[derive(Clone, Default)]
struct Seen {
    accepted: Arc<AtomicUsize>,
    closed_by_gateway: Arc<AtomicUsize>,
}

impl Seen {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn closed_by_gateway(&self) -> usize {
        self.closed_by_gateway.load(Ordering::SeqCst)
    }
    /// Waits until the gateway has closed a connection; the 5 s bound only guards against
    /// a hang.
    async fn wait_for_a_close_by_the_gateway(&self, otherwise: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.closed_by_gateway() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "{otherwise}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A loopback port in front of `target` (the mock upstream) that counts the connections made
/// to it and passes their bytes through both ways.
async fn counting_front(target: SocketAddr) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            let closed = counts.closed_by_gateway.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

/// How [`raw_upstream`] ends each connection after its answer.
#[derive(Clone, Copy)]
enum Ending {
    /// Says `Connection: close`, then closes.
    SaysClose,
    /// Says nothing and closes once `after` has passed with no next request (a keep-alive
    /// timeout as servers have).
    HangsUpIdle { after: Duration },
}

/// An OpenAI-compatible upstream written on a bare socket, answering every request with the
/// same non-streamed completion (usage 7 + 3 tokens) and ending its connections as `ending`
/// says.
async fn raw_upstream(ending: Ending) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_raw(stream, ending));
        }
    });
    (addr, seen)
}

async fn serve_raw(mut stream: TcpStream, ending: Ending) {
    let mut buf = Vec::new();
    loop {
        let wait = match ending {
            Ending::HangsUpIdle { after } => after,
            Ending::SaysClose => Duration::from_secs(30),
        };
        let Ok(Some((head_end, body_len))) =
            tokio::time::timeout(wait, read_head(&mut stream, &mut buf))
                .await
                .map(|r| r.ok().flatten())
        else {
            return; // idle too long, or the gateway closed: hang up
        };
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let body = json!({
            "id": "chatcmpl-raw", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "raw answer"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        })
        .to_string();
        let close = matches!(ending, Ending::SaysClose);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if stream
            .write_all(format!("{head}{body}").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Reads until `buf` holds a request head; returns where the head ends and the body's
/// declared length. `None` at the end of the connection.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(usize, usize)>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            return Ok(Some((end + 4, len)));
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await? {
            0 => return Ok(None),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A gateway whose provider is at `upstream` instead of the harness's own mock.
async fn gateway_at(upstream: SocketAddr, idle_ms: u64) -> Harness {
    Harness::start_with(Backend::Sqlite, MockOptions::default(), move |config| {
        config.providers[0].base_url = format!("http://{upstream}/v1");
        config.providers[0].idle_connection_timeout_ms = idle_ms;
    })
    .await
    .expect("sqlite harness")
}

async fn provider(h: &Harness) -> Value {
    let v = h
        .admin(reqwest::Method::GET, "/admin/providers")
        .send_json()
        .await;
    v["data"][0].clone()
}

/// Waits until the provider has `n` idle connections; the 5 s bound only guards against a
/// hang.
async fn idle_connections_reach(h: &Harness, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let idle = provider(h).await["idle_connections"].as_u64().unwrap();
        if idle == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{idle} idle connections, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ask(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 5,
           "messages": [{"role": "user", "content": "hello there"}]})
}

async fn ok_completion(h: &Harness, key: &str) -> Value {
    let r = h.chat(key, &ask(false)).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The mock, behind a front that counts connections.
async fn counted_mock(options: MockOptions) -> (Mock, SocketAddr, Seen) {
    let mock = Mock::start(options).await;
    let (front, seen) = counting_front(mock.addr).await;
    (mock, front, seen)
}

#[tokio::test]
async fn calls_one_after_another_share_one_upstream_connection_streamed_or_not() {
    let (_mock, front, seen) = counted_mock(MockOptions::default()).await;
    let h = gateway_at(front, 90_000).await;
    let (account, key) = h.funded("1").await;
    for i in 0..12 {
        if i % 3 == 2 {
            let events = sse_events(h.chat(&key, &ask(true)).await).await;
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            // Content arrived whole, in order: the mock echoes the prompt's words.
            let text: String = events
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .filter_map(|v| {
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            assert!(text.contains("hello") && text.contains("there"), "{text}");
            // The connection goes back once the rest of the upstream body is read, in the
            // background just after [DONE]; the next call would otherwise open another.
            idle_connections_reach(&h, 1).await;
        } else {
            let v = ok_completion(&h, &key).await;
            assert_eq!(v["object"], "chat.completion");
        }
    }
    let _ = ok_completion(&h, &key).await;
    assert_eq!(seen.accepted(), 1, "one connection served all 13 calls");
    assert_eq!(seen.closed_by_gateway(), 0);
    let p = provider(&h).await;
    assert_eq!(p["connections_opened"], 1);
    assert_eq!(p["idle_connections"], 1);
    assert_eq!(p["calls_failed"], 0);
    assert_eq!(h.usage_once_n_settled(&account, 13).await.len(), 13);
    h.stop().await;
}

#[tokio::test]
async fn concurrent_calls_open_no_more_connections_than_calls_and_then_reuse_them() {
    let (_mock, front, seen) = counted_mock(MockOptions {
        latency: Duration::from_millis(50),
        ..MockOptions::default()
    })
    .await;
    let h = gateway_at(front, 90_000).await;
    let (account, key) = h.funded("1").await;
    let calls = futures::stream::iter(0..16)
        .map(|i| {
            let h = &h;
            let key = &key;
            async move { h.chat(key, &ask(i % 2 == 0)).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for r in calls {
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    let opened = seen.accepted();
    assert!(
        (1..=16).contains(&opened),
        "{opened} connections for 16 calls"
    );
    // Every connection goes back to the pool (the streamed calls' just after their [DONE]).
    idle_connections_reach(&h, opened as u64).await;
    // The same again, one at a time: nothing new is opened.
    for _ in 0..8 {
        let _ = ok_completion(&h, &key).await;
    }
    assert_eq!(seen.accepted(), opened);
    assert_eq!(h.usage_once_n_settled(&account, 24).await.len(), 24);
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_that_says_connection_close_gets_a_new_connection_each_call() {
    let (upstream, seen) = raw_upstream(Ending::SaysClose).await;
    let h = gateway_at(upstream, 90_000).await;
    let (account, key) = h.funded("1").await;
    for _ in 0..5 {
        let v = ok_completion(&h, &key).await;
        assert_eq!(v["choices"][0]["message"]["content"], "raw answer");
    }
    assert_eq!(seen.accepted(), 5);
    let p = provider(&h).await;
    assert_eq!(p["idle_connections"], 0);
    assert_eq!(p["calls_failed"], 0);
    let usage = h.usage_once_n_settled(&account, 5).await;
    assert!(usage
        .iter()
        .all(|u| u["prompt_tokens"] == 7 && u["status"] == 200));
    h.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_hung_up_while_idle_is_not_used_again() {
    // The upstream keeps an idle connection 500 ms; the calls come 800 ms apart, so each
    // finds its pooled connection closed by the upstream, without having been told.
    let (upstream, seen) = raw_upstream(Ending::HangsUpIdle {
        after: Duration::from_millis(500),
    })
    .await;
    let h = gateway_at(upstream, 90_000).await;
    let (account, key) = h.funded("1").await;
    for _ in 0..4 {
        let v = ok_completion(&h, &key).await;
        assert_eq!(v["usage"]["completion_tokens"], 3);
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    assert_eq!(seen.accepted(), 4);
    let p = provider(&h).await;
    assert_eq!(
        p["calls_failed"], 0,
        "no call was sent on a dead connection"
    );
    assert_eq!(p["health"], "healthy");
    // Back to back, the upstream keeps the connection: one more for all of these.
    for _ in 0..5 {
        let _ = ok_completion(&h, &key).await;
    }
    assert_eq!(seen.accepted(), 5);
    assert_eq!(h.usage_once_n_settled(&account, 9).await.len(), 9);
    h.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (_mock, front, seen) = counted_mock(MockOptions::default()).await;
    let h = gateway_at(front, 1_000).await;
    let (_, key) = h.funded("1").await;
    let _ = ok_completion(&h, &key).await;
    assert_eq!(provider(&h).await["idle_connections"], 1);
    // Closed by the gateway's timer, with no call to notice it: at most 1 s plus a quarter
    // of it.
    seen.wait_for_a_close_by_the_gateway("the idle connection is still open")
        .await;
    assert_eq!(provider(&h).await["idle_connections"], 0);
    let _ = ok_completion(&h, &key).await;
    assert_eq!(seen.accepted(), 2);
    h.stop().await;
}

#[tokio::test]
async fn a_stream_its_client_leaves_closes_its_upstream_connection_and_the_next_call_works() {
    let (_mock, front, seen) = counted_mock(MockOptions {
        chunks: 200,
        chunk_interval: Duration::from_millis(10),
        ..MockOptions::default()
    })
    .await;
    let h = gateway_at(front, 90_000).await;
    let (account, key) = h.funded("1").await;
    let long = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 200,
                      "messages": [{"role": "user", "content": "hello there"}]});
    let r = h.chat(&key, &long).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(body); // the client leaves mid-stream
    seen.wait_for_a_close_by_the_gateway("the upstream connection was left open")
        .await;
    let v = ok_completion(&h, &key).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(seen.accepted(), 2);
    let usage = h.usage_once_n_settled(&account, 2).await;
    assert!(usage.iter().any(|u| u["status"] == 499));
    h.stop().await;
}
