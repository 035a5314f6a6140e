//! HTTP: one warp filter hands every request to [`route`], which dispatches on method and
//! path. Handlers talk to actors (through `Billing`, the key ring, the actor system), never SQL.

mod admin;
mod anthropic;
mod anthropic_upstream;
mod chat;
mod pieces;
pub mod request;

use crate::config::{Config, Model};
use crate::error::{json_response, ApiError};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::json;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_util::task::TaskTracker;
use tollgate_actors::keys::KeyRing;
use tollgate_actors::{ActorSystem, Store};
use warp::reply::Response;
use warp::{Buf, Filter};

/// Everything a handler can reach.
pub struct App {
    pub config: Config,
    pub catalog: HashMap<String, Arc<Model>>,
    pub keys: KeyRing,
    pub system: ActorSystem,
    pub store: Store,
    admin_token: [u8; 32],
    /// Calls in flight, and stream relays still settling after their client went away:
    /// shutdown waits for them.
    pub relays: TaskTracker,
}

impl App {
    pub fn new(
        config: Config,
        catalog: HashMap<String, Model>,
        keys: KeyRing,
        system: ActorSystem,
        store: Store,
    ) -> App {
        let catalog = catalog
            .into_iter()
            .map(|(id, mut model)| {
                for route in &mut model.routes {
                    route.meters = Some(Arc::new(crate::telemetry::ModelMeters::new(
                        &model.id,
                        &route.provider,
                    )));
                }
                (id, Arc::new(model))
            })
            .collect();
        App {
            admin_token: tollgate_actors::keys::hash_key(&config.admin_token),
            config,
            catalog,
            keys,
            system,
            store,
            relays: TaskTracker::new(),
        }
    }
}

/// The path of nearly every request.
const CHAT_PATH: &str = "/v1/chat/completions";

pub fn filter(
    app: Arc<App>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let body_timeout_ms = app.config.limits.body_read_timeout_ms;
    // The body's clock starts once the headers are in (hyper bounds those).
    let body_deadline = move || {
        (body_timeout_ms > 0).then(|| BodyDeadline {
            at: tokio::time::Instant::now() + std::time::Duration::from_millis(body_timeout_ms),
            ms: body_timeout_ms,
        })
    };
    // `POST /v1/chat/completions` on a filter of its own: no path to copy, and no query string
    // to look for (the route reads none), whose absence warp answers with a boxed rejection
    // that the general filter then recovers from. Any other request (that path with another
    // method or spelled otherwise, `/v1/chat/completions/` say) goes on to the general filter
    // and is routed as it always was.
    let chat = {
        let app = app.clone();
        warp::post()
            .and(warp::path::full())
            .and_then(|path: warp::path::FullPath| async move {
                if path.as_str() == CHAT_PATH {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            })
            .untuple_one()
            .and(warp::header::headers_cloned())
            .and(warp::body::stream())
            .then(move |headers: HeaderMap, body| {
                let request = Request {
                    method: Method::POST,
                    path: Cow::Borrowed(CHAT_PATH),
                    query: String::new(),
                    headers,
                    body_deadline: body_deadline(),
                };
                handle(app.clone(), request, body)
            })
    };
    let general = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  body| {
                let request = Request {
                    method,
                    path: Cow::Owned(path.as_str().to_owned()),
                    query,
                    headers,
                    body_deadline: body_deadline(),
                };
                handle(app.clone(), request, body)
            },
        );
    chat.or(general).unify()
}

async fn handle<S, B>(app: Arc<App>, request: Request, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf + Send,
{
    let body = Box::pin(body.map(|r| r.map(|mut b| b.copy_to_bytes(b.remaining()))));
    let started = std::time::Instant::now();
    let (route_name, resp) = route(app, request, body).await;
    let status = resp.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    match resp
        .extensions()
        .get::<CallLabels>()
        .and_then(|l| l.model.routes.get(l.route)?.meters.as_ref())
    {
        Some(meters) => {
            let (count, duration) = meters.request(route_name, status);
            count.increment(1);
            duration.record(elapsed);
        }
        None => {
            let status = status.to_string();
            metrics::counter!("tollgate_http_requests_total", "route" => route_name, "status" => status.clone(),
                "model" => "", "provider" => "")
            .increment(1);
            metrics::histogram!("tollgate_http_request_duration_seconds", "route" => route_name, "status" => status)
                .record(elapsed);
        }
    }
    resp
}

/// Which model served a call, and through which of its routes, for the request metrics.
#[derive(Clone, Debug)]
pub struct CallLabels {
    pub model: Arc<Model>,
    pub route: usize,
}

/// A path's segments, in an array rather than a `Vec` (two allocations a call less). No route
/// has more than four; a path with more than [`Segments::MAX`] keeps its first ones and the
/// rest as one last segment, and so still matches nothing but what it matched before.
struct Segments<'a> {
    all: [&'a str; Segments::MAX],
    len: usize,
}

impl<'a> Segments<'a> {
    const MAX: usize = 8;

    /// As `path.trim_matches('/').split('/')` would give them.
    fn of(path: &'a str) -> Segments<'a> {
        let mut all = [""; Segments::MAX];
        let mut len = 0;
        let mut rest = path.trim_matches('/');
        loop {
            // A byte search: `split_once('/')` goes through the char pattern's searcher, about
            // 120 instructions a segment for paths this short.
            match rest.bytes().position(|b| b == b'/') {
                Some(slash) if len + 1 < Segments::MAX => {
                    all[len] = &rest[..slash];
                    len += 1;
                    rest = &rest[slash + 1..];
                }
                _ => {
                    all[len] = rest;
                    return Segments { all, len: len + 1 };
                }
            }
        }
    }

    fn as_slice(&self) -> &[&'a str] {
        &self.all[..self.len]
    }
}

/// The route's template, never the raw path (which can carry ids).
fn route_label(method: &Method, segments: &[&str]) -> &'static str {
    match (method.as_str(), segments) {
        ("POST", ["v1", "chat", "completions"]) => "/v1/chat/completions",
        ("POST", ["v1", "messages"]) => "/v1/messages",
        ("GET", ["v1", "models"]) => "/v1/models",
        ("GET", ["v1", "models", ..]) => "/v1/models/{id}",
        ("GET", ["healthz"]) => "/healthz",
        ("GET", ["readyz"]) => "/readyz",
        ("GET", ["metrics"]) => "/metrics",
        (_, ["admin", "accounts"]) => "/admin/accounts",
        (_, ["admin", "accounts", _]) => "/admin/accounts/{id}",
        (_, ["admin", "accounts", _, "credits"]) => "/admin/accounts/{id}/credits",
        (_, ["admin", "accounts", _, "keys"]) => "/admin/accounts/{id}/keys",
        (_, ["admin", "accounts", _, "usage"]) => "/admin/accounts/{id}/usage",
        (_, ["admin", "keys", _]) => "/admin/keys/{id}",
        (_, ["admin", "actors"]) => "/admin/actors",
        (_, ["admin", "providers"]) => "/admin/providers",
        _ => "other",
    }
}

pub struct Request {
    pub method: Method,
    pub path: Cow<'static, str>,
    pub query: String,
    pub headers: HeaderMap,
    pub body_deadline: Option<BodyDeadline>,
}

/// The response, and the route's template for the metrics ([`route_label`]): the path is
/// split once for both.
async fn route<S, E>(app: Arc<App>, req: Request, body: S) -> (&'static str, Response)
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
{
    let segments = Segments::of(&req.path);
    let label = route_label(&req.method, segments.as_slice());
    let limit = app.config.limits.max_body_bytes;
    let m = &req.method;
    // Every body is read (within the limits) before anything else: a body left unread would
    // leave the connection unusable for the client's next request.
    let body = match read_body(&req, body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let is_chat = matches!(
                segments.as_slice(),
                ["v1", "chat", "completions"] | ["v1", "messages"]
            );
            let resp = e.into_response();
            let resp = if is_chat {
                with_request_id(resp, &chat::new_request_id())
            } else {
                resp
            };
            return (label, resp);
        }
    };
    let result = match segments.as_slice() {
        ["v1", "chat", "completions"] if m == Method::POST => {
            return (label, chat::completions(app, req.headers, body).await);
        }
        ["v1", "messages"] if m == Method::POST => {
            return (label, chat::messages(app, req.headers, body).await);
        }
        ["v1", "models"] if m == Method::GET => list_models(&app, &req).await,
        ["v1", "models", _, ..] if m == Method::GET => retrieve_model(&app, &req).await,
        ["healthz"] if m == Method::GET => {
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
        }
        ["readyz"] if m == Method::GET => ready(&app).await,
        ["metrics"] if m == Method::GET => admin::authorize(&app, &req).map(|()| {
            let mut resp = Response::new(crate::telemetry::render().into());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }),
        ["admin", rest @ ..] => match admin::authorize(&app, &req) {
            Ok(()) => admin::route(&app, &req, rest, body).await,
            Err(e) => Err(e),
        },
        ["v1", "chat", "completions"]
        | ["v1", "messages"]
        | ["v1", "models", ..]
        | ["healthz"]
        | ["readyz"]
        | ["metrics"] => Err(ApiError::MethodNotAllowed(req.method.to_string())),
        _ => Err(ApiError::NotFound(format!(
            "No route for {} {}.",
            req.method, req.path
        ))),
    };
    (label, result.unwrap_or_else(ApiError::into_response))
}

/// When the request's body must have arrived whole (`limits.body_read_timeout_ms`).
#[derive(Clone, Copy, Debug)]
pub struct BodyDeadline {
    at: tokio::time::Instant,
    ms: u64,
}

/// Reads a body up to `limit` bytes; refuses a larger one as soon as it is known to be larger,
/// and answers 408 when it has not arrived whole by the request's body deadline.
async fn read_body<S, E>(req: &Request, body: S, limit: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
{
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let read = async move {
        let mut body = body;
        let mut buf = BytesMut::with_capacity(declared.map(|n| n as usize).unwrap_or(0).min(limit));
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|_| {
                ApiError::InvalidRequest("The request body could not be read.".to_owned())
            })?;
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    match req.body_deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.at, read)
            .await
            .unwrap_or(Err(ApiError::RequestTimeout(deadline.ms))),
        None => read.await,
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    // A byte search, as in `Segments::of`.
    let space = value.bytes().position(|b| b == b' ')?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Seconds since the Unix epoch, for the `created` of what the gateway writes itself.
pub(crate) fn unix_secs() -> i64 {
    tollgate_actors::store::now_ms() / 1000
}

/// The key-authenticated caller, or 401.
async fn authenticate(
    app: &App,
    headers: &HeaderMap,
) -> Result<Arc<tollgate_actors::keys::KeyInfo>, ApiError> {
    // `Authorization: Bearer` as OpenAI's SDKs send it, or `x-api-key` as Anthropic's do.
    let token = bearer(headers)
        .or_else(|| headers.get("x-api-key")?.to_str().ok())
        .ok_or(ApiError::InvalidApiKey)?;
    let key = app.keys.authenticate(token).await.map_err(|e| match e {
        tollgate_actors::keys::KeyError::Invalid => ApiError::InvalidApiKey,
        other => {
            tracing::error!(error = %other, "key lookup failed");
            ApiError::Unavailable("key store".to_owned())
        }
    })?;
    if key.is_expired(tollgate_actors::store::now_ms()) {
        return Err(ApiError::ExpiredApiKey);
    }
    Ok(key)
}

async fn list_models(app: &App, req: &Request) -> Result<Response, ApiError> {
    let key = authenticate(app, &req.headers).await?;
    let mut models: Vec<&Arc<Model>> = app
        .catalog
        .values()
        .filter(|m| key.allows_model(&m.id))
        .collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    let data: Vec<_> = models.iter().map(|m| model_object(m)).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

/// `GET /v1/models/{id}`: one model as `/v1/models` lists it. The id is the rest of the path,
/// percent-decoded (an id may hold `/` or `:`). A model the key may not use is not found, as
/// it is not listed.
async fn retrieve_model(app: &App, req: &Request) -> Result<Response, ApiError> {
    let key = authenticate(app, &req.headers).await?;
    let raw = req.path.strip_prefix("/v1/models/").unwrap_or_default();
    let id = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    match app.catalog.get(id.as_ref()) {
        Some(m) if key.allows_model(&m.id) => Ok(json_response(StatusCode::OK, &model_object(m))),
        _ => Err(ApiError::ModelNotFound(id.into_owned())),
    }
}

/// A model in OpenAI's shape, with its prices.
fn model_object(m: &Model) -> serde_json::Value {
    json!({
        "id": m.id,
        "object": "model",
        "created": 0,
        "owned_by": m.provider(),
        "pricing": {
            "currency": "USDT",
            "input_per_mtok": tollgate_actors::Amount(m.price.input_per_mtok as i64).to_string(),
            "output_per_mtok": tollgate_actors::Amount(m.price.output_per_mtok as i64).to_string(),
        },
        "max_output_tokens": m.max_output_tokens,
    })
}

async fn ready(app: &App) -> Result<Response, ApiError> {
    let store = app.store.ping().await.is_ok();
    let actors = app.system.is_running();
    let status = if store && actors {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(
        status,
        &json!({"store": store, "supervisor": actors}),
    ))
}

pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

pub fn with_request_id(mut resp: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::Segments;

    /// The segments are split's, for every path up to the limit, and a longer path keeps its
    /// first segments, with the rest as the last one.
    #[test]
    fn segments_are_what_splitting_the_trimmed_path_gives() {
        for path in [
            "",
            "/",
            "//",
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "v1//chat",
            "/admin/accounts/acc_1/keys",
            "/a/b/c/d/e/f/g/h",
            "/a/b/c/d/e/f/g/h/",
        ] {
            let split: Vec<&str> = path.trim_matches('/').split('/').collect();
            assert_eq!(Segments::of(path).as_slice(), split.as_slice(), "{path:?}");
        }
        let long = Segments::of("/admin/a/b/c/d/e/f/g/h/i");
        assert_eq!(
            long.as_slice(),
            ["admin", "a", "b", "c", "d", "e", "f", "g/h/i"].as_slice()
        );
    }
}
