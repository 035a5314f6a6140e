//! Anthropic's Messages API as an upstream (a provider of `kind = "anthropic"`). A call's chat
//! body becomes a Messages request ([`request`]); the message that answers it becomes a chat
//! completion ([`completion`]), and its stream of events chat chunks ([`chunks`]). The rest
//! of the gateway (billing, relaying, the client's own API) sees an OpenAI-style upstream.
//! How each field is carried, and what is refused: docs/billing.md, "Anthropic upstreams".
//!
//! Not a hot path: bodies go through `serde_json::Value`.

use crate::error::ApiError;
use futures::{Stream, StreamExt};
use serde_json::{json, Map, Value};

/// The `anthropic-version` header every request carries.
pub const VERSION: &str = "2023-06-01";

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(message.into())
}

/// The Messages request for a chat request's body. `max_tokens` is what the call may use,
/// for a request that sets no limit of its own: the Messages API requires one.
pub fn request(chat: &[u8], max_tokens: u64) -> Result<Vec<u8>, ApiError> {
    let chat: Map<String, Value> = serde_json::from_slice(chat).map_err(|_| ApiError::Internal)?;
    let mut out = Map::new();
    let mut system = Vec::new();
    let mut messages: Vec<(String, Vec<Value>)> = Vec::new();
    let mut parallel = true;
    let mut limit = None;
    for (name, value) in &chat {
        match name.as_str() {
            "model" => {
                out.insert("model".to_owned(), value.clone());
            }
            "messages" => {
                for m in value.as_array().into_iter().flatten() {
                    message(m, &mut system, &mut messages)?;
                }
            }
            "max_tokens" | "max_completion_tokens" => limit = value.as_u64().or(limit),
            "stop" => {
                let stops = match value {
                    Value::String(s) => json!([s]),
                    Value::Array(_) => value.clone(),
                    _ => json!([]),
                };
                out.insert("stop_sequences".to_owned(), stops);
            }
            // Anthropic takes 0 to 1; OpenAI's 1 to 2 is as random as it gets there.
            "temperature" => {
                let t = value.as_f64().unwrap_or(1.0).clamp(0.0, 1.0);
                out.insert("temperature".to_owned(), json!(t));
            }
            "top_p" | "stream" => {
                out.insert(name.clone(), value.clone());
            }
            "user" => {
                out.insert("metadata".to_owned(), json!({"user_id": value}));
            }
            "tools" => {
                out.insert("tools".to_owned(), tools(value)?);
            }
            "tool_choice" => {
                out.insert("tool_choice".to_owned(), tool_choice(value)?);
            }
            "parallel_tool_calls" => parallel = value.as_bool() != Some(false),
            "n" if value.as_u64().is_none_or(|n| n == 1) => {}
            "response_format" if value.get("type").and_then(Value::as_str) == Some("text") => {}
            "logprobs" if value.as_bool() != Some(true) => {}
            // Sampling and bookkeeping with no counterpart, which leave the answer's kind as
            // it is; the usage chunk a stream always carries.
            "frequency_penalty" | "presence_penalty" | "seed" | "logit_bias" | "service_tier"
            | "store" | "metadata" | "stream_options" | "reasoning_effort" => {}
            other => {
                return Err(refused(format!(
                    "`{other}` (as sent) is not supported by this model's provider (Anthropic's Messages API)."
                )))
            }
        }
    }
    if !system.is_empty() {
        out.insert("system".to_owned(), Value::from(system.join("\n\n")));
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    out.insert("messages".to_owned(), Value::Array(messages));
    out.insert("max_tokens".to_owned(), json!(limit.unwrap_or(max_tokens)));
    if !parallel {
        let choice = out
            .entry("tool_choice")
            .or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = Value::Bool(true);
    }
    serde_json::to_vec(&out).map_err(|_| ApiError::Internal)
}

/// Adds one chat message: system text to `system`, the rest as blocks to `messages`, where
/// consecutive messages of one role become one (a `tool` message is a user's `tool_result`).
fn message(
    m: &Value,
    system: &mut Vec<String>,
    messages: &mut Vec<(String, Vec<Value>)>,
) -> Result<(), ApiError> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
    let content = m.get("content").unwrap_or(&Value::Null);
    let (role, blocks) = match role {
        "system" | "developer" => {
            system.push(text_of(content)?);
            return Ok(());
        }
        "user" => ("user", blocks_of(content)?),
        "assistant" => {
            let mut blocks = blocks_of(content)?;
            for call in m
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                let input: Value = serde_json::from_str(arguments)
                    .map_err(|_| refused("A tool call's `arguments` must be JSON."))?;
                blocks.push(json!({"type": "tool_use", "id": call["id"],
                    "name": call["function"]["name"], "input": input}));
            }
            ("assistant", blocks)
        }
        "tool" => {
            let result = json!({"type": "tool_result", "tool_use_id": m["tool_call_id"],
                "content": text_of(content)?});
            ("user", vec![result])
        }
        other => {
            return Err(refused(format!(
                "Messages of role `{other}` are not supported by this model's provider."
            )))
        }
    };
    if blocks.is_empty() {
        return Ok(());
    }
    match messages.last_mut() {
        Some((last, content)) if last == role => content.extend(blocks),
        _ => messages.push((role.to_owned(), blocks)),
    }
    Ok(())
}

/// Text content: a string, or text parts joined.
fn text_of(content: &Value) -> Result<String, ApiError> {
    Ok(blocks_of(content)?
        .iter()
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Chat content as Messages blocks: text, and images (a data URL as base64).
fn blocks_of(content: &Value) -> Result<Vec<Value>, ApiError> {
    let parts = match content {
        Value::Null => return Ok(Vec::new()),
        Value::String(s) if s.is_empty() => return Ok(Vec::new()),
        Value::String(s) => return Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => parts,
        _ => {
            return Err(refused(
                "A message's `content` must be a string or an array of parts.",
            ))
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => blocks.push(json!({"type": "text", "text": part["text"]})),
            Some("image_url") => {
                let url = part["image_url"]["url"].as_str().unwrap_or_default();
                let source = match url
                    .strip_prefix("data:")
                    .and_then(|rest| rest.split_once(";base64,"))
                {
                    Some((media_type, data)) => {
                        json!({"type": "base64", "media_type": media_type, "data": data})
                    }
                    None => json!({"type": "url", "url": url}),
                };
                blocks.push(json!({"type": "image", "source": source}));
            }
            other => {
                return Err(refused(format!(
                    "Content parts of type `{}` are not supported by this model's provider.",
                    other.unwrap_or("(none)")
                )))
            }
        }
    }
    Ok(blocks)
}

fn tools(value: &Value) -> Result<Value, ApiError> {
    let mut out = Vec::new();
    for t in value.as_array().into_iter().flatten() {
        let f = &t["function"];
        if t["type"] != "function" || !f["name"].is_string() {
            return Err(refused(
                "Only function tools are supported by this model's provider.",
            ));
        }
        let mut tool = json!({"name": f["name"],
            "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
        if let Some(description) = f.get("description") {
            tool["description"] = description.clone();
        }
        out.push(tool);
    }
    Ok(Value::Array(out))
}

fn tool_choice(value: &Value) -> Result<Value, ApiError> {
    Ok(match value {
        Value::String(s) if s == "auto" => json!({"type": "auto"}),
        Value::String(s) if s == "required" => json!({"type": "any"}),
        Value::String(s) if s == "none" => json!({"type": "none"}),
        v if v["function"]["name"].is_string() => {
            json!({"type": "tool", "name": v["function"]["name"]})
        }
        _ => {
            return Err(refused(
                "`tool_choice` is not one this model's provider takes.",
            ))
        }
    })
}

/// Why an answer ended, as chat says it.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn tokens(u: &Value, name: &str) -> u64 {
    u.get(name).and_then(Value::as_u64).unwrap_or(0)
}

/// The prompt tokens of Messages usage as chat counts them, with the tokens read from and
/// written to the prompt cache (billed at the input price), and the cached ones (those read).
fn prompt_of(u: &Value) -> (u64, u64) {
    let read = tokens(u, "cache_read_input_tokens");
    let prompt = tokens(u, "input_tokens") + read + tokens(u, "cache_creation_input_tokens");
    (prompt, read)
}

/// Chat usage for Messages usage; the prompt's figures from `input` where `u` has none (a
/// stream's `message_delta` may carry only its output).
fn usage(u: &Value, input: Option<(u64, u64)>) -> Value {
    let (prompt, cached) = match input {
        Some(earlier) if u.get("input_tokens").and_then(Value::as_u64).is_none() => earlier,
        _ => prompt_of(u),
    };
    let completion = tokens(u, "output_tokens");
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

/// The chat completion for a Messages answer; what is not a message passes as it is.
pub fn completion(message: &[u8]) -> bytes::Bytes {
    let Ok(m) = serde_json::from_slice::<Value>(message) else {
        return bytes::Bytes::copy_from_slice(message);
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in m["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(json!({"id": block["id"], "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()}})),
            _ => {}
        }
    }
    let mut msg = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    let chat = json!({
        "id": m["id"], "object": "chat.completion", "created": crate::http::unix_secs(),
        "model": m["model"],
        "choices": [{"index": 0, "message": msg,
            "finish_reason": finish_reason(m["stop_reason"].as_str())}],
        "usage": usage(&m["usage"], None),
    });
    bytes::Bytes::from(serde_json::to_vec(&chat).unwrap_or_default())
}

/// A Messages stream's events as chat chunks, ending with `[DONE]` at `message_stop`. An
/// `error` event ends the stream there, which the relay takes as a stream broken off.
pub fn chunks<S, E>(events: S) -> impl Stream<Item = Result<eventsource_stream::Event, E>>
where
    S: Stream<Item = Result<eventsource_stream::Event, E>>,
{
    events
        .scan(Chunks::default(), |state, item| {
            let next = match item {
                Err(e) => Some(Some(Err(e))),
                Ok(event) => match state.chunk(&event.data) {
                    Step::Skip => Some(None),
                    Step::Failed => None,
                    Step::Data(data) => Some(Some(Ok(eventsource_stream::Event {
                        event: String::new(),
                        data,
                        id: String::new(),
                        retry: None,
                    }))),
                },
            };
            std::future::ready(next)
        })
        .filter_map(std::future::ready)
}

enum Step {
    Data(String),
    Skip,
    Failed,
}

/// What a stream has told so far.
#[derive(Default)]
struct Chunks {
    id: Value,
    model: Value,
    /// Prompt and cached tokens, from `message_start`.
    input: Option<(u64, u64)>,
    /// Content block index → tool call index, for the blocks that are tool uses.
    tools: Vec<(u64, u64)>,
}

impl Chunks {
    fn chunk(&mut self, data: &str) -> Step {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return Step::Skip;
        };
        let delta = match event["type"].as_str() {
            Some("message_start") => {
                let m = &event["message"];
                self.id = m["id"].clone();
                self.model = m["model"].clone();
                self.input = Some(prompt_of(&m["usage"]));
                json!({"role": "assistant", "content": ""})
            }
            Some("content_block_start") if event["content_block"]["type"] == "tool_use" => {
                let block = event["index"].as_u64().unwrap_or(0);
                let index = self.tools.len() as u64;
                self.tools.push((block, index));
                let b = &event["content_block"];
                json!({"tool_calls": [{"index": index, "id": b["id"], "type": "function",
                    "function": {"name": b["name"], "arguments": ""}}]})
            }
            Some("content_block_delta") => {
                let d = &event["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => json!({"content": d["text"]}),
                    Some("input_json_delta") => {
                        let block = event["index"].as_u64().unwrap_or(0);
                        let Some(&(_, index)) = self.tools.iter().find(|(b, _)| *b == block) else {
                            return Step::Skip;
                        };
                        json!({"tool_calls": [{"index": index,
                            "function": {"arguments": d["partial_json"]}}]})
                    }
                    _ => return Step::Skip,
                }
            }
            Some("message_delta") => {
                let reason = finish_reason(event["delta"]["stop_reason"].as_str());
                let mut chunk = self.chunk_with(json!({}), json!(reason));
                chunk["usage"] = usage(&event["usage"], self.input);
                return Step::Data(chunk.to_string());
            }
            Some("message_stop") => return Step::Data("[DONE]".to_owned()),
            Some("error") => return Step::Failed,
            _ => return Step::Skip,
        };
        Step::Data(self.chunk_with(delta, Value::Null).to_string())
    }

    fn chunk_with(&self, delta: Value, finish_reason: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk",
            "created": crate::http::unix_secs(), "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(datas: &[Value]) -> Vec<String> {
        let events = datas.iter().map(|d| {
            Ok::<_, ()>(eventsource_stream::Event {
                event: String::new(),
                data: d.to_string(),
                id: String::new(),
                retry: None,
            })
        });
        futures::executor::block_on(
            chunks(futures::stream::iter(events))
                .filter_map(|e| std::future::ready(e.ok().map(|e| e.data)))
                .collect(),
        )
    }

    #[test]
    fn a_stream_counts_the_cache_in_the_prompt_and_ends_at_message_stop() {
        let out = events(&[
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "c",
                "usage": {"input_tokens": 10, "cache_read_input_tokens": 30,
                    "cache_creation_input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}),
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hidden"}}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "text_delta", "text": "hi"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 7}}),
            json!({"type": "message_stop"}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "text_delta", "text": "after the end"}}),
        ]);
        let chunks: Vec<Value> = out
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        assert_eq!(out.len(), 5, "{out:?}");
        assert_eq!(out.get(3).map(String::as_str), Some("[DONE]"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "hi");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            chunks[2]["usage"],
            json!({"prompt_tokens": 45, "completion_tokens": 7, "total_tokens": 52,
                "prompt_tokens_details": {"cached_tokens": 30}})
        );
    }

    #[test]
    fn an_error_event_ends_the_stream_where_it_is() {
        let out = events(&[
            json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}}),
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "a"}}),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
            json!({"type": "message_stop"}),
        ]);
        assert_eq!(out.len(), 2, "no [DONE] after an error: {out:?}");
    }

    #[test]
    fn what_has_no_counterpart_is_refused_or_dropped_as_documented() {
        let translate = |chat: Value| {
            request(chat.to_string().as_bytes(), 99)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        };
        let base = json!({"model": "c", "messages": [{"role": "user", "content": "x"}]});
        let with = |name: &str, value: Value| {
            let mut v = base.clone();
            v[name] = value;
            v
        };
        for refused in [
            with("n", json!(2)),
            with("logprobs", json!(true)),
            with("response_format", json!({"type": "json_object"})),
            with("audio", json!({})),
        ] {
            assert_eq!(translate(refused.clone()), None, "{refused}");
        }
        for dropped in [
            with("seed", json!(1)),
            with("frequency_penalty", json!(0.5)),
            with("n", json!(1)),
            with("stream_options", json!({"include_usage": true})),
        ] {
            assert_eq!(
                translate(dropped),
                Some(json!({"model": "c", "max_tokens": 99,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}))
            );
        }
        let choice = translate(with(
            "tool_choice",
            json!({"type": "function", "function": {"name": "f"}}),
        ));
        assert_eq!(
            choice.map(|v| v["tool_choice"].clone()),
            Some(json!({"type": "tool", "name": "f"}))
        );
    }
}
