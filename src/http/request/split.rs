//! The split in one pass of our own: a chat body checked as JSON and cut into its top-level
//! fields (and `messages` into its items) at once, where serde_json's split followed by the
//! scan for what it lets through read a long conversation twice, the split one byte at a time
//! and the scan once per escape.
//!
//! It only ever answers for bodies it is sure of. Anything it does not vouch for, invalid or
//! merely unusual (an exponent, a surrogate escape without its pair, an escaped key, nesting
//! deeper than [`PLAIN_DEPTH`]), gets `None`, and the caller takes serde_json's path, which
//! says what is wrong and where. So a `Some` must be exactly what that path returns: the same
//! fields, each the same text; the tests hold it to that.

use super::{code_unit, Field, Fields, PLAIN_DEPTH};
use std::collections::BTreeMap;

/// The body's fields, or `None` when serde_json's path must decide.
pub(super) fn split(text: &str) -> Option<Fields<'_>> {
    let mut p = Parser {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    p.whitespace();
    p.expect(b'{')?;
    let mut fields = BTreeMap::new();
    p.sequence(b'}', |p| {
        let name = p.key()?;
        p.whitespace();
        p.expect(b':')?;
        p.whitespace();
        let field = if name == "messages" {
            p.messages()?
        } else {
            Field::Sent(p.spanned(|p| p.value(2))?)
        };
        fields.insert(name.to_owned(), field);
        Some(())
    })?;
    p.whitespace();
    (p.at == p.bytes.len()).then_some(Fields(fields))
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let found = self.peek() == Some(b);
        self.at += usize::from(found);
        found
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    /// A member's name, without its quotes; `None` for one with an escape (serde_json's path
    /// decodes it).
    fn key(&mut self) -> Option<&'a str> {
        let start = self.at + 1;
        let escaped = self.string()?;
        let text: &'a str = self.text;
        (!escaped).then(|| text.get(start..self.at - 1)).flatten()
    }

    /// `messages`: an array's items as sent, or any other value, refused later.
    fn messages(&mut self) -> Option<Field<'a>> {
        if !self.eat(b'[') {
            self.value(2)?;
            return Some(Field::NotArray);
        }
        let mut items = Vec::new();
        self.sequence(b']', |p| {
            items.push(p.spanned(|p| p.value(3))?);
            Some(())
        })?;
        Some(Field::Items(items))
    }

    /// The rest of an object or an array, after its opening bracket: `item`s between commas,
    /// up to `close`.
    fn sequence(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.whitespace();
        if self.eat(close) {
            return Some(());
        }
        loop {
            item(self)?;
            self.whitespace();
            if !self.eat(b',') {
                return self.expect(close);
            }
            self.whitespace();
        }
    }

    /// The text that `read` went over.
    fn spanned(&mut self, read: impl FnOnce(&mut Self) -> Option<()>) -> Option<&'a str> {
        let start = self.at;
        read(self)?;
        self.text.get(start..self.at)
    }

    /// One value; an object or an array would be at nesting `depth` (the body's own object
    /// is at 1), and none deeper than [`PLAIN_DEPTH`] is vouched for, as in `plainly_valid`.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' if depth > PLAIN_DEPTH => None,
            b'{' => {
                self.at += 1;
                self.sequence(b'}', |p| {
                    p.string()?;
                    p.whitespace();
                    p.expect(b':')?;
                    p.whitespace();
                    p.value(depth + 1)
                })
            }
            b'[' => {
                self.at += 1;
                self.sequence(b']', |p| p.value(depth + 1))
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// A number without an exponent and with fewer than 300 digits in each part: one that a
    /// full parse surely takes (beyond that, serde_json's path decides).
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        let start = self.at;
        let int = self.digits();
        // No leading zero unless the zero is all there is.
        if int == 0 || int >= 300 || (int > 1 && self.bytes.get(start) == Some(&b'0')) {
            return None;
        }
        if self.eat(b'.') && !(1..300).contains(&self.digits()) {
            return None;
        }
        (!matches!(self.peek(), Some(b'e' | b'E'))).then_some(())
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    /// A string, from its opening quote to past its closing one; whether it held an escape.
    fn string(&mut self) -> Option<bool> {
        self.expect(b'"')?;
        let mut escaped = false;
        loop {
            self.at += plain(self.bytes.get(self.at..)?)?;
            let b = self.peek()?;
            self.at += 1;
            match b {
                b'"' => return Some(escaped),
                b'\\' => escaped = true,
                // A control character, which must be escaped.
                _ => return None,
            }
            match self.peek()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                b'u' => match self.unit()? {
                    0xD800..=0xDBFF => {
                        // A high surrogate, and its low half right after it.
                        if !(self.eat(b'\\') && self.peek() == Some(b'u')) {
                            return None;
                        }
                        if !matches!(self.unit()?, 0xDC00..=0xDFFF) {
                            return None;
                        }
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => {}
                },
                _ => return None,
            }
        }
    }

    /// The code unit of a `uXXXX` escape, `self.at` on the `u`.
    fn unit(&mut self) -> Option<u16> {
        let unit = code_unit(self.bytes.get(self.at + 1..self.at + 5)?)?;
        self.at += 5;
        Some(unit)
    }
}

/// How many bytes of `rest` go before the first quote, backslash or control character; `None`
/// if there is none. Eight bytes at a time: in a word, a byte below 0x20 (or one equal to a
/// quote or a backslash, after an xor makes it zero) is one whose subtraction borrows while
/// its top bit was clear. A borrow can mark bytes after a true find too, never before one, so
/// the lowest marked byte is the first find. (The text is UTF-8: bytes of 0x80 and up, as in
/// any non-ASCII character, are never marked.)
fn plain(rest: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOPS: u64 = ONES << 7;
    let mut chunks = rest.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let marked = (word.wrapping_sub(ONES * 0x20) & !word
            | quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash)
            & TOPS;
        if marked != 0 {
            return Some(offset + marked.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let tail = chunks.remainder();
    let found = tail
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    Some(offset + found)
}

#[cfg(test)]
mod tests {
    use super::plain;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Eight bytes at a time finds what one byte at a time finds, at every offset in a word.
        #[test]
        fn plain_finds_the_first_quote_backslash_or_control(
            text in "[a-z\"\\\\\\x00-\\x1f\\x7f é😀]{0,40}",
        ) {
            let bytes = text.as_bytes();
            let naive = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            prop_assert_eq!(plain(bytes), naive);
        }
    }
}
