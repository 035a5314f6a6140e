//! The charge journal: an append-only log on the node's own disk.
//!
//! A charge is acknowledged once its record is in the journal; the ledger writer ships
//! journaled records to the store in batches and deletes a segment once every record in it is
//! committed there. At start, whatever the journal still holds is shipped again, which is
//! harmless because the store ignores an entry it already has (`docs/guarantees.md` 3.4).
//!
//! What survives what (`docs/guarantees.md` 3.2):
//! - [`JournalSync::Write`]: a record is acknowledged after `write(2)` returns. It is in the
//!   kernel's page cache, so it survives the process dying in any way, `kill -9` included,
//!   but not the machine losing power before the record reaches the store.
//! - [`JournalSync::Fsync`]: acknowledged after `fdatasync(2)` as well; survives power loss.
//!
//! # Format
//! A directory of segment files `<seq>.log`, seq a zero-padded decimal number that only grows.
//! Each line is one record: the CRC-32 of the JSON in eight hex digits, a space, the record as
//! JSON, and `\n`. A line that is cut short or fails its checksum was being written when the
//! process or machine died; a record there was never acknowledged, so it is skipped. A lock
//! file keeps a second gateway from sharing the directory.

use crate::store::Record;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalSync {
    /// Acknowledge after `write(2)`: survives a process crash.
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
    bytes: u64,
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
        let active = Active::create(dir, next)?;
        sync_dir(dir);
        Ok((
            Journal {
                dir: dir.to_owned(),
                _lock: lock,
                active,
                sealed,
                segment_bytes: segment_bytes.max(4096),
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
        if self.active.bytes >= self.segment_bytes {
            self.rotate()?;
        }
        self.line.clear();
        self.line.extend_from_slice(b"00000000 ");
        serde_json::to_writer(&mut self.line, record).map_err(|e| JournalError::Io {
            path: self.dir.clone(),
            source: e.into(),
        })?;
        let crc = crc32fast::hash(&self.line[9..]);
        // Eight hex digits always fit the eight bytes reserved for them.
        let _ = write!(&mut self.line[..8], "{crc:08x}");
        self.line.push(b'\n');
        self.active
            .file
            .write_all(&self.line)
            .map_err(|source| JournalError::Io {
                path: segment_path(&self.dir, self.active.seq),
                source,
            })?;
        self.active.bytes += self.line.len() as u64;
        self.active.unshipped += 1;
        Ok(self.active.seq)
    }

    /// Forces what was written to the disk itself.
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

    fn rotate(&mut self) -> Result<(), JournalError> {
        let next = Active::create(&self.dir, self.active.seq + 1)?;
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
    fn create(dir: &Path, seq: u64) -> Result<Active, JournalError> {
        let path = segment_path(dir, seq);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|source| JournalError::Io { path, source })?;
        Ok(Active {
            seq,
            file,
            bytes: 0,
            unshipped: 0,
        })
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

#[cfg(test)]
mod tests;
