//! Token counts when the upstream reports none (a client that hung up mid-stream, an upstream
//! that omits usage). Counted with the o200k_base encoding; used only on those paths.

use serde_json::Value;

fn count(text: &str) -> u64 {
    let bpe = tiktoken_rs::o200k_base_singleton();
    bpe.encode_ordinary(text).len() as u64
}

/// Prompt tokens of a chat request's `messages`: each message's text, plus the few tokens of
/// framing OpenAI's chat format adds per message and per reply.
pub fn prompt_tokens(messages: &Value) -> u64 {
    let Some(list) = messages.as_array() else {
        return 0;
    };
    let mut total = 3;
    for m in list {
        total += 3;
        if let Some(role) = m.get("role").and_then(Value::as_str) {
            total += count(role);
        }
        if let Some(name) = m.get("name").and_then(Value::as_str) {
            total += 1 + count(name);
        }
        total += content_tokens(m.get("content"));
    }
    total
}

/// Tokens of a `content` field: a string, or an array of parts whose text parts count.
pub fn content_tokens(content: Option<&Value>) -> u64 {
    match content {
        Some(Value::String(s)) => count(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(count)
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_text_and_framing() {
        let messages = serde_json::json!([{"role": "user", "content": "hello world"}]);
        let n = prompt_tokens(&messages);
        // "hello world" is two tokens, "user" one; plus framing 3 + 3.
        assert_eq!(n, 2 + 1 + 6);
        assert_eq!(
            content_tokens(Some(
                &serde_json::json!([{"type": "text", "text": "hello world"}])
            )),
            2
        );
    }
}
