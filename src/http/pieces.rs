//! How much of an upstream stream `eventsource-stream` is given at a time.
//!
//! `eventsource-stream` keeps what it has been given in one buffer and, after each line it
//! parses, copies the rest of that buffer into a new one (`String::split_off`). Given a whole
//! read at once, it copies the read's remainder twice for every event in it: when an upstream
//! sends many events in one write (from behind a buffering proxy, or faster than the gateway
//! reads), the cost of a read grows with the square of its size. [`LinePieces`] hands it each
//! read in pieces of about [`PIECE`] bytes instead, each ending at the end of a line, so that
//! what it copies after a line is at most a piece.
//!
//! Where a stream is cut does not change what it says: the crate takes its input in any
//! pieces (as the network delivers it), keeping a line cut short until the rest arrives. The
//! pieces are slices of the read (`Bytes::split_to`), not copies. A read smaller than a piece,
//! the usual case of one event a read, passes as it came.

use bytes::Bytes;
use futures::Stream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// A piece ends at the first line end at or after this many bytes (or with its read).
pub const PIECE: usize = 1024;

/// `inner`'s bytes, in pieces that end at a line's end (a `\n`) once they are [`PIECE`] bytes
/// long.
pub struct LinePieces<S> {
    inner: S,
    /// What is left of the last read.
    rest: Bytes,
}

impl<S> LinePieces<S> {
    pub fn new(inner: S) -> LinePieces<S> {
        LinePieces {
            inner,
            rest: Bytes::new(),
        }
    }
}

/// Where the next piece of `bytes` ends.
fn piece_end(bytes: &[u8]) -> usize {
    bytes
        .get(PIECE..)
        .and_then(|tail| memchr::memchr(b'\n', tail))
        .map_or(bytes.len(), |at| PIECE + at + 1)
}

impl<S, E> Stream for LinePieces<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while this.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(read)) => this.rest = read,
                end_or_error => return Poll::Ready(end_or_error),
            }
        }
        let end = piece_end(&this.rest);
        Poll::Ready(Some(Ok(this.rest.split_to(end))))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use eventsource_stream::{Event, Eventsource};
    use futures::StreamExt;
    use proptest::prelude::*;

    type Reads = Vec<Result<Bytes, std::convert::Infallible>>;

    fn reads_of(text: &[u8], cuts: &[usize]) -> Reads {
        let mut at = 0;
        let mut reads = Vec::new();
        for &cut in cuts {
            let end = (at + cut).min(text.len());
            reads.push(Ok(Bytes::copy_from_slice(&text[at..end])));
            at = end;
        }
        reads.push(Ok(Bytes::copy_from_slice(&text[at..])));
        reads
    }

    /// The events the crate makes of `reads`, or where it stopped with an error.
    fn events(reads: Reads, pieces: bool) -> (Vec<Event>, bool) {
        futures::executor::block_on(async {
            let bytes = futures::stream::iter(reads);
            let mut events = if pieces {
                LinePieces::new(bytes).eventsource().boxed()
            } else {
                bytes.eventsource().boxed()
            };
            let mut out = Vec::new();
            while let Some(next) = events.next().await {
                match next {
                    Ok(event) => out.push(event),
                    Err(_) => return (out, true),
                }
            }
            (out, false)
        })
    }

    /// One SSE line of any kind the spec knows, with any of its three line ends, and text
    /// that is sometimes not ASCII (so that cuts fall inside characters) or not UTF-8.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        let text = prop_oneof![
            "[a-z {}\":,]{0,40}".prop_map(String::into_bytes),
            "[a-zé€😀 ]{0,12}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..4),
        ];
        let field = prop_oneof![
            Just(&b"data: "[..]),
            Just(&b"data:"[..]),
            Just(&b"event: "[..]),
            Just(&b"id: "[..]),
            Just(&b"retry: "[..]),
            Just(&b": "[..]),
            Just(&b""[..]),
        ];
        let end = prop_oneof![
            4 => Just(&b"\n"[..]),
            1 => Just(&b"\r\n"[..]),
            1 => Just(&b"\r"[..]),
        ];
        (field, text, end).prop_map(|(f, t, e)| [f, &t[..], e].concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Cut into pieces, any stream makes the same events, and the same error if any, as
        /// it does cut only where the network cut it.
        #[test]
        fn pieces_change_no_event(
            lines in proptest::collection::vec(line(), 0..300),
            cuts in proptest::collection::vec(1usize..5000, 0..8),
        ) {
            let text = lines.concat();
            let plain = events(reads_of(&text, &cuts), false);
            let cut = events(reads_of(&text, &cuts), true);
            prop_assert_eq!(cut, plain);
        }

        /// The pieces are the reads, in order, and none runs past the first line end at or
        /// after `PIECE` bytes.
        #[test]
        fn pieces_end_at_the_first_line_end_past_a_piece(
            lines in proptest::collection::vec(line(), 0..300),
            cuts in proptest::collection::vec(1usize..5000, 0..8),
        ) {
            let text = lines.concat();
            let pieces: Vec<Bytes> = futures::executor::block_on(
                LinePieces::new(futures::stream::iter(reads_of(&text, &cuts)))
                    .map(Result::unwrap)
                    .collect(),
            );
            prop_assert_eq!(pieces.concat(), text);
            for piece in &pieces {
                prop_assert!(!piece.is_empty());
                let past = piece.get(PIECE..).unwrap_or_default();
                if let Some(at) = past.iter().position(|&b| b == b'\n') {
                    prop_assert_eq!(at + 1, past.len(), "a piece ran past a line end");
                }
            }
        }
    }

    /// A read of many events goes to the crate a piece at a time, each piece whole lines.
    #[test]
    fn a_read_of_many_events_is_cut_at_line_ends() {
        let event = format!("data: {{\"n\":\"{}\"}}\n\n", "x".repeat(90));
        let read = event.repeat(100);
        let pieces: Vec<Bytes> = futures::executor::block_on(
            LinePieces::new(futures::stream::iter([Ok::<_, ()>(Bytes::from(
                read.clone(),
            ))]))
            .map(Result::unwrap)
            .collect(),
        );
        assert!(pieces.len() > 1, "one piece: {}", pieces.len());
        assert_eq!(pieces.concat(), read.as_bytes());
        for piece in &pieces {
            assert!(piece.len() >= PIECE || piece == pieces.last().unwrap());
            assert!(piece.len() < PIECE + event.len());
            assert!(piece.ends_with(b"\n"));
        }
        let (events, failed) = events(vec![Ok(Bytes::from(read))], true);
        assert!(!failed);
        assert_eq!(events.len(), 100);
    }
}
