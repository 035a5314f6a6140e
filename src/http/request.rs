//! Parsing and validating a client's chat request, before anything is reserved or sent.
//! Pure: no I/O, no panics on any input (a property test in `tests/` holds it to that).

use crate::error::ApiError;
use serde_json::{Map, Value};

/// A chat request that passed validation. `fields` is the whole request, passed upstream
/// after the gateway's edits (model name, usage option, lowered max_tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub fields: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    pub max_completion_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    /// Number of choices; 1 to 128.
    pub n: u64,
    /// The client asked for the usage chunk of a stream itself.
    pub wants_usage: bool,
}

fn invalid(message: &str) -> ApiError {
    ApiError::InvalidRequest(message.to_owned())
}

fn field_u64(request: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::InvalidRequest(format!("`{name}` must be a non-negative integer."))
        }),
    }
}

pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let fields: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequest(match e.classify() {
            serde_json::error::Category::Data => {
                "The request body must be a JSON object.".to_owned()
            }
            _ => format!(
                "The request body is not valid JSON (line {}, column {}).",
                e.line(),
                e.column()
            ),
        })
    })?;
    let model = match fields.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(invalid("`model` must be a non-empty string.")),
        None => return Err(invalid("You must provide a model parameter.")),
    };
    match fields.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => {
            if !m.iter().all(Value::is_object) {
                return Err(invalid("Each item of `messages` must be an object."));
            }
        }
        Some(Value::Array(_)) => return Err(invalid("`messages` must not be empty.")),
        Some(_) => return Err(invalid("`messages` must be an array.")),
        None => return Err(invalid("Missing required parameter: `messages`.")),
    }
    let stream = match fields.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be a boolean.")),
    };
    let wants_usage = match fields.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("`stream_options.include_usage` must be a boolean.")),
        },
        Some(_) => return Err(invalid("`stream_options` must be an object.")),
    };
    let max_completion_tokens = field_u64(&fields, "max_completion_tokens")?;
    let max_tokens = field_u64(&fields, "max_tokens")?;
    let n = field_u64(&fields, "n")?.unwrap_or(1);
    if n == 0 || n > 128 {
        return Err(invalid("`n` must be between 1 and 128."));
    }
    Ok(ChatRequest {
        fields,
        model,
        stream,
        max_completion_tokens,
        max_tokens,
        n,
        wants_usage,
    })
}
