//! A streaming load probe for `bench/run.sh`. Not part of the test suite.
//!
//! Sequential mode (default): `--requests N` streamed chat completions one after another
//! (after `--warmup W` unmeasured ones) on one kept-alive connection, measuring
//! - time to first content chunk (TTFT): from just before the request is sent to the arrival
//!   of the first SSE event whose `delta.content` is not empty;
//! - inter-chunk gaps: between the arrivals of consecutive content chunks;
//!
//! and printing p50/p99 of each. From a mock started with `--stamp-chunks`, whose content
//! chunks carry the time they were sent (`mock_sent_us`), also, for every content chunk after
//! the first:
//! - transit: from the mock's send to the probe's read (one clock: the machine's);
//! - gap excess: the gap between two chunks' arrivals less the gap between their sends, i.e.
//!   how much the path stretched that gap, free of the spread of the mock's own timer.
//!
//! Concurrent mode (`--concurrent N`): N streams held open at once (started at
//! `--ramp-per-sec` a second), each read to its end; prints how many completed with
//! `data: [DONE]`, the errors by kind, and the most streams open at the same time.
//!
//! The last line of output is machine-readable: `PROBE key=value …`.
//!
//! ```sh
//! cargo run --release --example stream_probe -- --base http://127.0.0.1:8080 --key sk-tg-… \
//!     --requests 100
//! ```

#![allow(clippy::print_stdout)]

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
#[command(about = "Streaming latency / held-streams probe for Tollgate benchmarks")]
struct Args {
    /// Base URL without `/v1`, e.g. http://127.0.0.1:8080
    #[arg(long)]
    base: String,
    /// API key (sent as `Authorization: Bearer …`); any value is fine for the bare mock.
    #[arg(long, default_value = "none")]
    key: String,
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Measured sequential streams.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Unmeasured sequential streams first (connection set-up, caches).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Hold this many streams open at once instead of the sequential measurement.
    #[arg(long)]
    concurrent: Option<usize>,
    /// Concurrent mode: streams started per second while ramping up.
    #[arg(long, default_value_t = 2000)]
    ramp_per_sec: u64,
    /// Per-request deadline, seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// A label echoed in the PROBE line.
    #[arg(long, default_value = "probe")]
    label: String,
    /// An extra request header, `Name: value` (repeatable); peer gateways route by headers.
    #[arg(long = "header")]
    headers: Vec<String>,
}

fn body(model: &str) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark please"}],
        "stream": true,
    })
    .to_string()
}

/// Nearest-rank percentile of sorted values.
fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What one stream looked like.
struct StreamTimes {
    /// Microseconds from send to first content chunk.
    ttft_us: Option<u64>,
    /// Microseconds between consecutive content chunks.
    gaps_us: Vec<u64>,
    /// Stamped chunks after the first: send to arrival, microseconds.
    transit_us: Vec<i64>,
    /// Stamped chunks after the first: the gap to the previous chunk's arrival less the gap
    /// between their sends, microseconds.
    excess_us: Vec<i64>,
    content_chunks: u64,
}

/// Microseconds since the Unix epoch, the clock the mock stamps chunks with.
fn wall_clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Whether an SSE `data:` payload carries a non-empty `delta.content`, and the mock's send
/// stamp if it has one.
fn content(data: &str) -> (bool, Option<i64>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return (false, None);
    };
    let stamp = v.get("mock_sent_us").and_then(serde_json::Value::as_i64);
    let has = v
        .get("choices")
        .and_then(|c| c.as_array())
        .is_some_and(|choices| {
            choices.iter().any(|c| {
                c.get("delta")
                    .and_then(|d| d.get("content"))
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| !t.is_empty())
            })
        });
    (has, stamp)
}

/// Sends one streamed request and reads it to the end. Fails unless the stream ends with
/// `data: [DONE]` (an error event or a cut-off stream is a failure). A held stream (`opened`
/// given) only times its first content chunk, so that the probe spends little CPU per chunk.
async fn one_stream(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &str,
    opened: Option<&AtomicU64>,
) -> anyhow::Result<StreamTimes> {
    let sent = Instant::now();
    let resp = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .context("send")?;
    let status = resp.status();
    if !status.is_success() {
        bail!("status {}", status.as_u16());
    }
    struct Open<'a>(Option<&'a AtomicU64>);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            if let Some(o) = self.0 {
                o.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    if let Some(o) = opened {
        o.fetch_add(1, Ordering::Relaxed);
    }
    let _open = Open(opened);
    let mut chunks = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut times = StreamTimes {
        ttft_us: None,
        gaps_us: Vec::with_capacity(64),
        transit_us: Vec::new(),
        excess_us: Vec::new(),
        content_chunks: 0,
    };
    let mut last: Option<Instant> = None;
    // The previous content chunk's send stamp and arrival, wall clock.
    let mut last_stamped: Option<(i64, i64)> = None;
    let mut done = false;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.context("body")?;
        let at = Instant::now();
        let at_wall = wall_clock_us();
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event[..end]);
            let Some(data) = text.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            if data.starts_with("{\"error\"") {
                bail!("error event");
            }
            if opened.is_some() && last.is_some() {
                continue;
            }
            let (has, stamp) = content(data);
            if !has {
                continue;
            }
            times.content_chunks += 1;
            match last {
                None => times.ttft_us = Some(at.duration_since(sent).as_micros() as u64),
                Some(prev) => {
                    times
                        .gaps_us
                        .push(at.duration_since(prev).as_micros() as u64);
                    if let Some(stamp) = stamp {
                        times.transit_us.push(at_wall - stamp);
                    }
                    if let (Some(stamp), Some((prev_stamp, prev_at))) = (stamp, last_stamped) {
                        times
                            .excess_us
                            .push((at_wall - prev_at) - (stamp - prev_stamp));
                    }
                }
            }
            last = Some(at);
            last_stamped = stamp.map(|s| (s, at_wall));
        }
    }
    if !done {
        bail!("no [DONE]");
    }
    Ok(times)
}

fn client(timeout: Duration, headers: &[String]) -> anyhow::Result<reqwest::Client> {
    let mut extra = reqwest::header::HeaderMap::new();
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?}: expected `Name: value`"))?;
        extra.insert(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())?,
            reqwest::header::HeaderValue::from_str(value.trim())?,
        );
    }
    Ok(reqwest::Client::builder()
        .default_headers(extra)
        .timeout(timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()?)
}

async fn sequential(args: Args) -> anyhow::Result<()> {
    let client = client(Duration::from_secs(args.timeout_secs), &args.headers)?;
    let url = format!("{}/v1/chat/completions", args.base.trim_end_matches('/'));
    let body = body(&args.model);
    for _ in 0..args.warmup {
        one_stream(&client, &url, &args.key, &body, None)
            .await
            .context("warm-up stream")?;
    }
    let mut ttft = Vec::with_capacity(args.requests);
    let mut gaps = Vec::new();
    let (mut transits, mut excesses) = (Vec::new(), Vec::new());
    let (mut ok, mut errors, mut chunks) = (0u64, 0u64, 0u64);
    for _ in 0..args.requests {
        match one_stream(&client, &url, &args.key, &body, None).await {
            Ok(t) => {
                ok += 1;
                chunks += t.content_chunks;
                if let Some(v) = t.ttft_us {
                    ttft.push(v);
                }
                gaps.extend(t.gaps_us);
                transits.extend(t.transit_us);
                excesses.extend(t.excess_us);
            }
            Err(e) => {
                errors += 1;
                eprintln!("stream failed: {e:#}");
            }
        }
    }
    ttft.sort_unstable();
    gaps.sort_unstable();
    let (t50, t99) = (pct(&ttft, 50.0), pct(&ttft, 99.0));
    let (g50, g99, n) = (pct(&gaps, 50.0), pct(&gaps, 99.0), gaps.len());
    let label = &args.label;
    println!(
        "{label}: {ok} streams ok, {errors} failed; TTFT p50 {t50} µs p99 {t99} µs; inter-chunk gap p50 {g50} µs p99 {g99} µs ({n} gaps)"
    );
    // Only from a mock that stamps its chunks.
    let mut stamped = String::new();
    if !transits.is_empty() {
        transits.sort_unstable();
        excesses.sort_unstable();
        let (r50, r99) = (pct(&transits, 50.0), pct(&transits, 99.0));
        let (e50, e99) = (pct(&excesses, 50.0), pct(&excesses, 99.0));
        println!(
            "{label}: per chunk after the first, transit p50 {r50} µs p99 {r99} µs; gap excess p50 {e50} µs p99 {e99} µs ({} stamped)",
            transits.len()
        );
        stamped = format!(
            " transit_p50_us={r50} transit_p99_us={r99} gap_excess_p50_us={e50} gap_excess_p99_us={e99} stamped={}",
            transits.len()
        );
    }
    println!(
        "PROBE mode=seq label={label} ok={ok} errors={errors} content_chunks={chunks} ttft_p50_us={t50} ttft_p99_us={t99} gap_p50_us={g50} gap_p99_us={g99} gaps={n}{stamped}"
    );
    Ok(())
}

async fn concurrent(args: Args, n: usize) -> anyhow::Result<()> {
    let client = client(Duration::from_secs(args.timeout_secs), &args.headers)?;
    let url = Arc::new(format!(
        "{}/v1/chat/completions",
        args.base.trim_end_matches('/')
    ));
    let body = Arc::new(body(&args.model));
    let key = Arc::new(args.key.clone());
    let opened = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let kinds: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let ttfts: Arc<Mutex<Vec<u64>>> = Arc::default();
    let durations: Arc<Mutex<Vec<u64>>> = Arc::default();
    let started = Instant::now();
    let step = Duration::from_secs_f64(1.0 / args.ramp_per_sec.max(1) as f64);

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, url, body, key) = (client.clone(), url.clone(), body.clone(), key.clone());
        let (opened, finished, failed) = (opened.clone(), finished.clone(), failed.clone());
        let (kinds, ttfts, durations) = (kinds.clone(), ttfts.clone(), durations.clone());
        let start_at = started + step * i as u32;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start_at.into()).await;
            let sent = Instant::now();
            match one_stream(&client, &url, &key, &body, Some(&opened)).await {
                Ok(t) => {
                    if let (Some(v), Ok(mut all)) = (t.ttft_us, ttfts.lock()) {
                        all.push(v);
                    }
                    if let Ok(mut all) = durations.lock() {
                        all.push(sent.elapsed().as_millis() as u64);
                    }
                    finished.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    // The outermost cause says most (connect refused, reset, timeout, …).
                    let kind = format!("{e:#}");
                    let kind: String = kind.chars().take(120).collect();
                    if let Ok(mut k) = kinds.lock() {
                        *k.entry(kind).or_default() += 1;
                    }
                }
            }
        }));
    }

    // Progress, and the peak of streams open at once.
    let peak = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (opened, finished, failed, peak) = (
            opened.clone(),
            finished.clone(),
            failed.clone(),
            peak.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut last_print = Instant::now();
            loop {
                tick.tick().await;
                let now_open = opened.load(Ordering::Relaxed);
                peak.fetch_max(now_open, Ordering::Relaxed);
                if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    eprintln!(
                        "  t={:>5.1}s open={now_open} done={} failed={}",
                        started.elapsed().as_secs_f64(),
                        finished.load(Ordering::Relaxed),
                        failed.load(Ordering::Relaxed)
                    );
                }
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    monitor.abort();
    let elapsed = started.elapsed().as_secs_f64();
    let ok = finished.load(Ordering::Relaxed);
    let errors = failed.load(Ordering::Relaxed);
    let peak = peak.load(Ordering::Relaxed);
    let mut ttft = ttfts.lock().map(|v| v.clone()).unwrap_or_default();
    ttft.sort_unstable();
    let mut durations = durations.lock().map(|v| v.clone()).unwrap_or_default();
    durations.sort_unstable();
    let kinds = kinds.lock().map(|k| k.clone()).unwrap_or_default();
    for (kind, count) in &kinds {
        println!("  {count} × {kind}");
    }
    let kinds_short: Vec<String> = kinds
        .iter()
        .map(|(k, c)| format!("{c}:{}", k.replace([' ', '='], "_")))
        .collect();
    println!(
        "{}: {n} streams requested, {ok} completed, {errors} failed, at most {peak} open at once, {elapsed:.1} s; TTFT p50 {} µs p99 {} µs; stream duration p50 {} ms p99 {} ms",
        args.label,
        pct(&ttft, 50.0),
        pct(&ttft, 99.0),
        pct(&durations, 50.0),
        pct(&durations, 99.0)
    );
    println!(
        "PROBE mode=concurrent label={} requested={n} ok={ok} errors={errors} peak_open={peak} seconds={elapsed:.1} ttft_p50_us={} ttft_p99_us={} duration_p50_ms={} duration_p99_ms={} error_kinds={}",
        args.label,
        pct(&ttft, 50.0),
        pct(&ttft, 99.0),
        pct(&durations, 50.0),
        pct(&durations, 99.0),
        if kinds_short.is_empty() { "none".to_owned() } else { kinds_short.join(",") }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.concurrent {
        // One thread: the least scheduling noise in the timings.
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(sequential(args)),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(concurrent(args, n)),
    }
}
