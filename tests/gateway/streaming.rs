//! Streams pass through chunk by chunk; a client that hangs up stops the upstream call and is
//! charged for what was delivered (docs/billing.md).

use crate::both_stores;
use crate::common::*;
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};
use tollgate::mock::MockOptions;
use tollgate_actors::Amount;

fn slow_mock() -> MockOptions {
    MockOptions {
        chunks: 40,
        chunk_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

async fn chunks_arrive_as_they_are_produced(backend: Backend) {
    let Some(h) = Harness::start_with(backend, slow_mock(), |_| {}).await else {
        return;
    };
    let (_, key) = h.funded("1").await;
    let started = Instant::now();
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "one two three"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    // The whole stream takes ~2 s upstream; the first chunk must not wait for it.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "first chunk after {:?}",
        started.elapsed()
    );
    assert!(first.starts_with(b"data: "));
    let mut rest = Vec::new();
    while let Some(c) = body.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    h.stop().await;
}
both_stores!(chunks_arrive_as_they_are_produced);

async fn client_disconnect_settles_what_was_delivered(backend: Backend) {
    let Some(h) = Harness::start_with(backend, slow_mock(), |_| {}).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let prompt = "alpha beta gamma delta";
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": prompt}]}))
        .await;
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while seen.matches("\"content\":\"").count() < 6 {
        seen.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    drop(body); // hang up

    // The relay notices, stops the upstream call and settles.
    let usage = h.usage_once_settled(&account).await;
    assert_eq!(usage.len(), 1, "settled after disconnect");
    let u = &usage[0];
    assert_eq!(u["request_id"], request_id.as_str());
    assert_eq!(u["status"], 499);
    assert_eq!(u["usage_source"], "estimated");
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!(
        (5..40).contains(&completion),
        "delivered tokens {completion}"
    );
    let cost: Amount = u["cost"].as_str().unwrap().parse().unwrap();
    assert!(cost.nanos() > 0);
    h.assert_charged_once_from_one_usdt(&account, cost).await;
    h.stop().await;
}
both_stores!(client_disconnect_settles_what_was_delivered);

async fn upstream_breaking_off_is_charged_for_what_arrived(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let resp = h
        .chat(&key, &json!({"model": "breaks", "stream": true, "messages": [{"role": "user", "content": "x y"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let u = &h.usage(&account).await[0];
    assert_eq!(u["status"], 502);
    assert_eq!(u["completion_tokens"], 1);
    h.stop().await;
}
both_stores!(upstream_breaking_off_is_charged_for_what_arrived);

/// A stream's head waits a moment for the first content, to go out in one write with it, but
/// not for an upstream that takes its time: here the upstream sends its role chunk and then
/// nothing until the client has seen the head.
#[tokio::test]
async fn the_head_does_not_wait_for_a_slow_first_token() {
    use crate::proxy::plain_provider;
    use crate::tls::model;
    use std::sync::{Arc, Mutex};
    use warp::Filter;

    let chunk = |delta: &str| {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\
             \"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let role = chunk(r#"{"role":"assistant","content":""}"#);
    let rest = chunk(r#"{"content":"late"}"#)
        + "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\
           \"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n"
        + "data: [DONE]\n\n";
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(Mutex::new(Some(released)));
    let route =
        warp::post()
            .and(warp::body::bytes())
            .map(move |_: bytes::Bytes| {
                let released = released.lock().unwrap().take();
                let (role, rest) = (role.clone(), rest.clone());
                sse_reply(futures::stream::once(async move { Ok(role) }).chain(
                    futures::stream::once(async move {
                        if let Some(released) = released {
                            let _ = released.await;
                        }
                        Ok(rest)
                    }),
                ))
            });
    let upstream = Mock::serve(route).await;
    let Some(h) = Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.providers.push(plain_provider(
            "thinker",
            upstream.addr,
            Some("direct".to_owned()),
        ));
        c.models.push(model("thinker", "thinker"));
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    // The upstream sends its first content only once this has the head and the role chunk;
    // the 2 s allowed for those are under the provider's 3 s idle timeout, after which the
    // head would go out with an error instead.
    let resp = tokio::time::timeout(
        Duration::from_secs(2),
        h.chat(&key, &json!({"model": "thinker", "stream": true, "messages": [{"role": "user", "content": "think"}]})),
    )
    .await
    .expect("the head waited for the first token");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"role\":\"assistant\"") {
        let next = tokio::time::timeout(Duration::from_secs(2), body.next())
            .await
            .expect("the role chunk waited for the first token");
        seen.push_str(&String::from_utf8_lossy(&next.unwrap().unwrap()));
    }
    assert!(!seen.contains("late"));
    release.send(()).unwrap();
    while let Some(c) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(seen.contains("\"content\":\"late\""), "{seen}");
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
    let usage = h.usage_once_settled(&account).await;
    assert_eq!(usage[0]["status"], 200);
    assert_eq!(usage[0]["completion_tokens"], 1);
    h.stop().await;
}

/// The benchmark's mock stamps each content chunk with its send time, and the stamps reach
/// the client through the gateway as sent (`examples/stream_probe.rs` times each chunk's
/// transit from them); without the option a chunk carries no stamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamped_chunks_reach_the_client_as_sent() {
    let wall_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    for stamp_chunks in [true, false] {
        let mock = MockOptions {
            chunks: 5,
            chunk_interval: Duration::from_millis(2),
            stamp_chunks,
            ..Default::default()
        };
        let h = Harness::start_with(Backend::Sqlite, mock, |_| {})
            .await
            .expect("sqlite harness");
        let (_, key) = h.funded("1").await;
        let before = wall_us();
        let resp = h
            .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "one two three"}]}))
            .await;
        assert_eq!(resp.status(), 200);
        let events = sse_events(resp).await;
        let after = wall_us();
        let chunks: Vec<serde_json::Value> = events
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect();
        let content = |c: &&serde_json::Value| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        };
        let stamps: Vec<Option<u64>> = chunks
            .iter()
            .filter(content)
            .map(|c| c["mock_sent_us"].as_u64())
            .collect();
        assert_eq!(stamps.len(), 5, "content chunks in {events:?}");
        if stamp_chunks {
            let stamps: Vec<u64> = stamps.into_iter().map(|s| s.expect("a stamp")).collect();
            assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
            assert!(
                before <= stamps[0] && stamps[4] <= after,
                "{before} {stamps:?} {after}"
            );
        } else {
            assert!(stamps.iter().all(Option::is_none), "{stamps:?}");
        }
        // Only content chunks are stamped.
        assert!(chunks
            .iter()
            .filter(|c| !content(c))
            .all(|c| c.get("mock_sent_us").is_none()));
        h.stop().await;
    }
}

/// `stream_idle_timeout_ms` bounds the silence between two upstream events, not the stream:
/// a stream whose events come closer than that runs for as long as it lasts, and one that goes
/// silent after its first word ends with an error event after that long, charged for what was
/// delivered (status 502, docs/billing.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_counts_from_the_last_event() {
    use crate::proxy::plain_provider;
    use crate::tls::model;
    use warp::Filter;

    let route = warp::post()
        .and(warp::body::bytes())
        .map(|_: bytes::Bytes| {
            let first = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\
                     \"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"only\"},\
                     \"finish_reason\":null}]}\n\n";
            sse_reply(
                futures::stream::once(async move { Ok(first) }).chain(futures::stream::pending()),
            )
        });
    let silent = Mock::serve(route).await;
    let mock = MockOptions {
        chunks: 8,
        chunk_interval: Duration::from_millis(150),
        ..Default::default()
    };
    let idle_ms = 400;
    let h = Harness::start_with(Backend::Sqlite, mock, |c| {
        c.providers[0].stream_idle_timeout_ms = idle_ms;
        let mut p = plain_provider("silent", silent.addr, Some("direct".to_owned()));
        p.stream_idle_timeout_ms = idle_ms;
        c.providers.push(p);
        c.models.push(model("silent", "silent"));
    })
    .await
    .expect("sqlite harness");
    let (account, key) = h.funded("1").await;

    // Eight words 150 ms apart: over a second in all, never 400 ms without an event.
    let started = Instant::now();
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "one two three"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        started.elapsed() > Duration::from_millis(idle_ms),
        "{:?}",
        started.elapsed()
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("\"content\":\"").count(), 9, "{text}"); // the role chunk's "" and 8 words

    // One word, then silence.
    let started = Instant::now();
    let resp = h
        .chat(&key, &json!({"model": "silent", "stream": true, "messages": [{"role": "user", "content": "hello"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("the silent stream was not ended")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(idle_ms),
        "{:?}",
        started.elapsed()
    );
    assert!(text.contains("\"content\":\"only\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(text.contains("\"error\""), "{text}");

    let usage = h.usage_once_n_settled(&account, 2).await;
    assert_eq!(usage.len(), 2, "{usage:?}");
    let mut statuses: Vec<u64> = usage
        .iter()
        .map(|u| u["status"].as_u64().unwrap())
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 502]);
    let cut = usage.iter().find(|u| u["status"] == 502).unwrap();
    assert_eq!(cut["completion_tokens"], 1);
    assert_eq!(cut["usage_source"], "estimated");
    h.stop().await;
}

/// An upstream that sends a whole stream in one write (the mock's `burst`): the gateway reads
/// hundreds of events at once and hands them to its SSE parser a piece at a time
/// (`src/http/pieces.rs`). Every event reaches the client whole and in order, and the call is
/// charged by the upstream's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sent_in_one_write_arrives_whole_and_in_order() {
    const CHUNKS: usize = 600;
    let mock = MockOptions {
        chunks: CHUNKS as u64,
        burst: true,
        ..Default::default()
    };
    let h = Harness::start_with(Backend::Sqlite, mock, |_| {})
        .await
        .expect("sqlite harness");
    let (account, key) = h.funded("1").await;
    let words: Vec<String> = (0..7).map(|i| format!("w{i}é")).collect();
    let prompt = words.join(" ");
    let resp = h
        .chat(
            &key,
            &json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": CHUNKS,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("each event whole"))
        .collect();
    let content: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let expected: Vec<String> = (0..CHUNKS)
        .map(|i| match i {
            0 => words[0].clone(),
            _ => format!(" {}", words[i % words.len()]),
        })
        .collect();
    assert_eq!(content, expected);
    let usage = chunks
        .last()
        .map(|c| c["usage"].clone())
        .unwrap_or_default();
    assert_eq!(usage["completion_tokens"], CHUNKS);

    let u = &h.usage_once_settled(&account).await[0];
    assert_eq!(u["status"], 200);
    assert_eq!(u["usage_source"], "upstream");
    assert_eq!(u["completion_tokens"], CHUNKS);
    let prompt_tokens = mock_prompt_tokens(&[&prompt]);
    assert_eq!(u["prompt_tokens"], prompt_tokens);
    let cost = expected_cost(150_000_000, 600_000_000, prompt_tokens, CHUNKS as u64);
    assert_eq!(u["cost"], cost.to_string());
    h.stop().await;
}

/// The mock's `burst` sends a streamed answer as one HTTP chunk; without it, each event is a
/// chunk of its own. Read off the wire, where the chunked encoding shows the writes.
#[tokio::test]
async fn the_mock_sends_a_burst_in_one_chunk() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for burst in [true, false] {
        let mock = Mock::start(MockOptions {
            chunks: 20,
            burst,
            ..Default::default()
        })
        .await;
        let body =
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"a b"}]}"#;
        let mut conn = tokio::net::TcpStream::connect(mock.addr).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, mut rest) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        let mut sizes = Vec::new();
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size, 16).unwrap();
            if size == 0 {
                break;
            }
            assert!(after[size..].starts_with("\r\n"));
            sizes.push(size);
            rest = &after[size + 2..];
        }
        let data: usize = sizes.iter().sum();
        assert!(data > 20 * 50, "{sizes:?}");
        if burst {
            assert_eq!(sizes.len(), 1, "{sizes:?}");
        } else {
            // The role chunk, 20 words, the finish chunk and [DONE].
            assert_eq!(sizes.len(), 23, "{sizes:?}");
        }
    }
}

/// `limits.max_upstream_answer_bytes` bounds one event of a stream, not the stream: many
/// events under it pass to `[DONE]`; an event over it ends the stream as an upstream that broke
/// off does (an error event, status 502), charged for what was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_limit_ends_the_stream() {
    use crate::proxy::plain_provider;
    use crate::tls::model;
    use warp::Filter;

    const LIMIT: usize = 4096;
    let chunk = |delta: String| {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\
             \"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let events = [
        chunk(r#"{"role":"assistant","content":""}"#.to_owned()),
        chunk(r#"{"content":"fits"}"#.to_owned()),
        chunk(format!(r#"{{"content":"{}"}}"#, "x".repeat(2 * LIMIT))),
        "data: [DONE]\n\n".to_owned(),
    ];
    let route = warp::post()
        .and(warp::body::bytes())
        .map(move |_: bytes::Bytes| {
            let events = events.clone().map(Ok::<_, std::io::Error>);
            sse_reply(futures::stream::iter(events))
        });
    let upstream = Mock::serve(route).await;
    let mock = MockOptions {
        chunks: 100,
        ..Default::default()
    };
    let h = Harness::start_with(Backend::Sqlite, mock, |c| {
        c.limits.max_upstream_answer_bytes = LIMIT;
        c.providers.push(plain_provider(
            "big",
            upstream.addr,
            Some("direct".to_owned()),
        ));
        c.models.push(model("big", "big"));
    })
    .await
    .expect("sqlite harness");
    let (account, key) = h.funded("1").await;

    // 100 events of about 200 bytes: five times the limit in all, each well under it.
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "many small"}]}))
        .await;
    let events = sse_events(resp).await;
    assert!(events.iter().map(String::len).sum::<usize>() > 4 * LIMIT);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let resp = h
        .chat(&key, &json!({"model": "big", "stream": true, "messages": [{"role": "user", "content": "one large"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    assert!(
        events.iter().any(|e| e.contains("\"content\":\"fits\"")),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| e.contains("xxxx") || e == "[DONE]"),
        "{events:?}"
    );
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error");

    let usage = h.usage_once_n_settled(&account, 2).await;
    let u = usage
        .iter()
        .find(|u| u["model"] == "big")
        .expect("the large event's call");
    assert_eq!(u["status"], 502);
    assert_eq!(u["usage_source"], "estimated");
    assert_eq!(u["completion_tokens"], 1, "the one content chunk delivered");
    let cost: Amount = u["cost"].as_str().unwrap().parse().unwrap();
    assert!(cost.nanos() > 0);
    h.stop().await;
}
