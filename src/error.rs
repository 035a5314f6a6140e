//! The one place that decides what an error means to a client: status code and the OpenAI
//! error shape `{"error":{"message","type","code"}}`.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde_json::json;
use tollgate_actors::BillingError;
use warp::reply::Response;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Incorrect API key provided. Pass it as `Authorization: Bearer sk-tg-…`.")]
    InvalidApiKey,
    #[error("This API key has expired.")]
    ExpiredApiKey,
    #[error("Invalid admin token.")]
    InvalidAdminToken,
    #[error("This API key may not use model `{0}`.")]
    ModelNotAllowed(String),
    #[error("This API key has reached its spend cap or the account balance is too low: {0}")]
    InsufficientBalance(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("Method {0} is not allowed on this path.")]
    MethodNotAllowed(String),
    #[error("Request body is larger than the limit of {0} bytes.")]
    PayloadTooLarge(usize),
    #[error("The request body did not arrive within {0} ms.")]
    RequestTimeout(u64),
    #[error("{0}")]
    Conflict(String),
    /// With when to try again, in milliseconds, where that is known (the upstream's figure,
    /// or when a provider's limit a minute has room); else a second is said.
    #[error("{0}")]
    RateLimited(String, Option<u64>),
    #[error("{0}")]
    Upstream(String),
    #[error("The upstream provider did not answer in time.")]
    UpstreamTimeout,
    #[error("{0} is unavailable; try again shortly.")]
    Unavailable(String),
    #[error("Internal error.")]
    Internal,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            ExpiredApiKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            InvalidAdminToken => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_admin_token",
            ),
            ModelNotAllowed(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "model_not_allowed",
            ),
            InsufficientBalance(_) => (
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_balance",
                "insufficient_balance",
            ),
            InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request_error",
            ),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
            ),
            RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
            ),
            Conflict(_) => (StatusCode::CONFLICT, "invalid_request_error", "conflict"),
            RateLimited(..) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_error", "upstream_error"),
            UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_timeout",
            ),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "service_unavailable",
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub fn into_response(self) -> Response {
        self.respond(false)
    }

    /// As [`Self::into_response`], in the shape the Anthropic SDKs read too: the same `error`
    /// object, under a top-level `"type": "error"` (the Messages API, `/v1/messages`).
    pub fn into_anthropic_response(self) -> Response {
        self.respond(true)
    }

    fn respond(self, anthropic: bool) -> Response {
        let (status, kind, code) = self.parts();
        let message = self.to_string();
        let mut resp = if anthropic {
            let body = json!({"type": "error",
                "error": {"message": message, "type": kind, "code": code, "param": null}});
            json_response(status, &body)
        } else {
            error_response(status, &message, kind, code)
        };
        match self {
            // The rest of the body was not read: this connection cannot carry another request.
            ApiError::PayloadTooLarge(_) | ApiError::RequestTimeout(_) => {
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            // When to try again, in the two headers the official SDKs read: the upstream's
            // figure where it gave one, else a second (our own limits and shortages pass
            // quickly, and the SDKs back off further on each retry).
            ApiError::RateLimited(_, after_ms) => retry_after(&mut resp, after_ms.unwrap_or(1000)),
            ApiError::Unavailable(_) => retry_after(&mut resp, 1000),
            _ => {}
        }
        resp
    }
}

fn retry_after(resp: &mut Response, ms: u64) {
    let headers = resp.headers_mut();
    headers.insert("retry-after", HeaderValue::from(ms.div_ceil(1000)));
    headers.insert("retry-after-ms", HeaderValue::from(ms));
}

/// When an upstream's answer says to try again, in milliseconds: `retry-after-ms`, else
/// `retry-after` in whole seconds (an HTTP date there is not read).
pub fn upstream_retry_after(headers: &http::HeaderMap) -> Option<u64> {
    let value = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    if let Some(ms) = value("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(ms.ceil() as u64);
        }
    }
    let secs = value("retry-after")?.parse::<u64>().ok()?;
    Some(secs.saturating_mul(1000))
}

pub fn error_response(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    json_response(status, &body)
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Bytes::from(bytes).into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::InsufficientBalance { .. } => {
                ApiError::InsufficientBalance(e.to_string())
            }
            // A key whose account is gone authenticates nothing.
            BillingError::NoSuchAccount(_) => ApiError::InvalidApiKey,
            BillingError::Unavailable(what) => ApiError::Unavailable(what.to_owned()),
            BillingError::LedgerBufferFull(_) => ApiError::Unavailable(
                // The store may be down, slow, or still taking a replayed journal.
                "Billing (too many charges are waiting for the store)".to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::upstream_retry_after;

    fn after(pairs: &[(&'static str, &'static str)]) -> Option<u64> {
        let mut headers = http::HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, http::HeaderValue::from_static(value));
        }
        upstream_retry_after(&headers)
    }

    #[test]
    fn an_upstream_says_when_to_retry_in_milliseconds_or_seconds() {
        assert_eq!(after(&[]), None);
        assert_eq!(after(&[("retry-after", "7")]), Some(7000));
        assert_eq!(after(&[("retry-after", " 2 ")]), Some(2000));
        // The finer of the two wins, rounded up to a whole millisecond.
        assert_eq!(
            after(&[("retry-after", "7"), ("retry-after-ms", "1500.2")]),
            Some(1501)
        );
        // An HTTP date, a negative or a word is not read.
        assert_eq!(
            after(&[("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")]),
            None
        );
        assert_eq!(
            after(&[("retry-after-ms", "-5"), ("retry-after", "x")]),
            None
        );
        assert_eq!(
            after(&[("retry-after-ms", "NaN"), ("retry-after", "3")]),
            Some(3000)
        );
    }
}
