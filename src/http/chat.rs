//! `POST /v1/chat/completions`: authenticate, reserve the worst case, call upstream, settle
//! the actual cost, and only then hand the client its last bytes.
//!
//! Billing rules (also in `docs/billing.md`):
//! - the worst case is the request body's length in bytes as the input-token bound (a token
//!   is never shorter than a byte) plus `max_tokens × n` output tokens, where `max_tokens` is
//!   the request's own or the model's output limit;
//! - if the balance (or the key's cap) cannot cover that, `max_tokens` sent upstream is
//!   lowered to what it can cover; only when not even one output token is payable is it 402;
//! - the charge is the upstream's reported usage at the model's price, rounded up to 1e-9.

use super::pieces::{EventBudget, LinePieces, PieceError};
use super::request::Fields;
use super::{authenticate, with_request_id, App, CallLabels};
use crate::config::{Model, Route};
use crate::error::ApiError;
use crate::tokens;
use bytes::{Bytes, BytesMut};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use http::{HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tollgate_actors::account::{KeyLimit, Reservation, ReserveRequest};
use tollgate_actors::keys::KeyInfo;
use tollgate_actors::provider::{Desk, Lease, ProviderError, Wire};
use tollgate_actors::store::{now_ms, UsageRecord, UsageSource};
use tollgate_actors::{Amount, RequestId};
use warp::reply::Response;

/// What a non-streamed call cost, in USDT.
const X_TOLLGATE_COST: http::HeaderName = http::HeaderName::from_static("x-tollgate-cost");

/// HTTP status recorded for a stream whose client went away (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

pub fn new_request_id() -> RequestId {
    // Not `format!`: its machinery cost about 1,000 instructions a call (bench/callgrind.sh).
    // Written on the stack and copied once, into the shared id.
    let mut id = [0u8; 4 + uuid::fmt::Simple::LENGTH];
    id[..4].copy_from_slice(b"req_");
    uuid::Uuid::now_v7().simple().encode_lower(&mut id[4..]);
    // The prefix and hex digits are ASCII, so the first arm is the one taken.
    match std::str::from_utf8(&id) {
        Ok(id) => RequestId::from(id),
        Err(_) => RequestId::from(String::from_utf8_lossy(&id)),
    }
}

pub async fn completions(app: Arc<App>, headers: http::HeaderMap, body: Bytes) -> Response {
    let request_id = new_request_id();
    let resp = run(app, headers, body, &request_id, Dialect::OpenAi).await;
    with_request_id(resp, &request_id)
}

/// `POST /v1/messages`: the Anthropic Messages API, translated to a chat call and back
/// ([`super::anthropic`]).
pub async fn messages(app: Arc<App>, headers: http::HeaderMap, body: Bytes) -> Response {
    let request_id = new_request_id();
    let resp = match super::anthropic::to_chat(&body) {
        Ok(chat) => {
            run(
                app,
                headers,
                Bytes::from(chat),
                &request_id,
                Dialect::Anthropic,
            )
            .await
        }
        Err(e) => Dialect::Anthropic.error_response(e),
    };
    with_request_id(resp, &request_id)
}

/// Which API the client speaks: the answer's shape, and its errors'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    fn error_response(self, e: ApiError) -> Response {
        match self {
            Dialect::OpenAi => e.into_response(),
            Dialect::Anthropic => e.into_anthropic_response(),
        }
    }

    /// The frame that ends a stream that could not end as it should.
    fn error_frame(self, message: &str, code: &str) -> Bytes {
        match self {
            Dialect::OpenAi => error_event(message, code),
            Dialect::Anthropic => super::anthropic::StreamTranslator::error(message).freeze(),
        }
    }
}

async fn run(
    app: Arc<App>,
    headers: http::HeaderMap,
    body: Bytes,
    request_id: &RequestId,
    dialect: Dialect,
) -> Response {
    let started = Instant::now();
    // A client that hangs up drops this handler, but a call that reserved money must still
    // reach its settlement (or release): then the call goes on in a task of its own.
    let call = {
        let request_id = request_id.clone();
        let tracked = app.relays.clone().track_future(async move {
            let mut labels = None;
            let result = proxy(
                app,
                &headers,
                body,
                &request_id,
                started,
                &mut labels,
                dialect,
            )
            .await;
            (labels, result)
        });
        RunToEnd(Some(Box::pin(tracked)))
    };
    let (labels, result) = call.await;
    let mut resp = result.unwrap_or_else(|e| dialect.error_response(e));
    if let Some(l) = labels {
        resp.extensions_mut().insert(l);
    }
    resp
}

/// A future that runs to its end even if whoever awaits it goes away: it is polled in place
/// (no task, no hand-off between threads), and if it is dropped unfinished, what is left of
/// it is spawned.
struct RunToEnd<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send;

impl<F: Future + Send + 'static> Future for RunToEnd<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(out)
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        if let Some(rest) = self.0.take() {
            // Outside a runtime (it is shutting down) there is nothing left to run it on.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(rest);
            }
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy, Debug, PartialEq)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize, Default, Clone, Copy, Debug, PartialEq)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl Usage {
    fn counts(&self) -> super::anthropic::Counts {
        super::anthropic::Counts {
            prompt: self.prompt_tokens,
            completion: self.completion_tokens,
            cached: self.cached(),
        }
    }

    fn cached(&self) -> u64 {
        self.prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
    }
}

/// One billed call in flight: what settlement needs to know.
struct Call {
    app: Arc<App>,
    request_id: RequestId,
    key: Arc<KeyInfo>,
    model: Arc<Model>,
    /// Which of the model's routes the call went to last (the one that answered, once one has).
    route: usize,
    stream: bool,
    started: Instant,
}

impl Call {
    fn route(&self) -> &Route {
        &self.model.routes[self.route]
    }

    /// Settles and waits for the charge to be durable.
    /// `status` is what the usage record says; `billable` whether the tokens are charged.
    async fn settle(
        &self,
        usage: Usage,
        source: UsageSource,
        status: u16,
        billable: bool,
    ) -> Result<Amount, ApiError> {
        let cost = if billable {
            self.model
                .price
                .cost(usage.prompt_tokens, usage.completion_tokens)
        } else {
            Amount::ZERO
        };
        let record = UsageRecord {
            request_id: self.request_id.clone(),
            account_id: self.key.account_id.clone(),
            key_id: Some(self.key.id.clone()),
            model: self.model.id.clone(),
            provider: self.route().provider.clone(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached(),
            cost,
            uncollected: Amount::ZERO,
            status,
            stream: self.stream,
            usage_source: source,
            latency_ms: self.started.elapsed().as_millis() as u64,
            created_at: now_ms(),
        };
        let charged = self
            .app
            .system
            .billing
            .settle(&self.key.account_id, Some(&self.key.id), cost, record)
            .await
            .map_err(|e| {
                tracing::error!(request_id = %self.request_id, error = %e, "settlement failed");
                ApiError::from(e)
            })?;
        if let Some(meters) = &self.route().meters {
            meters.input_tokens.increment(usage.prompt_tokens);
            meters.output_tokens.increment(usage.completion_tokens);
            meters
                .billed_nanos
                .increment(u64::try_from(charged.nanos()).unwrap_or(0));
        }
        tracing::debug!(
            request_id = %self.request_id,
            model = %self.model.id,
            status,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            cost = %charged,
            "request settled"
        );
        Ok(charged)
    }

    /// Records a failed upstream call (no charge) and returns the error for the client.
    async fn fail(&self, status: u16, err: ApiError) -> ApiError {
        match self
            .settle(Usage::default(), UsageSource::Upstream, status, false)
            .await
        {
            Ok(_) => err,
            Err(e) => e,
        }
    }
}

async fn proxy(
    app: Arc<App>,
    headers: &http::HeaderMap,
    body: Bytes,
    request_id: &RequestId,
    started: Instant,
    labels: &mut Option<CallLabels>,
    dialect: Dialect,
) -> Result<Response, ApiError> {
    let key = authenticate(&app, headers).await?;
    let super::request::ChatRequest {
        fields: mut request,
        model: model_id,
        stream,
        max_completion_tokens: max_completion,
        max_tokens,
        n,
        wants_usage: client_wants_usage,
    } = super::request::parse_chat(&body)?;
    let model = app
        .catalog
        .get(&model_id)
        .cloned()
        .ok_or(ApiError::ModelNotFound(model_id.clone()))?;
    *labels = Some(CallLabels {
        model: model.clone(),
        route: 0,
    });
    if !key.allows_model(&model.id) {
        return Err(ApiError::ModelNotAllowed(model.id.clone()));
    }

    let per_choice = max_completion
        .or(max_tokens)
        .unwrap_or(model.max_output_tokens)
        .min(model.max_output_tokens);
    let reservation: Reservation = app
        .system
        .billing
        .reserve(
            &key.account_id,
            ReserveRequest {
                request_id: request_id.clone(),
                key: Some(KeyLimit {
                    key_id: key.id.clone(),
                    spend_cap: key.spend_cap,
                }),
                price: model.price,
                input_tokens: body.len() as u64,
                max_output_tokens: per_choice.saturating_mul(n),
            },
        )
        .await?;
    let billing = &app.system.billing;
    let mut lowered_to = None;
    if reservation.lowered {
        let allowed = reservation.max_output_tokens / n;
        if allowed == 0 {
            billing.release(&key.account_id, request_id);
            return Err(ApiError::InsufficientBalance(format!(
                "{} USDT cannot pay for one output token for each of n={n} choices",
                reservation.amount
            )));
        }
        lowered_to = Some(allowed);
    }
    let upstream_body = match upstream_body(
        &mut request,
        lowered_to,
        stream,
        model.routes[0].upstream_model.as_str(),
    ) {
        Ok(b) => b,
        Err(e) => {
            billing.release(&key.account_id, request_id);
            return Err(e);
        }
    };
    // Kept (a reference count, not a copy) for counting the prompt's tokens in the rare case
    // that the upstream reports no usage.
    let prompt = body.clone();

    // What the provider's token limit counts: the prompt, estimated at a token per 4 bytes of
    // the request, and the most the answer may use.
    let tokens = (body.len() as u64)
        .div_ceil(4)
        .saturating_add(reservation.max_output_tokens);
    let mut call = Call {
        app: app.clone(),
        request_id: request_id.clone(),
        key,
        model,
        route: 0,
        stream,
        started,
    };
    let max_tokens = lowered_to.unwrap_or(per_choice);
    let sent = send(&mut call, &mut request, upstream_body, tokens, max_tokens).await;
    if let Some(labels) = labels {
        labels.route = call.route;
    }
    let (lease, upstream) = match sent {
        Ok(answered) => answered,
        Err(Failed {
            status,
            error,
            attempted: true,
        }) => return Err(call.fail(status, error).await),
        Err(Failed { error, .. }) => {
            billing.release(&call.key.account_id, request_id);
            return Err(error);
        }
    };
    let timeout = lease.spec.request_timeout;
    let wire = lease.wire;

    let max_answer = app.config.limits.max_upstream_answer_bytes;
    if stream {
        let idle = lease.spec.stream_idle_timeout;
        let (pieces, budget) = LinePieces::new(
            http_body_util::BodyDataStream::new(upstream.into_body()),
            max_answer,
        );
        let events: Events = match wire {
            Wire::OpenAi => Box::pin(pieces.eventsource()),
            Wire::Anthropic => Box::pin(super::anthropic_upstream::chunks(pieces.eventsource())),
        };
        let relay = Relay {
            call: Some(call),
            lease: Some(lease),
            events,
            budget,
            usage: None,
            content_chunks: 0,
            client_wants_usage,
            translator: (dialect == Dialect::Anthropic)
                .then(|| super::anthropic::StreamTranslator::new(request_id, &model_id)),
            dialect,
            prompt,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
        };
        // The head goes out with the stream's first content (or its end), in one write.
        let (first, relay) = relay.first_frames().await;
        let body = futures::stream::once(std::future::ready(first))
            .chain(futures::stream::unfold(relay, Relay::next_frame))
            .map(Ok::<_, std::io::Error>);
        let mut resp = warp::reply::Reply::into_response(warp::reply::stream(
            sync_wrapper::SyncStream::new(body),
        ));
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        return Ok(resp);
    }

    let bytes = match read_answer(upstream.into_body(), timeout, max_answer).await {
        Answer::Whole(b) => b,
        Answer::TooLarge => {
            // The upstream answered; the gateway will not hold an answer this large.
            lease.report(true);
            return Err(call
                .fail(
                    502,
                    ApiError::Upstream(format!(
                        "The upstream's answer is larger than {max_answer} bytes, the most the gateway takes."
                    )),
                )
                .await);
        }
        Answer::CutShort => {
            lease.report(false);
            return Err(call
                .fail(
                    502,
                    ApiError::Upstream("The upstream response was cut short.".to_owned()),
                )
                .await);
        }
        Answer::TimedOut => {
            lease.report(false);
            return Err(call.fail(504, ApiError::UpstreamTimeout).await);
        }
    };
    lease.report(true);
    drop(lease);
    let bytes = match wire {
        Wire::OpenAi => bytes,
        Wire::Anthropic => super::anthropic_upstream::completion(&bytes),
    };
    // The choices are read only when there is no usage to go by.
    #[derive(Deserialize)]
    struct Choices {
        #[serde(default)]
        choices: Vec<Value>,
    }
    let (usage, source) = match usage_of(&bytes) {
        Some(u) => (u, UsageSource::Upstream),
        None => (
            Usage {
                prompt_tokens: prompt_tokens(&body),
                completion_tokens: serde_json::from_slice::<Choices>(&bytes)
                    .map(|c| c.choices)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| {
                        tokens::content_tokens(c.get("message").and_then(|m| m.get("content")))
                    })
                    .sum(),
                prompt_tokens_details: None,
            },
            UsageSource::Estimated,
        ),
    };
    let charged = call.settle(usage, source, 200, true).await?;
    let bytes = match dialect {
        Dialect::OpenAi => bytes,
        Dialect::Anthropic => Bytes::from(super::anthropic::message(
            &bytes,
            request_id,
            &model_id,
            usage.counts(),
        )),
    };
    let mut resp = Response::new(bytes.into());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&charged.to_string()) {
        h.insert(X_TOLLGATE_COST, v);
    }
    Ok(resp)
}

/// The usage an upstream's answer reports: the answer read by serde_json, skipping all but
/// `usage` without building it.
///
/// UTF-8 is checked once for the whole answer: serde_json's slice reader checks each string it
/// reads, a few hundred instructions a call for the keys alone. The result is the same either
/// way; an answer that is not UTF-8 throughout (serde_json does not look inside the strings
/// it skips) is read as bytes.
fn usage_of(answer: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Completion {
        usage: Option<Usage>,
    }
    match std::str::from_utf8(answer) {
        Ok(text) => serde_json::from_str::<Completion>(text),
        Err(_) => serde_json::from_slice::<Completion>(answer),
    }
    .ok()?
    .usage
}

/// The body sent upstream: the client's, with the upstream's name for the model, the usage
/// chunk asked for on a stream, and `max_tokens` (or `max_completion_tokens`, whichever the
/// client used) lowered to what the balance pays for. `request` keeps the edits, so that a
/// fallback route needs only its model set ([`send`]).
fn upstream_body(
    request: &mut Fields<'_>,
    lowered_to: Option<u64>,
    stream: bool,
    upstream_model: &str,
) -> Result<Vec<u8>, ApiError> {
    if let Some(allowed) = lowered_to {
        let field = if request.contains("max_completion_tokens") {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        request.set(field, &allowed)?;
    }
    if stream {
        // parse_chat let through only an object or null here.
        let mut options = request
            .parse::<serde_json::Map<String, Value>>("stream_options")
            .ok()
            .flatten()
            .unwrap_or_default();
        options.insert("include_usage".to_owned(), Value::Bool(true));
        request.set("stream_options", &options)?;
    }
    request.set("model", &upstream_model)?;
    request.to_body()
}

/// How reading an upstream's whole (non-streamed) answer ended.
enum Answer {
    Whole(Bytes),
    /// Longer than `limits.max_upstream_answer_bytes`: not read on.
    TooLarge,
    CutShort,
    TimedOut,
}

/// Reads an upstream's whole answer within `timeout`, holding at most `limit` bytes of it.
async fn read_answer(
    body: tollgate_actors::upstream::Body,
    timeout: Duration,
    limit: usize,
) -> Answer {
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit));
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(whole)) => Answer::Whole(whole.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Answer::TooLarge,
        Ok(Err(_)) => Answer::CutShort,
        Err(_) => Answer::TimedOut,
    }
}

/// How a call's attempts ended without an answer to relay.
struct Failed {
    /// What the usage record says (the upstream's own status where it answered).
    status: u16,
    /// What the client is told.
    error: ApiError,
    /// Whether any attempt took a lease (and so counts as a call to record): if none did,
    /// the call was refused before it left the gateway.
    attempted: bool,
}

/// How one attempt failed, and where the call may go next.
struct Miss {
    status: u16,
    error: ApiError,
    then: Then,
}

enum Then {
    /// The failure may pass: this provider again after a wait (at least what the upstream
    /// asked for, if it did), or else the next route.
    Retry(Option<Duration>),
    /// Not this provider again for this call, but the next route may serve it.
    NextRoute,
    /// Nowhere else either: this is the call's answer.
    Stop,
}

/// Sends the call to its model's routes in order until one answers with a success, retrying
/// each provider as its config allows (docs/billing.md, "Retries and failover"). `body` is
/// the chat body for the first route's upstream model; `request` makes the others'; a route
/// whose provider speaks Anthropic's Messages API gets it translated, with `max_tokens` as
/// its limit where the client set none. Only a success's lease and response head come back;
/// every failed attempt's lease is dropped before the next attempt, and the call's route is
/// the one tried last.
async fn send(
    call: &mut Call,
    request: &mut Fields<'_>,
    body: Vec<u8>,
    tokens: u64,
    max_tokens: u64,
) -> Result<(Lease, http::Response<tollgate_actors::upstream::Body>), Failed> {
    // The routes are borrowed from the call (not its model's `Arc` cloned again: that count
    // is shared by every call of the model, on every worker thread).
    let routes = call.model.routes.len();
    let mut chat = Bytes::from(body);
    let mut chat_model = 0;
    let mut attempted = false;
    let mut last = None;
    for i in 0..routes {
        let route = &call.model.routes[i];
        let elsewhere = i + 1 < routes;
        if route.upstream_model != call.model.routes[chat_model].upstream_model {
            let rebuilt = request
                .set("model", &route.upstream_model)
                .and_then(|()| request.to_body());
            chat = match rebuilt {
                Ok(b) => Bytes::from(b),
                Err(error) => {
                    let status = error.status().as_u16();
                    return Err(Failed {
                        status,
                        error,
                        attempted,
                    });
                }
            };
            chat_model = i;
        }
        let body = match route.wire {
            Wire::OpenAi => chat.clone(),
            Wire::Anthropic => match super::anthropic_upstream::request(&chat, max_tokens) {
                Ok(b) => Bytes::from(b),
                // What this route cannot carry, another may.
                Err(error) => {
                    last = Some((error.status().as_u16(), error));
                    continue;
                }
            },
        };
        let Some(desk) = call.app.system.desk(&route.provider) else {
            let error = ApiError::Unavailable(format!("provider `{}`", route.provider));
            last = Some((error.status().as_u16(), error));
            continue;
        };
        let mut retries = 0;
        loop {
            let lease = match lease(desk, &route.provider, tokens, elsewhere).await {
                Ok(l) => l,
                Err(error) => {
                    last = Some((error.status().as_u16(), error));
                    break;
                }
            };
            attempted = true;
            call.route = i;
            if retries > 0 {
                desk.count_retry();
            }
            let miss = match attempt(call, &lease, body.clone()).await {
                Ok(answer) => return Ok((lease, answer)),
                Err(miss) => miss,
            };
            let wait = match miss.then {
                Then::Stop => {
                    return Err(Failed {
                        status: miss.status,
                        error: miss.error,
                        attempted,
                    })
                }
                Then::Retry(asks) if retries < lease.spec.retries => {
                    lease.spec.retry_wait(retries + 1, asks)
                }
                Then::Retry(_) | Then::NextRoute => None,
            };
            drop(lease);
            last = Some((miss.status, miss.error));
            let Some(wait) = wait else { break };
            retries += 1;
            tokio::time::sleep(wait).await;
        }
        if elsewhere {
            desk.count_failover();
        }
    }
    let (status, error) = last.unwrap_or_else(|| {
        let error = ApiError::Unavailable(format!("model `{}`", call.model.id));
        (error.status().as_u16(), error)
    });
    Err(Failed {
        status,
        error,
        attempted,
    })
}

/// One attempt at the upstream of `lease`: its response head if it answered with a success.
async fn attempt(
    call: &Call,
    lease: &Lease,
    body: Bytes,
) -> Result<http::Response<tollgate_actors::upstream::Body>, Miss> {
    let mut upstream_request = http::Request::new(http_body_util::Full::new(body));
    *upstream_request.method_mut() = http::Method::POST;
    *upstream_request.uri_mut() = lease.endpoint_path.clone();
    let headers = upstream_request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some((name, value)) = &lease.auth {
        headers.insert(name.clone(), value.clone());
    }
    if lease.wire == Wire::Anthropic {
        headers.insert(
            "anthropic-version",
            HeaderValue::from_static(super::anthropic_upstream::VERSION),
        );
    }
    let timeout = lease.spec.request_timeout;
    let provider = &lease.spec.name;
    let upstream = match tokio::time::timeout(timeout, lease.pool.send(upstream_request)).await {
        Err(_) => {
            lease.report(false);
            // The client has waited the whole timeout already: not this provider again.
            return Err(Miss {
                status: 504,
                error: ApiError::UpstreamTimeout,
                then: Then::NextRoute,
            });
        }
        Ok(Err(e)) if out_of_descriptors(&e) => {
            // The gateway's own shortage, not the provider's failure: its health is left as
            // it is, and the client is told to come back rather than that upstream is down.
            tracing::error!(request_id = %call.request_id, %provider, error = %ErrorChain(&e), "no descriptor for an upstream connection");
            return Err(Miss {
                status: 503,
                error: ApiError::Unavailable("The gateway (at its connection limit)".to_owned()),
                then: Then::Stop,
            });
        }
        Ok(Err(e)) => {
            lease.report(false);
            tracing::warn!(request_id = %call.request_id, %provider, error = %ErrorChain(&e), "upstream unreachable");
            return Err(Miss {
                status: 502,
                error: ApiError::Upstream("The upstream provider could not be reached.".to_owned()),
                then: Then::Retry(None),
            });
        }
        Ok(Ok(r)) => r,
    };
    if let Some(meters) = &call.route().meters {
        meters
            .upstream_response
            .record(call.started.elapsed().as_secs_f64());
    }
    let status = upstream.status();
    if status.is_success() {
        return Ok(upstream);
    }
    // The upstream failing is its health's business; a client's bad request is not.
    lease.report(!(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS));
    Err(upstream_refused(call, upstream, timeout).await)
}

/// A lease from `provider`'s desk (no message to its actor); before the actor's first start
/// has posted a leaser, waits for it (up to about a second) rather than failing the call.
/// `elsewhere`: the call has another route to take if this provider rests ([`Desk::lease`]).
async fn lease(
    desk: &Desk,
    provider: &str,
    tokens: u64,
    elsewhere: bool,
) -> Result<Lease, ApiError> {
    for _ in 0..50 {
        match desk.lease(tokens, elsewhere) {
            Some(Ok(lease)) => return Ok(lease),
            Some(Err(e @ ProviderError::Saturated { .. })) => {
                return Err(ApiError::RateLimited(e.to_string(), None))
            }
            Some(Err(e @ ProviderError::OverRate { retry_after, .. })) => {
                let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
                return Err(ApiError::RateLimited(e.to_string(), Some(ms.max(1))));
            }
            Some(Err(e @ ProviderError::OverTokenLimit { .. })) => {
                return Err(ApiError::InvalidRequest(e.to_string()))
            }
            Some(Err(e)) => return Err(ApiError::Unavailable(e.to_string())),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    Err(ApiError::Unavailable(format!("provider `{provider}`")))
}

/// Whether an upstream call failed because this process (EMFILE) or the machine (ENFILE)
/// has no descriptor left for its socket.
fn out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustix::io::Errno;
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .and_then(Errno::from_io_error)
            .is_some_and(|errno| errno == Errno::MFILE || errno == Errno::NFILE)
    })
}

/// An error and its sources, `outer: inner: innermost` (hyper-util's own message says only
/// "client error (Connect)"; the reason is in its sources).
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// An upstream that answered with an error, and whether another attempt may fare better. A
/// client error (the request itself was wrong) passes through as the upstream said it, and
/// goes nowhere else; a refused key (401, 403) becomes 502 and may go to the next route; a
/// 429 (with the upstream's `retry-after`) and the rest (502) may be retried.
async fn upstream_refused(
    call: &Call,
    upstream: http::Response<tollgate_actors::upstream::Body>,
    timeout: Duration,
) -> Miss {
    let status = upstream.status();
    let retry_after = crate::error::upstream_retry_after(upstream.headers());
    let limit = call.app.config.limits.max_upstream_answer_bytes;
    let body = match read_answer(upstream.into_body(), timeout, limit).await {
        Answer::Whole(b) => Some(b),
        Answer::TooLarge | Answer::CutShort | Answer::TimedOut => None,
    };
    let message = body
        .as_ref()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_owned));
    let (error, then) = match status {
        StatusCode::TOO_MANY_REQUESTS => (
            ApiError::RateLimited(
                message.unwrap_or_else(|| {
                    "The upstream provider is rate limiting; retry shortly.".to_owned()
                }),
                retry_after,
            ),
            Then::Retry(retry_after.map(Duration::from_millis)),
        ),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (
            ApiError::Upstream(format!("The upstream provider failed ({status}).")),
            Then::NextRoute,
        ),
        s if s.is_client_error() => (
            ApiError::InvalidRequest(
                message
                    .unwrap_or_else(|| format!("The upstream provider refused the request ({s}).")),
            ),
            Then::Stop,
        ),
        s => (
            ApiError::Upstream(format!("The upstream provider failed ({s}).")),
            Then::Retry(None),
        ),
    };
    Miss {
        status: status.as_u16(),
        error,
        then,
    }
}

#[derive(Deserialize)]
struct ChunkPeek<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChoicePeek<'a>>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChoicePeek<'a> {
    #[serde(borrow)]
    delta: Option<DeltaPeek<'a>>,
}

#[derive(Deserialize)]
struct DeltaPeek<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Clone, Copy)]
enum StreamEnd {
    Done,
    ClientGone,
    UpstreamFailed,
    UpstreamIdle,
}

/// How long a stream's response head waits for the first content ([`Relay::first_frames`]).
const HEAD_HOLD: Duration = Duration::from_millis(20);

type Events = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<PieceError<hyper::Error>>,
                >,
            > + Send,
    >,
>;

/// A streamed call's response body. The client's connection pulls it, so each upstream event
/// is read, looked at and written by the connection's own task, with no task or channel in
/// between. The terminating `data: [DONE]` is produced only after the charge is durable.
///
/// If the connection drops the body before its end (the client went away), [`Drop`] settles
/// the call for what was delivered, in a task of its own.
struct Relay {
    /// `None` once the settlement has started.
    call: Option<Call>,
    lease: Option<Lease>,
    events: Events,
    /// Told of each event, so that only the bytes of one event count against the limit.
    budget: EventBudget,
    usage: Option<Usage>,
    content_chunks: u64,
    client_wants_usage: bool,
    /// For a client of the Messages API: its events, made from the chat stream's chunks.
    translator: Option<super::anthropic::StreamTranslator>,
    dialect: Dialect,
    /// The client's request body, for [`prompt_tokens`].
    prompt: Bytes,
    idle: Duration,
    /// Runs out after `idle` without an upstream event. One timer for the stream, moved on at
    /// each event: a later deadline is a store to the timer's entry, where a timer per event
    /// would be taken out of tokio's timer wheel and put in again, each under its lock.
    idle_timer: Pin<Box<tokio::time::Sleep>>,
}

impl Relay {
    /// The frames up to and including the first one with content, joined into one, and the
    /// relay. Sent with the response's head, they make one write: otherwise the head, the
    /// role chunk and the first content would each be a write of their own, and a hop between
    /// the upstream connection's task and the client's, for the first token to wait on.
    ///
    /// The head waits for the first content at most [`HEAD_HOLD`]; from an upstream slower to
    /// its first token, the head and the events so far go out when that is up.
    async fn first_frames(mut self) -> (Bytes, Relay) {
        let deadline = tokio::time::Instant::now() + HEAD_HOLD;
        let mut joined = BytesMut::new();
        while self.content_chunks == 0 && self.call.is_some() {
            match tokio::time::timeout_at(deadline, self.next_event()).await {
                Err(_) => break,
                Ok(Ok(event)) => {
                    self.forward(&event, &mut joined);
                }
                Ok(Err(end)) => joined.extend_from_slice(&self.finish(end).await),
            }
        }
        (joined.freeze(), self)
    }

    /// The next frame for the client: an upstream event passed on, or the last frame after the
    /// settlement; `None` after that.
    async fn next_frame(mut self) -> Option<(Bytes, Relay)> {
        self.call.as_ref()?;
        loop {
            match self.next_event().await {
                Ok(event) => {
                    let mut frame = BytesMut::with_capacity(event.data.len() + 8);
                    if self.forward(&event, &mut frame) {
                        return Some((frame.freeze(), self));
                    }
                }
                Err(end) => {
                    let last = self.finish(end).await;
                    return Some((last, self));
                }
            }
        }
    }

    /// The upstream's next event, or how the stream ended. Cancel-safe: dropped while waiting,
    /// it loses nothing.
    async fn next_event(&mut self) -> Result<eventsource_stream::Event, StreamEnd> {
        self.idle_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + self.idle);
        let next = tokio::select! {
            biased;
            next = self.events.next() => next,
            () = self.idle_timer.as_mut() => return Err(StreamEnd::UpstreamIdle),
        };
        match next {
            // An OpenAI-compatible stream ends with [DONE]; without it, it was cut off.
            None => Err(StreamEnd::UpstreamFailed),
            Some(Err(e)) => {
                if let Some(call) = &self.call {
                    tracing::warn!(request_id = %call.request_id, provider = %call.route().provider,
                        reason = stream_failure(&e), "upstream stream failed");
                }
                Err(StreamEnd::UpstreamFailed)
            }
            Some(Ok(event)) => {
                self.budget.event_arrived();
                if event.data == "[DONE]" {
                    Err(StreamEnd::Done)
                } else {
                    Ok(event)
                }
            }
        }
    }

    /// Takes note of an event's usage and content, and appends the frame to pass on to `out`;
    /// false if there is none (the usage-only chunk goes on only to a client that asked for
    /// it).
    fn forward(&mut self, event: &eventsource_stream::Event, out: &mut BytesMut) -> bool {
        let mut forward = true;
        let mut has_content = false;
        if let Ok(peek) = serde_json::from_str::<ChunkPeek>(&event.data) {
            if let Some(u) = peek.usage {
                self.usage = Some(u);
                forward = self.client_wants_usage || !peek.choices.is_empty();
            }
            has_content = peek.choices.iter().any(|c| {
                c.delta
                    .as_ref()
                    .is_some_and(|d| d.content.as_ref().is_some_and(|t| !t.is_empty()))
            });
        }
        if !forward {
            return false;
        }
        // Counted as delivered once passed on (the first frames: once joined for the head's
        // write; a client gone before that write is charged for them too, as for any frame
        // its connection could not deliver).
        if let (true, 0, Some(call)) = (has_content, self.content_chunks, &self.call) {
            if let Some(meters) = &call.route().meters {
                meters
                    .time_to_first_token
                    .record(call.started.elapsed().as_secs_f64());
            }
        }
        self.content_chunks += u64::from(has_content);
        if let Some(translator) = &mut self.translator {
            let before = out.len();
            translator.chunk(&event.data, out);
            return out.len() > before;
        }
        out.reserve(event.data.len() + 8);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(event.data.as_bytes());
        out.extend_from_slice(b"\n\n");
        true
    }

    /// Ends the upstream call and settles. The settlement runs in a task of its own, so that a
    /// client leaving at this very moment cannot cut it short.
    async fn finish(&mut self, end: StreamEnd) -> Bytes {
        let Some(settle) = self.settle_in_background(end) else {
            return Bytes::new();
        };
        match settle.await {
            Ok(frame) => frame,
            Err(_) => self
                .dialect
                .error_frame("The charge could not be recorded.", "server_error"),
        }
    }

    /// Stops the upstream call, reports how it went, and spawns the settlement; its task yields
    /// the frame the client gets last.
    ///
    /// After `[DONE]` the rest of the upstream body (its end, usually in the same read) is read
    /// to its end in the background, so that the connection goes back to the pool; a body
    /// dropped before its end closes its connection, and the next call would connect (and, over
    /// TLS, shake hands) again. Any other end drops the body and its connection.
    fn settle_in_background(&mut self, end: StreamEnd) -> Option<tokio::task::JoinHandle<Bytes>> {
        let call = self.call.take()?;
        let mut events = std::mem::replace(&mut self.events, Box::pin(futures::stream::empty()));
        if matches!(end, StreamEnd::Done) {
            tokio::spawn(async move {
                let rest = async { while events.next().await.is_some() {} };
                let _ = tokio::time::timeout(Duration::from_secs(5), rest).await;
            });
        }
        if let Some(lease) = self.lease.take() {
            lease.report(!matches!(
                end,
                StreamEnd::UpstreamFailed | StreamEnd::UpstreamIdle
            ));
        }
        let (usage, source) = match self.usage {
            Some(u) => (u, UsageSource::Upstream),
            // What was delivered: the prompt, and one token per content chunk sent on.
            None => (
                Usage {
                    prompt_tokens: prompt_tokens(&self.prompt),
                    completion_tokens: self.content_chunks,
                    prompt_tokens_details: None,
                },
                UsageSource::Estimated,
            ),
        };
        let status = match end {
            StreamEnd::Done => 200,
            StreamEnd::ClientGone => CLIENT_CLOSED,
            StreamEnd::UpstreamFailed | StreamEnd::UpstreamIdle => 502,
        };
        let relays = call.app.relays.clone();
        let mut translator = self.translator.take();
        let dialect = self.dialect;
        Some(relays.spawn(async move {
            // A stream the upstream broke off is still charged for what the client received.
            let settled = call.settle(usage, source, status, true).await;
            match (end, settled) {
                (StreamEnd::ClientGone, _) => Bytes::new(),
                (StreamEnd::Done, Ok(_)) => match &mut translator {
                    None => Bytes::from_static(b"data: [DONE]\n\n"),
                    Some(t) => t.end(usage.counts()).freeze(),
                },
                (_, Err(e)) => dialect.error_frame(&e.to_string(), "server_error"),
                (StreamEnd::UpstreamFailed | StreamEnd::UpstreamIdle, Ok(_)) => dialect
                    .error_frame(
                        "The upstream provider broke off the stream.",
                        "upstream_error",
                    ),
            }
        }))
    }
}

impl Drop for Relay {
    /// The connection dropped the body before its end: the client went away.
    fn drop(&mut self) {
        let _ = self.settle_in_background(StreamEnd::ClientGone);
    }
}

/// Why an upstream's stream could not be read on, for the log: never the parser's own
/// message, which quotes the upstream's text (the content of a response).
fn stream_failure(e: &eventsource_stream::EventStreamError<PieceError<hyper::Error>>) -> String {
    use eventsource_stream::EventStreamError;
    match e {
        EventStreamError::Transport(PieceError::TooLarge(too_large)) => too_large.to_string(),
        EventStreamError::Transport(PieceError::Upstream(e)) => format!("the connection: {e}"),
        EventStreamError::Utf8(_) => "the stream is not UTF-8".to_owned(),
        EventStreamError::Parser(_) => "the stream is not server-sent events".to_owned(),
    }
}

/// Tollgate's count of a request's prompt tokens (its `messages`), for calls the upstream
/// reported no usage for.
fn prompt_tokens(body: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct Messages {
        #[serde(default)]
        messages: Value,
    }
    serde_json::from_slice::<Messages>(body)
        .map(|m| tokens::prompt_tokens(&m.messages))
        .unwrap_or(0)
}

fn error_event(message: &str, code: &str) -> Bytes {
    let body = json!({"error": {"message": message, "type": code, "code": code}});
    Bytes::from(format!("data: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request id is `req_` and a UUIDv7's 32 lowercase hex digits, and ids made one after
    /// the other sort in the order they were made.
    #[test]
    fn request_ids_are_req_and_a_time_ordered_uuid() {
        let ids: Vec<RequestId> = (0..3).map(|_| new_request_id()).collect();
        for id in &ids {
            let hex = id.strip_prefix("req_").unwrap_or_default();
            assert_eq!(hex.len(), 32, "{id}");
            assert!(
                hex.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
            let version = uuid::Uuid::parse_str(hex).map(|u| u.get_version_num());
            assert_eq!(version.ok(), Some(7), "{id}");
        }
        assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");
    }

    /// The usage of an answer, whether it is UTF-8 throughout or not; none from an answer
    /// serde_json refuses or one without a valid usage.
    #[test]
    fn usage_is_read_from_any_answer_serde_json_takes() {
        let usage = r#""usage":{"prompt_tokens":16,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":4}}"#;
        let plain =
            format!(r#"{{"id":"x","choices":[{{"message":{{"content":"Hi \u00e9"}}}}],{usage}}}"#);
        let mut not_utf8 = plain.clone().into_bytes();
        let at = plain.find("Hi").map(|i| i + 1).unwrap_or_default();
        not_utf8[at] = 0xFF;
        let expected = Some(Usage {
            prompt_tokens: 16,
            completion_tokens: 9,
            prompt_tokens_details: Some(PromptDetails {
                cached_tokens: Some(4),
            }),
        });
        assert_eq!(usage_of(plain.as_bytes()), expected);
        assert!(std::str::from_utf8(&not_utf8).is_err());
        assert_eq!(usage_of(&not_utf8), expected);
        for refused in [
            format!(r#"{{{usage},"x":tru}}"#),
            format!(r#"{{{usage},{usage}}}"#),
            r#"{"usage":{"prompt_tokens":-1}}"#.to_owned(),
            r#"{"usage":null}"#.to_owned(),
            r#"{"choices":[]}"#.to_owned(),
            "not json".to_owned(),
        ] {
            assert_eq!(usage_of(refused.as_bytes()), None, "{refused}");
        }
    }
}
