#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::money::Amount;
use crate::store::{EntryKind, LedgerEntry, UsageRecord, UsageSource};

fn usage(id: &str) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        account_id: "acct".to_owned(),
        key_id: Some("key".to_owned()),
        model: "gpt-4o-mini".to_owned(),
        provider: "openai".to_owned(),
        prompt_tokens: 12,
        completion_tokens: 34,
        cached_tokens: 0,
        cost: Amount(1_234_567),
        uncollected: Amount::ZERO,
        status: 200,
        stream: false,
        usage_source: UsageSource::Upstream,
        latency_ms: 5,
        created_at: 1_700_000_000_000,
    }
}

fn charge(id: &str) -> Record {
    Record::Call(usage(id))
}

fn credit(id: &str) -> LedgerEntry {
    LedgerEntry {
        entry_id: id.to_owned(),
        account_id: "acct".to_owned(),
        kind: EntryKind::Credit,
        amount: Amount(5_000_000_000),
        key_id: None,
        reason: Some("deposit".to_owned()),
        created_at: 1_700_000_000_000,
    }
}

/// The records' ids: a call's request id, an entry's entry id.
fn ids(replayed: &[Replayed]) -> Vec<String> {
    replayed
        .iter()
        .map(|r| match &r.record {
            Record::Call(u) => u.request_id.to_string(),
            Record::Entry(e) => e.entry_id.clone(),
        })
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
    let Record::Call(first) = &replayed[0].record else {
        panic!("a call came back as {:?}", replayed[0].record);
    };
    assert_eq!(first, &usage("c0"));
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

fn encoded_len(records: &[Record]) -> u64 {
    let mut line = Vec::new();
    records
        .iter()
        .map(|r| {
            Journal::encode(r, &mut line);
            line.len() as u64
        })
        .sum()
}

#[test]
fn an_open_segment_is_allocated_whole_and_a_closed_one_ends_at_its_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Record> = (0..3).map(|i| charge(&format!("c{i}"))).collect();
    let path = {
        let (mut j, _) = Journal::open(dir.path(), 1 << 16).unwrap();
        for r in &records {
            j.append(r).unwrap();
        }
        let path = dir.path().join(&segment_files(dir.path())[0]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 16);
        j.sync().unwrap();
        path
    };
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        encoded_len(&records)
    );
}

/// What a crash leaves: the active segment at its full size, the lines, then zeros — and
/// perhaps a record cut short by the process dying in the middle of copying it.
#[test]
fn a_segment_left_open_by_a_crash_is_read_up_to_its_zeros() {
    let live = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(live.path(), 1 << 16).unwrap();
    for i in 0..4 {
        j.append(&charge(&format!("c{i}"))).unwrap();
    }
    // Copied while the journal is open, as a crash would leave it.
    let name = &segment_files(live.path())[0];
    let mut bytes = std::fs::read(live.path().join(name)).unwrap();
    assert_eq!(bytes.len(), 1 << 16);
    let mut line = Vec::new();
    Journal::encode(&charge("torn"), &mut line);
    let end = encoded_len(&(0..4).map(|i| charge(&format!("c{i}"))).collect::<Vec<_>>()) as usize;
    assert!(bytes[end..].iter().all(|b| *b == 0));
    std::fs::write(crashed.path().join(name), &bytes).unwrap();
    let (_, replayed) = Journal::open(crashed.path(), 1 << 16).unwrap();
    assert_eq!(ids(&replayed), ["c0", "c1", "c2", "c3"]);

    // The same, with half of a fifth record copied in before the crash.
    let crashed = tempfile::tempdir().unwrap();
    bytes[end..end + line.len() / 2].copy_from_slice(&line[..line.len() / 2]);
    std::fs::write(crashed.path().join(name), &bytes).unwrap();
    let (_, replayed) = Journal::open(crashed.path(), 1 << 16).unwrap();
    assert_eq!(ids(&replayed), ["c0", "c1", "c2", "c3"]);
}

#[test]
fn records_across_mapping_windows_and_segments_come_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    // Three windows' worth fill the first segment; the rest go to a second one.
    let segment_bytes = 3 * WINDOW;
    let n = (segment_bytes + WINDOW / 2) / encoded_len(&[charge("r00000")]);
    let expected: Vec<String> = (0..n).map(|i| format!("r{i:05}")).collect();
    {
        let (mut j, _) = Journal::open(dir.path(), segment_bytes).unwrap();
        let segments: std::collections::BTreeSet<u64> = expected
            .iter()
            .map(|id| j.append(&charge(id)).unwrap())
            .collect();
        assert_eq!(segments.len(), 2, "the records fill more than one segment");
    }
    let (_, replayed) = Journal::open(dir.path(), segment_bytes).unwrap();
    assert_eq!(ids(&replayed), expected);
}

#[test]
fn a_record_larger_than_a_segment_gets_a_segment_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let big = Record::Entry(LedgerEntry {
        reason: Some("x".repeat(10_000)),
        ..credit("big")
    });
    {
        let (mut j, _) = Journal::open(dir.path(), 4096).unwrap();
        let a = j.append(&charge("before")).unwrap();
        let b = j.append(&big).unwrap();
        let c = j.append(&charge("after")).unwrap();
        assert!(a < b && b < c, "{a} {b} {c}");
    }
    let (_, replayed) = Journal::open(dir.path(), 4096).unwrap();
    assert_eq!(ids(&replayed), ["before", "big", "after"]);
    let Record::Entry(entry) = &replayed[1].record else {
        panic!("an entry came back as {:?}", replayed[1].record);
    };
    assert_eq!(entry.reason.as_deref().map(str::len), Some(10_000));
}

/// The hand-written line (journal/json.rs) is exactly serde_json's text for the same record,
/// so that replay, which reads it with serde, gets back what was written: every field set and
/// unset, amounts of both signs, integer extremes, and strings with every kind of character.
#[test]
fn a_line_is_serde_json_text_exactly() {
    let strings = [
        "req_01a21f42d196713c9008c270149cf96a",
        "",
        "quote \" backslash \\ slash /",
        "new\nline\rreturn\ttab\u{8}back\u{c}feed",
        "\u{0}\u{1}\u{1f}\u{7f} controls",
        "été 💸 \u{2028}",
    ];
    let mut records = Vec::new();
    for (i, s) in strings.iter().enumerate() {
        let text = (*s).to_owned();
        let amount = Amount([i64::MIN, i64::MAX, -1, 0, 1_500_000_000, -10][i]);
        records.push(Record::Entry(LedgerEntry {
            entry_id: text.clone(),
            account_id: text.clone(),
            kind: [EntryKind::Credit, EntryKind::Adjustment][i % 2],
            amount,
            key_id: (i % 2 == 0).then(|| text.clone()),
            reason: (i % 2 == 1).then(|| text.clone()),
            created_at: [i64::MIN, i64::MAX, 0, -1, 1_700_000_000_000, 42][i],
        }));
        records.push(Record::Call(UsageRecord {
            request_id: text.as_str().into(),
            account_id: text.clone(),
            key_id: (i % 2 == 1).then(|| text.clone()),
            model: text.clone(),
            provider: text.clone(),
            prompt_tokens: [u64::MAX, 0, 1, 8, 1 << 40, 7][i],
            completion_tokens: i as u64,
            cached_tokens: u64::MAX - i as u64,
            cost: amount,
            uncollected: Amount(-amount.nanos().saturating_add(1)),
            status: [200, 0, u16::MAX, 499, 502, 1][i],
            stream: i % 2 == 0,
            usage_source: [UsageSource::Upstream, UsageSource::Estimated][i % 2],
            latency_ms: u64::MAX / (i as u64 + 1),
            created_at: i64::MAX - i as i64,
        }));
    }
    for record in &records {
        let mut ours = Vec::new();
        super::json::write_record(&mut ours, record);
        let theirs = serde_json::to_vec(record).unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(theirs).unwrap()
        );
    }
}

/// Strings are escaped eight bytes at a time where nothing needs it: every escaped byte, at
/// every place in and across those eight-byte steps, between plain ASCII or multi-byte text,
/// comes out as serde_json writes it.
#[test]
fn a_string_is_escaped_exactly_wherever_the_byte_falls() {
    let mut special: Vec<char> = (0u8..0x20).map(char::from).collect();
    special.extend([
        '"', '\\', '/', '\u{7f}', 'é', '💸', '\u{2028}', ' ', '!', '[', ']',
    ]);
    for filler in ["a", "é"] {
        for len in 0..26 {
            for at in 0..len {
                for &c in &special {
                    let text: String = (0..len)
                        .map(|i| {
                            if i == at {
                                c.to_string()
                            } else {
                                filler.to_owned()
                            }
                        })
                        .collect();
                    let mut ours = Vec::new();
                    super::json::string(&mut ours, &text);
                    assert_eq!(
                        String::from_utf8(ours).unwrap(),
                        serde_json::to_string(&text).unwrap(),
                        "{text:?}"
                    );
                }
            }
        }
    }
}

/// A journal written before migration 0002 holds `{"ledger":…,"usage":…}` lines, a charged
/// call with a ledger entry of kind `charge` beside its usage record. They replay as what the
/// store now holds: the call alone (its cost is the charge), and a credit as an entry.
#[test]
fn a_journal_written_before_one_row_per_call_replays() {
    let dir = tempfile::tempdir().unwrap();
    let call = serde_json::to_string(&usage("r1")).unwrap();
    let free_call = serde_json::to_string(&UsageRecord {
        cost: Amount::ZERO,
        status: 502,
        ..usage("r2")
    })
    .unwrap();
    let deposit = serde_json::to_string(&credit("c1")).unwrap();
    let old_lines = [
        format!(
            r#"{{"ledger":{{"entry_id":"r1","account_id":"acct","kind":"charge","amount":"-0.001234567","key_id":"key","reason":null,"created_at":1700000000000}},"usage":{call}}}"#
        ),
        format!(r#"{{"ledger":null,"usage":{free_call}}}"#),
        format!(r#"{{"ledger":{deposit},"usage":null}}"#),
        // Neither: not a record; skipped like a damaged line.
        r#"{"ledger":null,"usage":null}"#.to_owned(),
    ];
    let mut segment = Vec::new();
    for json in &old_lines {
        let crc = crc32fast::hash(json.as_bytes());
        segment.extend_from_slice(format!("{crc:08x} {json}\n").as_bytes());
    }
    {
        // A segment file named as the journal names them.
        let (mut j, _) = Journal::open(dir.path(), 1 << 16).unwrap();
        j.append(&charge("placeholder")).unwrap();
    }
    let name = segment_files(dir.path())[0].clone();
    std::fs::write(dir.path().join(&name), &segment).unwrap();

    let (_, replayed) = Journal::open(dir.path(), 1 << 16).unwrap();
    assert_eq!(ids(&replayed), ["r1", "r2", "c1"]);
    assert!(matches!(&replayed[0].record, Record::Call(u) if *u == usage("r1")));
    assert!(
        matches!(&replayed[1].record, Record::Call(u) if u.cost == Amount::ZERO && u.status == 502)
    );
    assert!(
        matches!(&replayed[2].record, Record::Entry(e) if e.kind == EntryKind::Credit && e.amount == Amount(5_000_000_000))
    );
}
