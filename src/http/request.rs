//! Parsing and validating a client's chat request, before anything is reserved or sent.
//! Pure: no I/O, no panics on any input (a property test in `tests/` holds it to that).
//!
//! The request is not turned into a tree of JSON values: the body is split into its top-level
//! fields, each kept as the bytes the client sent, and refused exactly when a full parse
//! would refuse it. Nearly every body is checked and split in one pass of our own
//! ([`split`]), which answers only for bodies it is sure of. Any other goes the longer way:
//! serde_json's split, which checks the syntax as it goes; a scan for the few things that
//! split does not check (surrogate escapes, numbers beyond f64, deep nesting); and, only for a
//! body that may hold one, the strict pass (every string decoded into one reused buffer, every
//! number parsed), which says what is wrong and where. The fields the gateway reads are small
//! and parsed on their own; `messages`, which is nearly all of a request, is only checked to
//! be an array of objects. What goes upstream is those same bytes, with the gateway's few
//! edits: no conversation is decoded and encoded again.

use crate::error::ApiError;
use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

mod split;

/// A chat request that passed validation. `fields` is the whole request, passed upstream
/// after the gateway's edits (model name, usage option, lowered max_tokens).
#[derive(Debug, Clone)]
pub struct ChatRequest<'a> {
    pub fields: Fields<'a>,
    pub model: String,
    pub stream: bool,
    pub max_completion_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    /// Number of choices; 1 to 128.
    pub n: u64,
    /// The client asked for the usage chunk of a stream itself.
    pub wants_usage: bool,
}

/// A request's top-level fields, each value as JSON text: borrowed from the client's body
/// until the gateway sets it. A field sent twice is the last one sent (as in a full parse).
#[derive(Debug, Clone, Default)]
#[cfg_attr(test, derive(PartialEq))]
pub struct Fields<'a>(BTreeMap<String, Field<'a>>);

#[derive(Debug, Clone)]
enum Field<'a> {
    /// As the client sent it: checked JSON text.
    Sent(&'a str),
    /// `messages` as the client sent it, item by item (so that each item's kind is known
    /// without reading the array twice).
    Items(Vec<&'a str>),
    /// `messages` that is not an array: the request is refused, nothing is sent.
    NotArray,
    /// Set by the gateway.
    Set(Box<RawValue>),
}

#[cfg(test)]
impl PartialEq for Field<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Field::Sent(a), Field::Sent(b)) => a == b,
            (Field::Items(a), Field::Items(b)) => a == b,
            (Field::NotArray, Field::NotArray) => true,
            (Field::Set(a), Field::Set(b)) => a.get() == b.get(),
            _ => false,
        }
    }
}

impl Fields<'_> {
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Sets a field to `value`'s JSON.
    pub fn set(&mut self, name: &str, value: &impl Serialize) -> Result<(), ApiError> {
        let raw = serde_json::value::to_raw_value(value).map_err(|_| ApiError::Internal)?;
        self.0.insert(name.to_owned(), Field::Set(raw));
        Ok(())
    }

    /// The request body to send upstream: the fields' texts, joined. Its buffer is sized for
    /// them up front: a long conversation would otherwise be copied again each time the
    /// buffer doubled.
    pub fn to_body(&self) -> Result<Vec<u8>, ApiError> {
        let size = self
            .0
            .iter()
            .map(|(name, field)| name.len() + 4 + field.text_len())
            .sum::<usize>();
        let mut body = Vec::with_capacity(size + 2);
        body.push(b'{');
        for (i, (name, field)) in self.0.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            serde_json::to_writer(&mut body, name).map_err(|_| ApiError::Internal)?;
            body.push(b':');
            match field {
                Field::Sent(text) => body.extend_from_slice(text.as_bytes()),
                Field::Set(raw) => body.extend_from_slice(raw.get().as_bytes()),
                Field::Items(items) => {
                    body.push(b'[');
                    for (j, item) in items.iter().enumerate() {
                        if j > 0 {
                            body.push(b',');
                        }
                        body.extend_from_slice(item.as_bytes());
                    }
                    body.push(b']');
                }
                // Refused by `parse_chat`; never sent.
                Field::NotArray => return Err(ApiError::Internal),
            }
        }
        body.push(b'}');
        Ok(body)
    }

    /// Parses one field as `T`; `None` when absent or `null`, an error when it is not a `T`.
    pub fn parse<T: DeserializeOwned>(&self, name: &str) -> serde_json::Result<Option<T>> {
        let raw = match self.0.get(name) {
            None => return Ok(None),
            Some(Field::Sent(text)) => text,
            Some(Field::Set(raw)) => raw.get(),
            Some(Field::Items(_) | Field::NotArray) => {
                return Err(de::Error::custom("`messages` is read item by item"))
            }
        };
        serde_json::from_str::<Option<T>>(raw)
    }
}

impl Field<'_> {
    /// About how long the field's value is as JSON text (exact unless it is refused anyway).
    fn text_len(&self) -> usize {
        match self {
            Field::Sent(text) => text.len(),
            Field::Items(items) => items.iter().map(|item| item.len() + 1).sum::<usize>() + 1,
            Field::NotArray => 0,
            Field::Set(raw) => raw.get().len(),
        }
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    let value = if name == "messages" {
                        match map.next_value::<Messages<'de>>()? {
                            Messages(Some(items)) => Field::Items(items),
                            Messages(None) => Field::NotArray,
                        }
                    } else {
                        Field::Sent(map.next_value::<&RawValue>()?.get())
                    };
                    fields.insert(name, value);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// An array's items as sent, or `None` for any other kind of value.
struct Messages<'a>(Option<Vec<&'a str>>);

impl<'de> Deserialize<'de> for Messages<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MessagesVisitor;
        impl<'de> Visitor<'de> for MessagesVisitor {
            type Value = Messages<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages<'de>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<&RawValue>()? {
                    items.push(item.get());
                }
                Ok(Messages(Some(items)))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Messages<'de>, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Messages(None))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Messages<'de>, E> {
                Ok(Messages(None))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Messages<'de>, E> {
                Ok(Messages(None))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Messages<'de>, E> {
                Ok(Messages(None))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Messages<'de>, E> {
                Ok(Messages(None))
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<Messages<'de>, E> {
                Ok(Messages(None))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Messages<'de>, E> {
                Ok(Messages(None))
            }
        }
        d.deserialize_any(MessagesVisitor)
    }
}

fn invalid(message: &str) -> ApiError {
    ApiError::InvalidRequest(message.to_owned())
}

fn field_u64(fields: &Fields<'_>, name: &str) -> Result<Option<u64>, ApiError> {
    fields
        .parse::<u64>(name)
        .map_err(|_| ApiError::InvalidRequest(format!("`{name}` must be a non-negative integer.")))
}

fn not_json(line: usize, column: usize) -> ApiError {
    ApiError::InvalidRequest(format!(
        "The request body is not valid JSON (line {line}, column {column})."
    ))
}

pub fn parse_chat(body: &[u8]) -> Result<ChatRequest<'_>, ApiError> {
    // UTF-8 checked once, for the whole body, rather than string by string in each pass.
    let text = std::str::from_utf8(body).map_err(|e| {
        let valid = &body[..e.valid_up_to()];
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let lines = valid.iter().filter(|&&b| b == b'\n').count();
        not_json(lines + 1, valid.len() - line_start + 1)
    })?;
    let fields = match split::split(text) {
        // Nearly every body: checked and split in one pass.
        Some(fields) => fields,
        None => serde_split(text)?,
    };
    let model = match fields.parse::<String>("model") {
        Ok(Some(m)) if !m.is_empty() => m,
        Ok(None) if !fields.contains("model") => {
            return Err(invalid("You must provide a model parameter."))
        }
        _ => return Err(invalid("`model` must be a non-empty string.")),
    };
    match fields.0.get("messages") {
        Some(Field::Items(m)) if m.is_empty() => {
            return Err(invalid("`messages` must not be empty."))
        }
        Some(Field::Items(m)) => {
            if !m.iter().all(|item| item.starts_with('{')) {
                return Err(invalid("Each item of `messages` must be an object."));
            }
        }
        Some(_) => return Err(invalid("`messages` must be an array.")),
        None => return Err(invalid("Missing required parameter: `messages`.")),
    }
    let stream = fields
        .parse::<bool>("stream")
        .map_err(|_| invalid("`stream` must be a boolean."))?
        .unwrap_or(false);
    let wants_usage = match fields.parse::<Map<String, Value>>("stream_options") {
        Ok(None) => false,
        Ok(Some(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("`stream_options.include_usage` must be a boolean.")),
        },
        Err(_) => return Err(invalid("`stream_options` must be an object.")),
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

/// serde_json's split, for the bodies [`split::split`] does not vouch for. It checks the
/// syntax as it goes (strings, escapes, numbers, nesting). A body it refuses is either not
/// JSON, said with the position the strict pass finds, or not an object.
fn serde_split(text: &str) -> Result<Fields<'_>, ApiError> {
    let fields = match serde_json::from_str::<Fields<'_>>(text) {
        Ok(fields) => fields,
        Err(_) => {
            strict(text)?;
            return Err(invalid("The request body must be a JSON object."));
        }
    };
    // What the split lets through and a full parse would refuse: a surrogate escape without
    // its pair, a number beyond f64, nesting beyond serde_json's limit. Only a body that may
    // hold one of these goes through the strict pass.
    if !plainly_valid(text) {
        strict(text)?;
    }
    Ok(fields)
}

/// The strict pass: exactly what a full parse would refuse, refused with its position.
fn strict(text: &str) -> Result<(), ApiError> {
    serde_json::from_str::<Checked>(text)
        .map(|_| ())
        .map_err(|e| not_json(e.line(), e.column()))
}

/// Whether `text`, which the split has read as valid JSON syntax, surely passes the strict
/// pass too. It looks only for what the split does not check: `\\u` escapes of surrogates
/// (accepted here only as a high one directly followed by a low one), numbers with an
/// exponent or of 300 digits or more in a row (a full parse refuses those beyond f64), and
/// nesting deeper than [`PLAIN_DEPTH`] (serde_json refuses beyond 128). `false` means "maybe
/// not", never "not": the strict pass then decides.
///
/// Valid syntax is what makes this short. A backslash stands only in a string and always
/// starts an escape, so a quote or a backslash is escaped exactly when an odd run of
/// backslashes comes before it; the quotes that are not tell strings from the rest, and
/// outside strings there is only structure, literals and numbers. Both scans are `memchr`'s.
pub(crate) fn plainly_valid(text: &str) -> bool {
    let bytes = text.as_bytes();
    let escaped = |at: usize| {
        bytes[..at]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count()
            % 2
            == 1
    };
    let unit = |at: usize| bytes.get(at + 2..at + 6).and_then(code_unit);
    let mut escapes = memchr::memmem::find_iter(bytes, b"\\u")
        .filter(|&at| !escaped(at))
        .peekable();
    while let Some(at) = escapes.next() {
        match unit(at) {
            Some(0xD800..=0xDBFF) => {
                // Its low half must be the very next thing in the string.
                let low = escapes.next_if(|&next| next == at + 6).and_then(unit);
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return false;
                }
            }
            Some(0xDC00..=0xDFFF) | None => return false,
            Some(_) => {}
        }
    }
    let mut outside = Outside::default();
    let mut in_string = false;
    let mut outside_from = 0;
    for at in memchr::memchr_iter(b'"', bytes).filter(|&at| !escaped(at)) {
        if in_string {
            outside_from = at + 1;
        } else if !outside.read(&bytes[outside_from..at]) {
            return false;
        }
        in_string = !in_string;
    }
    !in_string && outside.read(&bytes[outside_from..])
}

/// The UTF-16 code unit that the four hex digits of a `\u` escape spell.
fn code_unit(hex: &[u8]) -> Option<u16> {
    hex.iter().try_fold(0u16, |unit, &b| {
        Some(unit << 4 | char::from(b).to_digit(16)? as u16)
    })
}

/// What [`plainly_valid`] keeps across the stretches of a body outside its strings.
#[derive(Default)]
struct Outside {
    depth: usize,
}

impl Outside {
    /// Reads one stretch outside strings; false if it holds a number with an exponent, 300
    /// digits in a row, or nesting beyond [`PLAIN_DEPTH`]. A number never spans two stretches
    /// (a string ends it).
    fn read(&mut self, stretch: &[u8]) -> bool {
        // In a number: how many digits in a row (its integer part's, then its fraction's).
        let mut number: Option<usize> = None;
        for &b in stretch {
            number = match (b, number) {
                (b'0'..=b'9', digits) => {
                    let digits = digits.unwrap_or(0) + 1;
                    if digits >= 300 {
                        return false;
                    }
                    Some(digits)
                }
                (b'-', None) | (b'.', Some(_)) => Some(0),
                (b'e' | b'E', Some(_)) => return false,
                (b'[' | b'{', _) => {
                    self.depth += 1;
                    if self.depth > PLAIN_DEPTH {
                        return false;
                    }
                    None
                }
                (b']' | b'}', _) => {
                    self.depth = self.depth.saturating_sub(1);
                    None
                }
                _ => None,
            };
        }
        true
    }
}

/// Nesting that [`plainly_valid`] lets through without the strict pass (serde_json's limit is
/// 128; any body deeper than this goes through the strict pass, which knows the exact rule).
const PLAIN_DEPTH: usize = 64;

/// Any JSON value, checked as strictly as `serde_json::Value` would be (strings decoded,
/// surrogates paired, numbers in range, nesting limited) and then forgotten: strings are
/// decoded into the parser's one scratch buffer, so nothing is allocated per value.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the strict pass says of `text`.
    fn strictly_valid(text: &str) -> bool {
        serde_json::from_str::<Checked>(text).is_ok()
    }

    /// A chat body with `content` as its one message's text (JSON string body, as written)
    /// and `extra` as the value of one more field.
    fn body(content: &str, extra: &str) -> String {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}],"extra":{extra}}}"#
        )
    }

    /// `plainly_valid`'s verdict on a body the split accepts, held to the strict pass: a
    /// `true` it was not entitled to fails the test. The one-pass split must answer for the
    /// same bodies (these have no escaped names), with serde_json's fields.
    fn verdict(text: &str) -> bool {
        let fields = serde_json::from_str::<Fields<'_>>(text);
        assert!(fields.is_ok(), "the split refused {text}");
        let plain = plainly_valid(text);
        assert!(
            !plain || strictly_valid(text),
            "plainly valid but refused: {text}"
        );
        let one_pass = split::split(text);
        assert_eq!(one_pass.is_some(), plain, "the one-pass split on {text}");
        if let Some(one_pass) = one_pass {
            assert_eq!(Ok(one_pass), fields.map_err(|e| e.to_string()), "{text}");
        }
        plain
    }

    /// What `parse_chat` would have said before the one-pass split: serde_json's split, then
    /// the scan and the strict pass.
    fn agrees_with_serde(text: &str) -> Result<(), TestCaseError> {
        if let Some(one_pass) = split::split(text) {
            prop_assert!(strictly_valid(text), "vouched for, but not JSON: {}", text);
            let serde = serde_split(text).map_err(|e| e.to_string());
            prop_assert_eq!(Ok(one_pass), serde, "{}", text);
        }
        Ok(())
    }

    /// A body like bench/chat.lua's long conversations: turns of prose with the escapes real
    /// chat histories carry.
    fn conversation(bytes: usize) -> String {
        let turn = r#"The gateway forwards each call upstream and charges its exact cost.\n"#
            .to_owned()
            + r#"A \"quoted\" phrase,\ta tab, and unicode: \u00e9t\u00e9. "#;
        let mut turns = Vec::new();
        let mut size = 0;
        while size < bytes {
            let role = if turns.len() % 2 == 0 {
                "user"
            } else {
                "assistant"
            };
            let m = format!(r#"{{"role":"{role}","content":"{}"}}"#, turn.repeat(8));
            size += m.len() + 1;
            turns.push(m);
        }
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{}],"max_tokens":16}}"#,
            turns.join(",")
        )
    }

    #[test]
    fn the_one_pass_split_takes_what_clients_send() {
        for text in [
            conversation(32_768),
            conversation(10),
            " {\n\t\"model\" : \"m\" ,\r\n \"messages\" : [ {\"role\":\"user\"} , [] , 1 ] } \n"
                .to_owned(),
            r#"{"model":"m","messages":[],"a":{},"b":[],"c":{"d":[null,false,true,-0,0.5]}}"#
                .to_owned(),
            r#"{"model":"m","model":"n","messages":{"not":"an array"}}"#.to_owned(),
            r#"{}"#.to_owned(),
        ] {
            let one_pass = split::split(&text);
            assert!(one_pass.is_some(), "{text}");
            assert_eq!(
                one_pass.ok_or(()),
                serde_split(&text).map_err(|_| ()),
                "{text}"
            );
        }
        let long = conversation(32_768);
        let request = parse_chat(long.as_bytes()).expect("a long conversation");
        let sent: Value =
            serde_json::from_slice(&request.fields.to_body().expect("a body")).expect("JSON");
        let original: Value = serde_json::from_str(&long).expect("JSON");
        assert_eq!(sent, original, "what goes upstream is what was sent");
    }

    #[test]
    fn the_one_pass_split_leaves_the_rest_to_serde_json() {
        for text in [
            // Not JSON, or not quite.
            "",
            "{",
            r#"{"model":"m",}"#,
            r#"{"model" "m"}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":tru}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            "{\"a\":\"tab\there\"}",
            r#"{"a":1} x"#,
            r#"[{"a":1}]"#,
            // JSON, but for serde_json's path to judge.
            r#"{"mod\u0065l":"m"}"#,
            r#"{"a":1e5}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00\ud800"}"#,
        ] {
            assert!(split::split(text).is_none(), "{text}");
        }
        let nested = |n: usize| format!(r#"{{"a":{}1{}}}"#, "[".repeat(n), "]".repeat(n));
        assert!(split::split(&nested(PLAIN_DEPTH - 1)).is_some());
        assert!(split::split(&nested(PLAIN_DEPTH)).is_none());
    }

    #[test]
    fn a_plain_chat_body_needs_no_strict_pass() {
        for content in [
            "Say hello",
            r#"line\nbreak, a \"quote\", a tab\t, \u00e9t\u00e9, a backslash \\ and \/"#,
            r#"ends in a backslash \\"#,
            r#"\\\\\" quotes after backslash runs \\\\\\\""#,
            "ünïcödé and 😀 as they are",
            r#"a pair \ud83d\ude00 and \uD83D\uDE00"#,
            r#"an escaped backslash then u: \\ud800"#,
        ] {
            assert!(verdict(&body(content, "1")), "{content}");
        }
        for extra in [
            "true",
            "false",
            "null",
            "-0.25",
            "0",
            "[1, [2, {\"a\": [3]}]]",
            "\"e\"",
        ] {
            assert!(verdict(&body("x", extra)), "{extra}");
        }
        assert!(verdict(&body("x", &"9".repeat(299))));
    }

    #[test]
    fn what_the_split_lets_through_goes_to_the_strict_pass() {
        for content in [
            r#"lone high \ud800 then text"#,
            r#"lone high at the end \ud800"#,
            r#"lone low \udc00"#,
            r#"two highs \ud83d\ud83d"#,
            r#"high then not a low \ud83d\u0041"#,
            r#"high then another escape \ud83d\n"#,
            r#"reversed \ude00\ud83d"#,
        ] {
            let text = body(content, "1");
            assert!(!verdict(&text), "{content}");
            assert!(!strictly_valid(&text), "serde_json took {content}");
        }
        // Maybe-nots: the strict pass decides, and here it accepts.
        for extra in ["1e5", "1E-3", "-2.5e+10", &"9".repeat(300)] {
            let text = body("x", extra);
            assert!(!verdict(&text), "{extra}");
            assert!(strictly_valid(&text), "{extra}");
        }
        for extra in ["1e400", "-1e309", &format!("{}.5", "9".repeat(400))] {
            let text = body("x", extra);
            assert!(!verdict(&text), "{extra}");
            assert!(!strictly_valid(&text), "serde_json took {extra}");
        }
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        // The body's own object is one level, `extra`'s arrays the rest.
        assert!(verdict(&body("x", &nested(PLAIN_DEPTH - 1))));
        assert!(!verdict(&body("x", &nested(PLAIN_DEPTH))));
        assert!(!strictly_valid(&body("x", &nested(200))));
    }

    #[test]
    fn parse_chat_refuses_what_a_full_parse_refuses_and_says_where() {
        for (content, extra) in [(r#"\ud800"#, "1"), ("x", "1e400"), ("x", &"[".repeat(200))] {
            let extra = if extra.starts_with('[') {
                format!("{extra}{}", "]".repeat(200))
            } else {
                extra.to_owned()
            };
            let text = body(content, &extra);
            let err = parse_chat(text.as_bytes()).expect_err(&text);
            assert!(
                err.to_string().contains("not valid JSON (line 1, column"),
                "{err}"
            );
        }
        // Not an object: the split refuses, the strict pass accepts.
        let err = parse_chat(b"[1, 2]").expect_err("an array");
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
        // Not JSON at all: the position comes from the strict pass.
        let err = parse_chat(b"{\"model\": }").expect_err("broken");
        assert!(
            err.to_string()
                .contains("not valid JSON (line 1, column 11)"),
            "{err}"
        );
    }

    /// Pieces of a JSON string's text: plain, escaped, and every kind of surrogate escape.
    fn string_piece() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z é😀]{0,6}",
            Just(r"\n".to_owned()),
            Just(r#"\""#.to_owned()),
            Just(r"\\".to_owned()),
            Just(r"\\u".to_owned()),
            Just(r"\/".to_owned()),
            Just(r"\u00e9".to_owned()),
            "\\\\u[dD][89abAB][0-9a-fA-F]{2}",
            "\\\\u[dD][c-fC-F][0-9a-fA-F]{2}",
            "\\\\u[0-9a-fA-F]{4}",
        ]
    }

    /// JSON values whose numbers and nesting cross the lines `plainly_valid` draws.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            "-?(0|[1-9][0-9]{0,3}|[1-9][0-9]{295,310})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
            Just("true".to_owned()),
            Just("null".to_owned()),
            prop::collection::vec(string_piece(), 0..6).prop_map(|p| format!("\"{}\"", p.concat())),
        ];
        (leaf, 0..140usize)
            .prop_map(|(leaf, depth)| format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// `plainly_valid` never says yes to what the strict pass refuses, and `parse_chat`
        /// refuses as not JSON exactly what the strict pass refuses.
        #[test]
        fn the_scan_never_lets_through_what_a_full_parse_refuses(
            content in prop::collection::vec(string_piece(), 0..12),
            extra in value(),
        ) {
            let text = body(&content.concat(), &extra);
            let strict = strictly_valid(&text);
            if serde_json::from_str::<Fields<'_>>(&text).is_ok() {
                prop_assert!(!plainly_valid(&text) || strict, "plainly valid but refused: {}", text);
            }
            agrees_with_serde(&text)?;
            let not_json = parse_chat(text.as_bytes())
                .err()
                .is_some_and(|e| e.to_string().contains("not valid JSON"));
            prop_assert_eq!(not_json, !strict, "{}", text);
        }

        #[test]
        fn the_scan_never_panics(text in "\\PC{0,64}") {
            let _ = plainly_valid(&text);
            agrees_with_serde(&text)?;
        }

        /// A body, one byte of it replaced by something JSON cares about: the one-pass split
        /// vouches only for what serde_json's path takes, and splits it the same.
        #[test]
        fn the_one_pass_split_vouches_only_for_what_serde_json_takes(
            content in prop::collection::vec(string_piece(), 0..8),
            extra in value(),
            at in any::<prop::sample::Index>(),
            byte in prop::sample::select(b"\"\\{}[],: \n\t0123456789-+.eEutfnlrsax\x01\x1f".to_vec()),
        ) {
            let mut bytes = body(&content.concat(), &extra).into_bytes();
            let at = at.index(bytes.len());
            bytes[at] = byte;
            if let Ok(text) = std::str::from_utf8(&bytes) {
                agrees_with_serde(text)?;
            }
        }
    }
}
