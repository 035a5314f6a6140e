//! The charge journal: an append-only log on the node's own disk.
//!
//! A charge is acknowledged once its record is in the journal; the ledger writer ships
//! journaled records to the store in batches and deletes a segment once every record in it is
//! committed there. At start, whatever the journal still holds is shipped again, which is
//! harmless because the store ignores an entry it already has (`docs/guarantees.md` 3.4).
//!
//! What survives what (`docs/guarantees.md` 3.2):
//! - [`JournalSync::Write`]: a record is acknowledged once it is copied into the journal
//!   file's pages (see "How a record is written"). They are in the kernel's page cache, so it
//!   survives the process dying in any way, `kill -9` included, but not the machine losing
//!   power before the record reaches the store.
//! - [`JournalSync::Fsync`]: acknowledged after `fdatasync(2)` as well; survives power loss.
//!
//! # Format
//! A directory of segment files `<seq>.log`, seq a zero-padded decimal number that only grows.
//! Each line is one record: the CRC-32 of the JSON in eight hex digits, a space, the record as
//! JSON, and `\n`. A line that is cut short or fails its checksum was being written when the
//! process or machine died; a record there was never acknowledged, so it is skipped. A lock
//! file keeps a second gateway from sharing the directory.
//!
//! # How a record is written
//! A segment is created at its full size with its blocks allocated (`fallocate(2)`: a full
//! disk shows up here, as an error, never later), and records are copied into it through a
//! shared memory mapping of a window of the file: an append is a copy into the page cache,
//! with no system call, and it survives the process dying just as a `write(2)` would, since
//! the pages belong to the file, not to the process. Until the segment is closed, its tail is
//! zeros, which a reader skips; closing it cuts the file to what was written. The window
//! (1 MiB) moves along the file, so the mapping adds at most that much to the resident set.

use crate::store::Record;
use memmap2::{MmapMut, MmapOptions};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How much of the active segment is mapped at a time.
const WINDOW: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalSync {
    /// Acknowledge once in the file's pages: survives a process crash.
    #[default]
    Write,
    /// Acknowledge after `fdatasync(2)`: survives a machine crash.
    Fsync,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {0} is in use by another process")]
    Locked(PathBuf),
}

/// A journaled record and the segment that holds it.
#[derive(Debug)]
pub struct Replayed {
    pub segment: u64,
    pub record: Record,
}

pub struct Journal {
    dir: PathBuf,
    /// Held for the journal's lifetime: its lock keeps other processes out.
    _lock: File,
    active: Active,
    /// Segments no longer written to, with how many of their records the store still lacks.
    sealed: BTreeMap<u64, u64>,
    segment_bytes: u64,
    line: Vec<u8>,
}

struct Active {
    seq: u64,
    file: File,
    /// The file's allocated size; records go below it.
    capacity: u64,
    /// Bytes written (the lines end here; zeros follow until the segment is closed).
    bytes: u64,
    /// The part of the file mapped now, and the file offset where it starts.
    window: Option<(MmapMut, u64)>,
    /// Records written to this segment and not yet shipped.
    unshipped: u64,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir` and returns, in order, every record a
    /// previous run left in it. New records go to a fresh segment.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Journal, Vec<Replayed>), JournalError> {
        let io = |source| JournalError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked(dir.to_owned()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }

        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        seqs.sort_unstable();

        let mut replayed = Vec::new();
        let mut sealed = BTreeMap::new();
        for &seq in &seqs {
            let path = segment_path(dir, seq);
            let bytes = std::fs::read(&path).map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
            let before = replayed.len();
            for record in parse_segment(&path, &bytes) {
                replayed.push(Replayed {
                    segment: seq,
                    record,
                });
            }
            let n = (replayed.len() - before) as u64;
            if n == 0 {
                remove(&path);
            } else {
                sealed.insert(seq, n);
            }
        }
        let next = seqs.last().map_or(1, |s| s + 1);
        let segment_bytes = segment_bytes.max(4096);
        let active = Active::create(dir, next, segment_bytes)?;
        sync_dir(dir);
        Ok((
            Journal {
                dir: dir.to_owned(),
                _lock: lock,
                active,
                sealed,
                segment_bytes,
                line: Vec::with_capacity(1024),
            },
            replayed,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one record; returns the segment it went to. Rotates to a new segment first when
    /// the active one is full.
    pub fn append(&mut self, record: &Record) -> Result<u64, JournalError> {
        let mut line = std::mem::take(&mut self.line);
        Journal::encode(record, &mut line);
        let written = self.append_encoded(&line);
        self.line = line;
        written
    }

    /// Puts `record` into `line` as one journal line (checksum, JSON, newline), replacing
    /// what `line` held. Needs no journal, so that callers can do it before taking the
    /// journal's lock.
    pub fn encode(record: &Record, line: &mut Vec<u8>) {
        line.clear();
        line.extend_from_slice(b"00000000 ");
        json::write_record(line, record);
        let crc = crc32fast::hash(&line[9..]);
        // Four bytes always fill the eight hex digits reserved for them.
        let _ = hex::encode_to_slice(crc.to_be_bytes(), &mut line[..8]);
        line.push(b'\n');
    }

    /// Writes one line made by [`Journal::encode`]; returns the segment it went to. Rotates to
    /// a new segment first when the line does not fit in the active one.
    pub fn append_encoded(&mut self, line: &[u8]) -> Result<u64, JournalError> {
        let len = line.len() as u64;
        if self.active.bytes + len > self.active.capacity {
            self.rotate(len)?;
        }
        self.active.write(line).map_err(|source| JournalError::Io {
            path: segment_path(&self.dir, self.active.seq),
            source,
        })?;
        self.active.unshipped += 1;
        Ok(self.active.seq)
    }

    /// Forces what was written to the disk itself. `fdatasync(2)` covers the pages written
    /// through the mapping too: they are the file's pages in the page cache.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.active
            .file
            .sync_data()
            .map_err(|source| JournalError::Io {
                path: segment_path(&self.dir, self.active.seq),
                source,
            })
    }

    /// `n` records of `segment` are committed in the store. A sealed segment whose records
    /// are all committed is deleted.
    pub fn shipped(&mut self, segment: u64, n: u64) {
        if segment == self.active.seq {
            self.active.unshipped = self.active.unshipped.saturating_sub(n);
            return;
        }
        if let Some(left) = self.sealed.get_mut(&segment) {
            *left = left.saturating_sub(n);
            if *left == 0 {
                self.sealed.remove(&segment);
                remove(&segment_path(&self.dir, segment));
            }
        }
    }

    /// Records written and not yet shipped, across every segment.
    pub fn unshipped(&self) -> u64 {
        self.active.unshipped + self.sealed.values().sum::<u64>()
    }

    /// The segment appends go to now.
    pub fn active_segment(&self) -> u64 {
        self.active.seq
    }

    /// Number of segment files on disk.
    pub fn segments(&self) -> usize {
        self.sealed.len() + 1
    }

    /// Closes the active segment and opens the next, big enough for a line of `needed` bytes.
    fn rotate(&mut self, needed: u64) -> Result<(), JournalError> {
        let next = Active::create(
            &self.dir,
            self.active.seq + 1,
            self.segment_bytes.max(needed),
        )?;
        let old = std::mem::replace(&mut self.active, next);
        if old.unshipped == 0 {
            remove(&segment_path(&self.dir, old.seq));
        } else {
            self.sealed.insert(old.seq, old.unshipped);
        }
        sync_dir(&self.dir);
        Ok(())
    }
}

impl Drop for Journal {
    /// A journal with nothing left to ship leaves no segment behind.
    fn drop(&mut self) {
        if self.unshipped() == 0 {
            remove(&segment_path(&self.dir, self.active.seq));
        }
    }
}

impl Active {
    fn create(dir: &Path, seq: u64, capacity: u64) -> Result<Active, JournalError> {
        let path = segment_path(dir, seq);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        if let Err(e) = allocate(&file, capacity) {
            remove(&path);
            return Err(io(e));
        }
        Ok(Active {
            seq,
            file,
            capacity,
            bytes: 0,
            window: None,
            unshipped: 0,
        })
    }

    /// Copies `line` in after what was written; the caller has checked that it fits.
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let at = self.bytes;
        let end = at + line.len() as u64;
        let fits = matches!(&self.window, Some((map, start)) if end <= start + map.len() as u64);
        if !fits {
            // The old window is unmapped first: its pages stay in the page cache, dirty,
            // and are written back with the rest of the file.
            self.window = None;
            let len = WINDOW.max(line.len() as u64).min(self.capacity - at);
            self.window = Some((map_window(&self.file, at, len)?, at));
        }
        if let Some((map, start)) = &mut self.window {
            let from = (at - *start) as usize;
            map[from..from + line.len()].copy_from_slice(line);
        }
        self.bytes = end;
        Ok(())
    }
}

impl Drop for Active {
    /// A closed segment ends where its last line does.
    fn drop(&mut self) {
        self.window = None;
        if let Err(e) = self.file.set_len(self.bytes) {
            tracing::warn!(segment = self.seq, error = %e, "could not trim a closed journal segment");
        }
    }
}

/// Gives the new, empty `file` `len` bytes of disk blocks, so that writing them through a
/// mapping never needs a block the disk does not have (which would kill the process with
/// SIGBUS rather than fail an append). A filesystem without `fallocate(2)` gets zeros written.
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let zeros = vec![0u8; 64 << 10];
            let mut left = len;
            let mut out = file;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                out.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Maps `len` bytes of a segment, from `offset`, for writing.
#[allow(unsafe_code)]
fn map_window(file: &File, offset: u64, len: u64) -> std::io::Result<MmapMut> {
    // SAFETY: a mapping is unsound if the file changes size or content behind it. Segments
    // are only ever written by the one journal that holds the directory's lock (see
    // `Journal::open`), and only through this window while it is the active segment; the
    // file was allocated to its full size before any window was mapped, and is cut back only
    // once its last window is gone (`Drop for Active`). Nothing reads through the mapping.
    unsafe {
        MmapOptions::new()
            .offset(offset)
            .len(len as usize)
            .map_mut(file)
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:012}.log"))
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a journal segment");
        }
    }
}

/// Makes file creations and deletions in the directory durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The records of one segment. A damaged line is skipped: at the end of the file it is a
/// write that a crash cut short (never acknowledged); anywhere else it is logged as an error.
fn parse_segment(path: &Path, bytes: &[u8]) -> Vec<Record> {
    // A segment that was still open when the process died ends in zeros (see "How a record is
    // written"); no line ends in a zero byte, so none is cut off by dropping them.
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let bytes = &bytes[..end];
    let mut out = Vec::new();
    let mut lines = bytes.split_inclusive(|b| *b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let last = lines.peek().is_none();
        match parse_line(line) {
            Some(record) => out.push(record),
            None if last => {
                tracing::warn!(path = %path.display(), "journal ends in a cut-short record (never acknowledged); skipped");
            }
            None => {
                metrics::counter!("tollgate_journal_damaged_records_total").increment(1);
                tracing::error!(path = %path.display(), "damaged journal record skipped");
            }
        }
    }
    out
}

fn parse_line(line: &[u8]) -> Option<Record> {
    let line = line.strip_suffix(b"\n")?;
    if line.len() < 10 || line[8] != b' ' {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(&line[..8]).ok()?, 16).ok()?;
    let json = &line[9..];
    if crc32fast::hash(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

mod json;

#[cfg(test)]
mod tests;
