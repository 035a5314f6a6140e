//! Parsing and validating a client's chat request, before anything is reserved or sent.
//! Pure: no I/O, no panics on any input (a property test in `tests/` holds it to that).
//!
//! The request is not turned into a tree of JSON values: the body is first checked as
//! strictly as a full parse would check it (every string decoded into one reused buffer, every
//! number in range), then split into its top-level fields, each kept as the bytes the client
//! sent. The fields the gateway reads are
//! small and parsed on their own; `messages`, which is nearly all of a request, is only
//! checked to be an array of objects. What goes upstream is those same bytes, with the
//! gateway's few edits: no conversation is decoded and encoded again.

use crate::error::ApiError;
use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

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
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Fields<'a>(BTreeMap<String, Field<'a>>);

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum Field<'a> {
    /// As the client sent it.
    Sent(&'a RawValue),
    /// `messages` as the client sent it, item by item (so that each item's kind is known
    /// without reading the array twice).
    Items(Vec<&'a RawValue>),
    /// `messages` that is not an array: the request is refused, nothing is sent.
    #[serde(skip)]
    NotArray,
    /// Set by the gateway.
    Set(Box<RawValue>),
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

    /// The request body to send upstream.
    pub fn to_body(&self) -> Result<Vec<u8>, ApiError> {
        serde_json::to_vec(self).map_err(|_| ApiError::Internal)
    }

    /// Parses one field as `T`; `None` when absent or `null`, an error when it is not a `T`.
    pub fn parse<T: DeserializeOwned>(&self, name: &str) -> serde_json::Result<Option<T>> {
        let raw = match self.0.get(name) {
            None => return Ok(None),
            Some(Field::Sent(raw)) => raw.get(),
            Some(Field::Set(raw)) => raw.get(),
            Some(Field::Items(_) | Field::NotArray) => {
                return Err(de::Error::custom("`messages` is read item by item"))
            }
        };
        serde_json::from_str::<Option<T>>(raw)
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
                        Field::Sent(map.next_value()?)
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
struct Messages<'a>(Option<Vec<&'a RawValue>>);

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
                while let Some(item) = seq.next_element()? {
                    items.push(item);
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
    // The strict pass: exactly what a full parse would refuse, refused with its position.
    serde_json::from_str::<Checked>(text).map_err(|e| not_json(e.line(), e.column()))?;
    let fields = serde_json::from_str::<Fields<'_>>(text)
        .map_err(|_| invalid("The request body must be a JSON object."))?;
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
            if !m.iter().all(|item| item.get().starts_with('{')) {
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
