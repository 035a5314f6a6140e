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
//!
//! The pieces are also where an upstream's event is held to a size: the crate keeps an event
//! in memory until it is complete, however long it grows. [`LinePieces`] counts the bytes it
//! has handed on since the crate's last event ([`EventBudget::event_arrived`]), and ends the
//! stream with [`TooLarge`] once they pass the limit, before it hands on more.

use bytes::Bytes;
use futures::Stream;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// A piece ends at the first line end at or after this many bytes (or with its read). Of 256,
/// 1,024, 4,096 and 16,384, the fewest instructions a chunk in a burst (BENCHMARKS item 47).
pub const PIECE: usize = 1024;

/// `inner`'s bytes, in pieces that end at a line's end (a `\n`) once they are [`PIECE`] bytes
/// long; an error once more than the limit has come since the last event.
pub struct LinePieces<S> {
    inner: S,
    /// What is left of the last read.
    rest: Bytes,
    budget: EventBudget,
    /// An event went past the limit: the stream has ended.
    over: bool,
}

/// The bytes handed on since the last event, shared by the pieces and whoever reads the
/// events. An event may have begun in the piece before the count was reset, so an event is
/// allowed up to a piece more than the limit.
#[derive(Clone)]
pub struct EventBudget {
    since_event: Arc<AtomicUsize>,
    limit: usize,
}

impl EventBudget {
    /// An event came out of the parser: its bytes no longer count.
    pub fn event_arrived(&self) {
        self.since_event.store(0, Ordering::Relaxed);
    }
}

/// More than the limit came without an event.
#[derive(Debug, thiserror::Error)]
#[error("an upstream event is larger than {0} bytes")]
pub struct TooLarge(pub usize);

/// What ends a stream of pieces early: the upstream body's error, or an event too large.
#[derive(Debug, thiserror::Error)]
pub enum PieceError<E> {
    #[error(transparent)]
    Upstream(E),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

impl<S> LinePieces<S> {
    /// `inner` in pieces, allowing an event up to `limit` bytes.
    pub fn new(inner: S, limit: usize) -> (LinePieces<S>, EventBudget) {
        let budget = EventBudget {
            since_event: Arc::new(AtomicUsize::new(0)),
            limit,
        };
        let pieces = LinePieces {
            inner,
            rest: Bytes::new(),
            budget: budget.clone(),
            over: false,
        };
        (pieces, budget)
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
    type Item = Result<Bytes, PieceError<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.over {
            return Poll::Ready(None);
        }
        while this.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(read)) => this.rest = read,
                Some(Err(e)) => return Poll::Ready(Some(Err(PieceError::Upstream(e)))),
                None => return Poll::Ready(None),
            }
        }
        let piece = this.rest.split_to(piece_end(&this.rest));
        let budget = &this.budget;
        let since_event = budget.since_event.load(Ordering::Relaxed) + piece.len();
        if since_event > budget.limit {
            this.over = true;
            this.rest = Bytes::new();
            return Poll::Ready(Some(Err(TooLarge(budget.limit).into())));
        }
        budget.since_event.store(since_event, Ordering::Relaxed);
        Poll::Ready(Some(Ok(piece)))
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

    /// The events the crate makes of `reads` and whether it stopped at an error: as the
    /// network cut them, or through [`LinePieces`] (with no limit).
    fn events(reads: Reads, pieces: bool) -> (Vec<Event>, bool) {
        let bytes = futures::stream::iter(reads);
        let events = if pieces {
            LinePieces::new(bytes, usize::MAX)
                .0
                .eventsource()
                .map(|e| e.map_err(|_| ()))
                .boxed()
        } else {
            bytes.eventsource().map(|e| e.map_err(|_| ())).boxed()
        };
        futures::executor::block_on(async {
            let mut events = events;
            let mut out = Vec::new();
            while let Some(next) = events.next().await {
                match next {
                    Ok(event) => out.push(event),
                    Err(()) => return (out, true),
                }
            }
            (out, false)
        })
    }

    fn pieces_of<E: std::fmt::Debug>(reads: Vec<Result<Bytes, E>>) -> Vec<Bytes> {
        let (pieces, _) = LinePieces::new(futures::stream::iter(reads), usize::MAX);
        futures::executor::block_on(pieces.map(Result::unwrap).collect())
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
            let pieces = pieces_of(reads_of(&text, &cuts));
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
        let pieces = pieces_of(vec![Ok::<_, ()>(Bytes::from(read.clone()))]);
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

    /// Events pass while each comes within the limit of the last; once more than the limit
    /// has come without one, the stream ends with `TooLarge` and hands on nothing more.
    #[test]
    fn an_event_past_the_limit_ends_the_stream() {
        let small = format!("data: {}\n\n", "s".repeat(300));
        let large = format!("data: {}\n\n", "L".repeat(5000));
        let read = |text: &str| Ok::<_, std::convert::Infallible>(Bytes::from(text.to_owned()));
        // Read by read, as the network gives them: small events, then one too large.
        let reads = vec![
            read(&small),
            read(&small),
            read(&small),
            read(&large),
            read(&small),
        ];
        let (pieces, budget) = LinePieces::new(futures::stream::iter(reads), 1000);
        let mut events = pieces.eventsource();
        let got = futures::executor::block_on(async {
            let mut got = Vec::new();
            while let Some(next) = events.next().await {
                match next {
                    Ok(event) => {
                        budget.event_arrived();
                        got.push(Ok(event.data.len()));
                    }
                    Err(e) => got.push(Err(e.to_string())),
                }
            }
            got
        });
        assert_eq!(
            got,
            vec![
                Ok(300),
                Ok(300),
                Ok(300),
                Err("Transport error: an upstream event is larger than 1000 bytes".to_owned())
            ]
        );

        // Without the reset, the fourth small event is past the limit too.
        let reads = vec![read(&small), read(&small), read(&small), read(&small)];
        let (pieces, _) = LinePieces::new(futures::stream::iter(reads), 1000);
        let got: Vec<bool> =
            futures::executor::block_on(pieces.eventsource().map(|e| e.is_ok()).collect());
        assert_eq!(got, vec![true, true, true, false]);
    }
}
