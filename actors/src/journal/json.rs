//! A record's JSON for its journal line, written field by field.
//!
//! The text is exactly what `serde_json::to_writer` writes for a [`Record`] (a test holds the
//! two to that, for records with every field set and every kind of string), and replay reads
//! it back with serde. Written by hand because encoding was the costliest step of a
//! settlement: serde_json escapes every key name again on every record and formats amounts
//! through `collect_str` (about 8,700 instructions a record, bench/callgrind.sh).

use crate::store::{LedgerEntry, Record, UsageRecord};

/// Appends `record`'s JSON to `out`.
pub(super) fn write_record(out: &mut Vec<u8>, record: &Record) {
    match record {
        Record::Call(usage) => {
            out.extend_from_slice(b"{\"call\":");
            write_usage(out, usage);
        }
        Record::Entry(entry) => {
            out.extend_from_slice(b"{\"entry\":");
            write_entry(out, entry);
        }
    }
    out.push(b'}');
}

fn write_entry(out: &mut Vec<u8>, e: &LedgerEntry) {
    out.extend_from_slice(b"{\"entry_id\":");
    string(out, &e.entry_id);
    out.extend_from_slice(b",\"account_id\":");
    string(out, &e.account_id);
    out.extend_from_slice(b",\"kind\":");
    string(out, e.kind.as_str());
    out.extend_from_slice(b",\"amount\":");
    string(out, e.amount.decimal(&mut [0; crate::money::TEXT_BYTES]));
    out.extend_from_slice(b",\"key_id\":");
    optional_string(out, e.key_id.as_deref());
    out.extend_from_slice(b",\"reason\":");
    optional_string(out, e.reason.as_deref());
    out.extend_from_slice(b",\"created_at\":");
    number(out, e.created_at);
    out.push(b'}');
}

fn write_usage(out: &mut Vec<u8>, u: &UsageRecord) {
    out.extend_from_slice(b"{\"request_id\":");
    string(out, &u.request_id);
    out.extend_from_slice(b",\"account_id\":");
    string(out, &u.account_id);
    out.extend_from_slice(b",\"key_id\":");
    optional_string(out, u.key_id.as_deref());
    out.extend_from_slice(b",\"model\":");
    string(out, &u.model);
    out.extend_from_slice(b",\"provider\":");
    string(out, &u.provider);
    out.extend_from_slice(b",\"prompt_tokens\":");
    number(out, u.prompt_tokens);
    out.extend_from_slice(b",\"completion_tokens\":");
    number(out, u.completion_tokens);
    out.extend_from_slice(b",\"cached_tokens\":");
    number(out, u.cached_tokens);
    out.extend_from_slice(b",\"cost\":");
    string(out, u.cost.decimal(&mut [0; crate::money::TEXT_BYTES]));
    out.extend_from_slice(b",\"uncollected\":");
    string(
        out,
        u.uncollected.decimal(&mut [0; crate::money::TEXT_BYTES]),
    );
    out.extend_from_slice(b",\"status\":");
    number(out, u.status);
    out.extend_from_slice(b",\"stream\":");
    out.extend_from_slice(if u.stream { b"true" } else { b"false" });
    out.extend_from_slice(b",\"usage_source\":");
    string(out, u.usage_source.as_str());
    out.extend_from_slice(b",\"latency_ms\":");
    number(out, u.latency_ms);
    out.extend_from_slice(b",\"created_at\":");
    number(out, u.created_at);
    out.push(b'}');
}

fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn optional_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string as serde_json writes one: `"` and `\` and control characters escaped (the
/// short forms where JSON has them, `\u00XX` otherwise), everything else as it is.
pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time while none of them needs escaping: the ids, names and amounts
        // a record holds never do, and a byte at a time cost about 6 instructions a byte.
        if let Some(word) = bytes.get(i..i + 8) {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(word);
            if !needs_escape(u64::from_le_bytes(eight)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape = ESCAPE[usize::from(b)];
        if escape != 0 {
            out.extend_from_slice(&bytes[start..i]);
            if escape == b'u' {
                let mut digits = [0u8; 2];
                // One byte always fills the two hex digits.
                let _ = hex::encode_to_slice([b], &mut digits);
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&digits);
            } else {
                out.push(b'\\');
                out.push(escape);
            }
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether any of the eight bytes in `word` is below 0x20, `"` or `\` (the bytes
/// [`ESCAPE`] marks). Exact for "any": a borrow can only spread into bytes above one that
/// matched.
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x;
    (below_space | zero_in(quote) | zero_in(backslash)) & HIGH != 0
}

/// Per byte: 0 if it goes as it is, else the letter after its backslash (`u` for `\u00XX`).
/// One load a byte, as serde_json does it.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};
