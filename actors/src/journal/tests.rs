#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::money::Amount;
use crate::store::{EntryKind, LedgerEntry};

fn charge(id: &str) -> Record {
    Record {
        ledger: Some(LedgerEntry {
            entry_id: id.to_owned(),
            account_id: "acct".to_owned(),
            kind: EntryKind::Charge,
            amount: Amount(-1_234_567),
            key_id: Some("key".to_owned()),
            reason: None,
            created_at: 1_700_000_000_000,
        }),
        usage: None,
    }
}

fn ids(replayed: &[Replayed]) -> Vec<String> {
    replayed
        .iter()
        .map(|r| r.record.ledger.as_ref().unwrap().entry_id.clone())
        .collect()
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    names.sort();
    names
}

#[test]
fn unshipped_records_come_back_in_order_and_exactly() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut j, replayed) = Journal::open(dir.path(), 1 << 20).unwrap();
        assert!(replayed.is_empty());
        for i in 0..5 {
            j.append(&charge(&format!("c{i}"))).unwrap();
        }
        assert_eq!(j.unshipped(), 5);
    }
    let (j, replayed) = Journal::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(ids(&replayed), ["c0", "c1", "c2", "c3", "c4"]);
    let first = replayed[0].record.ledger.as_ref().unwrap();
    assert_eq!(first.amount, Amount(-1_234_567));
    assert_eq!(first.key_id.as_deref(), Some("key"));
    // The old segment is kept until shipped; new records go to a new one.
    assert_eq!(j.unshipped(), 5);
    assert_eq!(segment_files(dir.path()).len(), 2);
}

#[test]
fn a_shipped_journal_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut j, _) = Journal::open(dir.path(), 1 << 20).unwrap();
        let seg = j.append(&charge("a")).unwrap();
        j.append(&charge("b")).unwrap();
        j.shipped(seg, 2);
        assert_eq!(j.unshipped(), 0);
    }
    assert!(segment_files(dir.path()).is_empty());
    let (_, replayed) = Journal::open(dir.path(), 1 << 20).unwrap();
    assert!(replayed.is_empty());
}

#[test]
fn full_segments_rotate_and_are_deleted_once_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(dir.path(), 4096).unwrap();
    let mut per_segment: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..100 {
        *per_segment
            .entry(j.append(&charge(&format!("r{i}"))).unwrap())
            .or_default() += 1;
    }
    assert!(per_segment.len() > 2, "{per_segment:?}");
    assert_eq!(segment_files(dir.path()).len(), per_segment.len());
    let (&first, &n) = per_segment.iter().next().unwrap();
    j.shipped(first, n - 1);
    assert_eq!(
        segment_files(dir.path()).len(),
        per_segment.len(),
        "one record still owed"
    );
    j.shipped(first, 1);
    assert_eq!(segment_files(dir.path()).len(), per_segment.len() - 1);
    assert_eq!(j.unshipped(), 100 - n);
}

#[test]
fn a_cut_short_or_damaged_record_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut j, _) = Journal::open(dir.path(), 1 << 20).unwrap();
        for i in 0..3 {
            j.append(&charge(&format!("c{i}"))).unwrap();
        }
    }
    let path = dir.path().join(&segment_files(dir.path())[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    // Damage the middle record's JSON (its checksum no longer matches)...
    let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
    let at = second + 30;
    bytes[at] = if bytes[at] == b'x' { b'y' } else { b'x' };
    // ...and leave half a record at the end, as a crash mid-write would.
    let line = {
        let mut l = b"00000000 ".to_vec();
        l.extend_from_slice(&serde_json::to_vec(&charge("torn")).unwrap());
        l
    };
    bytes.extend_from_slice(&line[..line.len() / 2]);
    std::fs::write(&path, bytes).unwrap();

    let (_, replayed) = Journal::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(ids(&replayed), ["c0", "c2"]);
}

#[test]
fn a_second_process_cannot_share_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (_j, _) = Journal::open(dir.path(), 1 << 20).unwrap();
    match Journal::open(dir.path(), 1 << 20) {
        Err(JournalError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a second open of a journal in use succeeded"),
    }
}
