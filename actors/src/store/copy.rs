//! Rows in the binary form of Postgres's `COPY … FROM STDIN (FORMAT binary)`, the cheapest way
//! into a table Postgres has: no SQL to parse per row, no JSON to unpack, no text to convert.
//!
//! The format: an 11-byte signature, a 32-bit flags field and a 32-bit header-extension
//! length (both zero); then per row a 16-bit field count and per field a 32-bit length (−1
//! for NULL) followed by the value in its type's binary form; then a 16-bit −1. Integers are
//! big-endian. Only the two types the ledger's tables hold are written: `text` (its UTF-8
//! bytes; the connection's client encoding is UTF-8) and `bigint` (8 bytes).
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// The rows of one `COPY`, each of `fields` fields.
pub(super) struct BinaryRows {
    buf: Vec<u8>,
    fields: i16,
    /// A text too long for a field's 32-bit length was asked for; see [`BinaryRows::finish`].
    oversized: bool,
}

impl BinaryRows {
    pub(super) fn new(fields: i16, rows: usize) -> BinaryRows {
        let mut buf = Vec::with_capacity(SIGNATURE.len() + 8 + rows * 160 + 2);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        BinaryRows {
            buf,
            fields,
            oversized: false,
        }
    }

    /// Starts a row; its fields follow.
    pub(super) fn row(&mut self) -> &mut BinaryRows {
        self.buf.extend_from_slice(&self.fields.to_be_bytes());
        self
    }

    pub(super) fn text(&mut self, value: &str) -> &mut BinaryRows {
        match i32::try_from(value.len()) {
            Ok(len) => {
                self.buf.extend_from_slice(&len.to_be_bytes());
                self.buf.extend_from_slice(value.as_bytes());
            }
            Err(_) => {
                self.oversized = true;
                self.null();
            }
        }
        self
    }

    pub(super) fn opt_text(&mut self, value: Option<&str>) -> &mut BinaryRows {
        match value {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    pub(super) fn int8(&mut self, value: i64) -> &mut BinaryRows {
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    fn null(&mut self) -> &mut BinaryRows {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    /// The whole `COPY` data, or `None` if a text did not fit a field (2 GiB and more; no
    /// record the gateway makes comes near it, and Postgres would refuse it anyway).
    pub(super) fn finish(mut self) -> Option<Vec<u8>> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        (!self.oversized).then_some(self.buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::BinaryRows;

    #[test]
    fn rows_are_laid_out_as_postgres_reads_them() {
        let mut rows = BinaryRows::new(3, 2);
        rows.row().text("ab").int8(-2).opt_text(None);
        rows.row().text("").int8(1 << 40).opt_text(Some("é"));
        let data = rows.finish().unwrap();
        let mut expected: Vec<u8> = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 3, 0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 3, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 1, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0xc3, 0xa9]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(data, expected);
    }
}
