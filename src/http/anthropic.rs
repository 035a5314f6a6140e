//! The Anthropic Messages API (`POST /v1/messages`), for clients that speak it, the official
//! Anthropic SDKs among them. A request becomes the OpenAI chat request the rest of the
//! gateway handles ([`to_chat`]), and the answer goes back as a message ([`message`]) or as
//! the Messages API's stream of events ([`StreamTranslator`]). Billing does not change: the
//! upstream's usage at the model's price (docs/billing.md, "The Anthropic Messages API").
//!
//! Not a hot path: requests and answers go through `serde_json::Value`.

use crate::error::ApiError;
use bytes::BytesMut;
use serde_json::{json, Map, Value};

/// Token counts as the Messages API reports them: its `input_tokens` leave out the tokens
/// read from the prompt cache, which OpenAI's `prompt_tokens` include.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

impl Counts {
    fn json(self) -> Value {
        json!({
            "input_tokens": self.prompt.saturating_sub(self.cached),
            "output_tokens": self.completion,
            "cache_read_input_tokens": self.cached,
            "cache_creation_input_tokens": 0,
        })
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(message.into())
}

/// The OpenAI chat request's body for a Messages request, or why there is none. `top_k` has no
/// counterpart and is dropped; a field or content block the gateway cannot carry is refused
/// (400), never dropped silently.
pub fn to_chat(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let request: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("The request body is not a JSON object: {e}")))?;
    let mut chat = Map::new();
    let mut system = None;
    for (name, value) in &request {
        match name.as_str() {
            "model" | "messages" => {}
            "max_tokens" => {
                if !value.is_u64() {
                    return Err(invalid("`max_tokens` must be a positive integer."));
                }
                chat.insert("max_tokens".to_owned(), value.clone());
            }
            "system" => system = Some(text_of(value, "system")?),
            "stop_sequences" => {
                let strings = value
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_string));
                if !strings {
                    return Err(invalid("`stop_sequences` must be an array of strings."));
                }
                chat.insert("stop".to_owned(), value.clone());
            }
            "temperature" | "top_p" => {
                if !value.is_number() {
                    return Err(invalid(format!("`{name}` must be a number.")));
                }
                chat.insert(name.clone(), value.clone());
            }
            "top_k" => {}
            "stream" => {
                if !value.is_boolean() {
                    return Err(invalid("`stream` must be true or false."));
                }
                chat.insert("stream".to_owned(), value.clone());
            }
            "metadata" => {
                if let Some(user) = value.get("user_id").and_then(Value::as_str) {
                    chat.insert("user".to_owned(), Value::from(user));
                }
            }
            "tools" => {
                chat.insert("tools".to_owned(), tools(value)?);
            }
            "tool_choice" => {
                let (choice, parallel) = tool_choice(value)?;
                chat.insert("tool_choice".to_owned(), choice);
                if !parallel {
                    chat.insert("parallel_tool_calls".to_owned(), Value::Bool(false));
                }
            }
            other => {
                return Err(invalid(format!(
                    "`{other}` is not supported by this gateway's Messages API."
                )))
            }
        }
    }
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("`model` is required, as a string."))?;
    if !chat.contains_key("max_tokens") {
        return Err(invalid("`max_tokens` is required."));
    }
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    let list = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("`messages` is required, as an array."))?;
    for m in list {
        message_to_chat(m, &mut messages)?;
    }
    chat.insert("model".to_owned(), Value::from(model));
    chat.insert("messages".to_owned(), Value::Array(messages));
    serde_json::to_vec(&chat).map_err(|_| ApiError::Internal)
}

/// A `system` prompt or a tool result's content: a string, or text blocks (joined by a blank
/// line).
fn text_of(value: &Value, what: &str) -> Result<String, ApiError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for b in blocks {
                match (
                    b.get("type").and_then(Value::as_str),
                    b.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => return Err(invalid(format!("`{what}` may hold only text blocks here."))),
                }
            }
            Ok(texts.join("\n\n"))
        }
        _ => Err(invalid(format!(
            "`{what}` must be a string or an array of text blocks."
        ))),
    }
}

/// One Messages message as chat messages: a user message's tool results become `tool`
/// messages (first, so that they follow the assistant message that called the tools), an
/// assistant's tool uses its `tool_calls`.
fn message_to_chat(m: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let role = m.get("role").and_then(Value::as_str);
    let content = m
        .get("content")
        .ok_or_else(|| invalid("Each message needs `content`."))?;
    let blocks = match (role, content) {
        (Some(role @ ("user" | "assistant")), Value::String(text)) => {
            out.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        (Some("user" | "assistant"), Value::Array(blocks)) => blocks,
        (Some("user" | "assistant"), _) => {
            return Err(invalid(
                "A message's `content` must be a string or an array of blocks.",
            ))
        }
        _ => return Err(invalid("A message's `role` must be `user` or `assistant`.")),
    };
    let kind = |b: &Value| b.get("type").and_then(Value::as_str).map(str::to_owned);
    let field = |b: &Value, name: &str| -> Result<String, ApiError> {
        b.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| invalid(format!("A content block lacks its `{name}`.")))
    };
    if role == Some("assistant") {
        let mut text = String::new();
        let mut calls = Vec::new();
        for b in blocks {
            match kind(b).as_deref() {
                Some("text") => text.push_str(&field(b, "text")?),
                Some("tool_use") => calls.push(json!({
                    "id": field(b, "id")?,
                    "type": "function",
                    "function": {
                        "name": field(b, "name")?,
                        "arguments": b.get("input").unwrap_or(&json!({})).to_string(),
                    },
                })),
                // The model's reasoning from an earlier turn: chat upstreams take none back.
                Some("thinking" | "redacted_thinking") => {}
                other => return Err(unsupported_block(other)),
            }
        }
        let mut message = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        out.push(message);
        return Ok(());
    }
    let mut parts = Vec::new();
    for b in blocks {
        match kind(b).as_deref() {
            Some("text") => parts.push(json!({"type": "text", "text": field(b, "text")?})),
            Some("image") => parts.push(image(b)?),
            Some("tool_result") => {
                let content = match b.get("content") {
                    None => String::new(),
                    Some(c) => text_of(c, "tool_result content")?,
                };
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": field(b, "tool_use_id")?,
                    "content": content,
                }));
            }
            other => return Err(unsupported_block(other)),
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn unsupported_block(kind: Option<&str>) -> ApiError {
    invalid(format!(
        "Content blocks of type `{}` are not supported by this gateway's Messages API.",
        kind.unwrap_or("(none)")
    ))
}

/// An image block as a chat `image_url` part: a URL as it is, base64 data as a data URL.
fn image(b: &Value) -> Result<Value, ApiError> {
    let source = b.get("source").unwrap_or(&Value::Null);
    let text = |name: &str| source.get(name).and_then(Value::as_str);
    let url =
        match (text("type"), text("url"), text("media_type"), text("data")) {
            (Some("url"), Some(url), _, _) => url.to_owned(),
            (Some("base64"), _, Some(media_type), Some(data)) => {
                format!("data:{media_type};base64,{data}")
            }
            _ => return Err(invalid(
                "An image's `source` must be {type: url, url} or {type: base64, media_type, data}.",
            )),
        };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// Client tools as chat function tools; the Messages API's own server tools cannot be carried.
fn tools(value: &Value) -> Result<Value, ApiError> {
    let list = value
        .as_array()
        .ok_or_else(|| invalid("`tools` must be an array."))?;
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        let (Some(name), Some(schema)) =
            (t.get("name").and_then(Value::as_str), t.get("input_schema"))
        else {
            return Err(invalid(
                "Each tool needs a `name` and an `input_schema`; server tools are not supported here.",
            ));
        };
        let mut function = json!({"name": name, "parameters": schema});
        if let Some(description) = t.get("description") {
            function["description"] = description.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as chat's, and whether the model may call tools in parallel.
fn tool_choice(value: &Value) -> Result<(Value, bool), ApiError> {
    let parallel = !value
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let choice = match value.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match value.get("name").and_then(Value::as_str) {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => return Err(invalid("`tool_choice` of type `tool` needs a `name`.")),
        },
        _ => {
            return Err(invalid(
                "`tool_choice` must be of type `auto`, `any`, `tool` or `none`.",
            ))
        }
    };
    Ok((choice, parallel))
}

/// Why a chat answer ended, as the Messages API says it.
fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// A chat tool call as a `tool_use` block; arguments that are not JSON are kept as a string.
fn tool_use(call: &Value) -> Value {
    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
    let input = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!(arguments));
    json!({
        "type": "tool_use",
        "id": call["id"],
        "name": call["function"]["name"],
        "input": input,
    })
}

/// The message for a non-streamed chat answer: its first choice's text and tool calls, and
/// `counts`, the figures the call was billed on.
pub fn message(completion: &[u8], id: &str, model: &str, counts: Counts) -> Vec<u8> {
    let answer = serde_json::from_slice::<Value>(completion).unwrap_or(Value::Null);
    let choice = &answer["choices"][0];
    let mut content = Vec::new();
    if let Some(text) = choice["message"]["content"]
        .as_str()
        .filter(|t| !t.is_empty())
    {
        content.push(json!({"type": "text", "text": text}));
    }
    if let Some(calls) = choice["message"]["tool_calls"].as_array() {
        content.extend(calls.iter().map(tool_use));
    }
    let message = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str()),
        "stop_sequence": null,
        "usage": counts.json(),
    });
    serde_json::to_vec(&message).unwrap_or_default()
}

/// The content block a stream has open.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// A tool call, by its index among the chat stream's tool calls.
    Tool(u64),
}

/// Turns a chat stream's chunks into the Messages API's events: `message_start`, then for
/// each block of text or tool call `content_block_start`, its deltas and
/// `content_block_stop`, and at the end (after the charge) `message_delta` with the stop
/// reason and usage, and `message_stop`.
pub struct StreamTranslator {
    id: String,
    model: String,
    started: bool,
    open: Option<Block>,
    /// The index the next block gets.
    blocks: u64,
    stop_reason: Option<&'static str>,
}

impl StreamTranslator {
    pub fn new(id: &str, model: &str) -> StreamTranslator {
        StreamTranslator {
            id: id.to_owned(),
            model: model.to_owned(),
            started: false,
            open: None,
            blocks: 0,
            stop_reason: None,
        }
    }

    /// Appends the events for one chat chunk (the `data` of its event) to `out`.
    pub fn chunk(&mut self, data: &str, out: &mut BytesMut) {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return;
        };
        self.start(out);
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if self.open != Some(Block::Text) {
                self.open_block(out, Block::Text, json!({"type": "text", "text": ""}));
            }
            self.delta(out, json!({"type": "text_delta", "text": text}));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0);
            if self.open != Some(Block::Tool(index)) {
                let block = json!({"type": "tool_use", "id": call["id"],
                    "name": call["function"]["name"], "input": {}});
                self.open_block(out, Block::Tool(index), block);
            }
            if let Some(part) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                self.delta(
                    out,
                    json!({"type": "input_json_delta", "partial_json": part}),
                );
            }
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.stop_reason = Some(stop_reason(Some(reason)));
        }
    }

    /// The stream's last events, once the call is charged on `counts`.
    pub fn end(&mut self, counts: Counts) -> BytesMut {
        let mut out = BytesMut::new();
        self.start(&mut out);
        self.close_block(&mut out);
        let delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": counts.json(),
        });
        event(&mut out, "message_delta", &delta);
        event(&mut out, "message_stop", &json!({"type": "message_stop"}));
        out
    }

    /// An `error` event, for a stream that cannot end as it should.
    pub fn error(message: &str) -> BytesMut {
        let mut out = BytesMut::new();
        let error = json!({"type": "error", "error": {"type": "api_error", "message": message}});
        event(&mut out, "error", &error);
        out
    }

    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let start = json!({
            "type": "message_start",
            "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": Counts::default().json(),
            },
        });
        event(out, "message_start", &start);
    }

    fn open_block(&mut self, out: &mut BytesMut, block: Block, content_block: Value) {
        self.close_block(out);
        let start = json!({"type": "content_block_start", "index": self.blocks,
            "content_block": content_block});
        event(out, "content_block_start", &start);
        self.open = Some(block);
    }

    fn delta(&self, out: &mut BytesMut, delta: Value) {
        let index = self.blocks;
        event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        if self.open.take().is_some() {
            let stop = json!({"type": "content_block_stop", "index": self.blocks});
            event(out, "content_block_stop", &stop);
            self.blocks += 1;
        }
    }
}

fn event(out: &mut BytesMut, name: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events in `out`, as (name, data).
    fn events(out: &[u8]) -> Vec<(String, Value)> {
        String::from_utf8_lossy(out)
            .split("\n\n")
            .filter_map(|e| {
                let (name, data) = e.split_once('\n')?;
                let data = serde_json::from_str(data.strip_prefix("data: ")?).ok()?;
                Some((name.strip_prefix("event: ")?.to_owned(), data))
            })
            .collect()
    }

    #[test]
    fn an_answer_with_tool_calls_becomes_text_and_tool_use_blocks() {
        let completion = json!({"choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "clock", "arguments": "not json"}}]}}]});
        let counts = Counts {
            prompt: 100,
            completion: 20,
            cached: 60,
        };
        let out = message(completion.to_string().as_bytes(), "req_1", "m", counts);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).ok(),
            Some(json!({
                "id": "req_1", "type": "message", "role": "assistant", "model": "m",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "call_2", "name": "clock", "input": "not json"}
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 40, "output_tokens": 20,
                    "cache_read_input_tokens": 60, "cache_creation_input_tokens": 0}
            }))
        );
    }

    #[test]
    fn a_stream_of_text_then_tool_calls_becomes_numbered_blocks() {
        let mut t = StreamTranslator::new("req_2", "m");
        let mut out = BytesMut::new();
        for chunk in [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "Let me "}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "check."}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1",
                "type": "function", "function": {"name": "weather", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                "function": {"arguments": "{\"city\":"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                "function": {"arguments": "\"Oslo\"}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_2",
                "type": "function", "function": {"name": "clock", "arguments": "{}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}),
        ] {
            t.chunk(&chunk.to_string(), &mut out);
        }
        out.extend_from_slice(&t.end(Counts {
            prompt: 9,
            completion: 5,
            cached: 0,
        }));
        let got = events(&out);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let data = |i: usize| got.get(i).map(|(_, d)| d.clone()).unwrap_or_default();
        assert_eq!(data(0)["message"]["id"], "req_2");
        assert_eq!(
            data(2)["delta"],
            json!({"type": "text_delta", "text": "Let me "})
        );
        assert_eq!(
            data(5)["content_block"],
            json!({"type": "tool_use", "id": "call_1", "name": "weather", "input": {}})
        );
        assert_eq!(
            (data(6)["index"].clone(), data(6)["delta"].clone()),
            (
                json!(1),
                json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
            )
        );
        assert_eq!(data(9)["index"], 2);
        assert_eq!(data(9)["content_block"]["name"], "clock");
        assert_eq!(
            data(12),
            json!({"type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"input_tokens": 9, "output_tokens": 5,
                    "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}})
        );
    }

    #[test]
    fn a_stream_with_nothing_in_it_still_starts_and_ends() {
        let mut t = StreamTranslator::new("req_3", "m");
        let out = t.end(Counts::default());
        let names: Vec<String> = events(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["message_start", "message_delta", "message_stop"]);
        let error = events(&StreamTranslator::error("broken"));
        assert_eq!(
            error.first().map(|(_, d)| d.clone()),
            Some(json!({"type": "error", "error": {"type": "api_error", "message": "broken"}}))
        );
    }
}
