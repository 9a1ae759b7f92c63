//! The journal's records (the format in the [module docs](super)): framing and checksums, the
//! binary lease record, the compaction's dictionary form, and reading a file of them back.

use crate::ledger::codec::{get_str, get_varint, put_varint};
use crate::ledger::snapshot::ClaimSnapshot;
use crate::ledger::strings::{FileDict, ReplayMemo};
use crate::ledger::{Event, Lease};

pub(super) const MAGIC: &[u8; 8] = b"EPHJRNL1";
/// No single event is anywhere near this; a larger length field means a corrupt header.
const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// Encodes events as self-contained records (without the file magic): what appends write.
pub fn encode(events: &[Event], out: &mut Vec<u8>) {
    for event in events {
        push_record(out, |payload| match event {
            Event::Created { lease } => {
                payload.push(if lease.renewal.is_some() { BINARY_RENEWABLE } else { BINARY_LEASE });
                binary::write_lease(lease, payload);
                lease.claims.write_to(payload);
            }
            other => json_payload(other, payload),
        });
    }
}

/// Encodes a compaction snapshot: leases as `0x02` records that share one string dictionary
/// (module docs). One encoder per file, fed its events in file order, possibly in batches; the
/// bytes it returns only make sense after the ones it returned before.
#[derive(Default)]
pub struct SnapshotEncoder {
    dict: FileDict,
    defs: Vec<u8>,
    claims: Vec<u8>,
}

impl SnapshotEncoder {
    pub fn encode(&mut self, events: &[Event], out: &mut Vec<u8>) {
        for event in events {
            match event {
                Event::Created { lease } => self.encode_lease(lease, out),
                other => push_record(out, |payload| json_payload(other, payload)),
            }
        }
    }

    /// One lease's `Created` record, encoded from where it lives (compaction streams a
    /// million of these from memory without cloning one).
    pub fn encode_lease(&mut self, lease: &Lease, out: &mut Vec<u8>) {
        self.defs.clear();
        self.claims.clear();
        let new = lease.claims.write_refs(&mut self.dict, &mut self.defs, &mut self.claims);
        push_record(out, |payload| {
            payload.push(if lease.renewal.is_some() { DICT_RENEWABLE } else { DICT_LEASE });
            put_varint(payload, new);
            payload.extend_from_slice(&self.defs);
            binary::write_lease(lease, payload);
            payload.extend_from_slice(&self.claims);
        });
    }
}

fn json_payload(event: &Event, payload: &mut Vec<u8>) {
    // Invariant: `Event` holds only strings, numbers and JSON values; serializing cannot fail.
    let _ = serde_json::to_writer(payload, event);
}

/// Appends one record: its header (length, CRC) and the payload `write` appends. The payload is
/// written in place and the header filled in after, so no record is copied from a buffer of
/// its own (a compaction writes a million, every append one or two).
fn push_record(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    write(out);
    let len = ((out.len() - start - 8) as u32).to_le_bytes();
    let crc = checksum(&len, &out[start + 8..]).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
}

/// First byte of a self-contained binary `Created` payload (JSON payloads start with `{`).
const BINARY_LEASE: u8 = 0x01;
/// First byte of a `Created` payload that uses the file's dictionary.
pub(super) const DICT_LEASE: u8 = 0x02;
/// As [`BINARY_LEASE`] and [`DICT_LEASE`], for a renewable lease: its [`Renewal`] follows the
/// credentials. Leases without one keep the first forms, so journals written before renewal
/// existed replay unchanged.
///
/// [`Renewal`]: crate::ledger::Renewal
const BINARY_RENEWABLE: u8 = 0x03;
pub(super) const DICT_RENEWABLE: u8 = 0x04;

fn decode_payload(payload: &[u8], memo: &mut ReplayMemo) -> Result<Event, String> {
    let lease = match payload.split_first() {
        Some((&tag @ (BINARY_LEASE | BINARY_RENEWABLE), mut rest)) => {
            let lease = binary::read_lease(&mut rest, memo, tag == BINARY_RENEWABLE)
                .and_then(|lease| Some((lease, ClaimSnapshot::read_from(&mut rest, memo)?)));
            (lease, rest)
        }
        Some((&tag @ (DICT_LEASE | DICT_RENEWABLE), mut rest)) => {
            let defined = get_varint(&mut rest).and_then(|n| {
                let texts = (0..n).map(|_| get_str(&mut rest)).collect::<Option<Vec<&str>>>()?;
                memo.define(texts);
                Some(())
            });
            let lease = defined
                .and_then(|()| binary::read_lease(&mut rest, memo, tag == DICT_RENEWABLE))
                .and_then(|lease| Some((lease, ClaimSnapshot::read_refs(&mut rest, memo)?)));
            (lease, rest)
        }
        _ => return serde_json::from_slice(payload).map_err(|e| e.to_string()),
    };
    match lease {
        (None, _) => Err("not a lease record".into()),
        (Some(_), rest) if !rest.is_empty() => Err("trailing bytes after a lease record".into()),
        (Some((mut lease, claims)), _) => {
            lease.claims = claims;
            Ok(Event::Created { lease: std::sync::Arc::new(lease) })
        }
    }
}

/// The binary lease record (module docs).
mod binary {
    use crate::ledger::codec::{get_i64, get_str, get_u8, get_varint, put_i64, put_str, put_varint};
    use crate::ledger::strings::ReplayMemo;
    use crate::ledger::{ClaimSnapshot, Lease, LeaseCredential, LeaseState, Renewal};
    use crate::mint::Revocation;
    use std::sync::Arc;

    fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                put_str(out, s);
            }
        }
    }

    fn get_opt<'a>(input: &mut &'a [u8]) -> Option<Option<&'a str>> {
        match get_u8(input)? {
            0 => Some(None),
            1 => Some(Some(get_str(input)?)),
            _ => None,
        }
    }

    const STATES: [LeaseState; 5] =
        [LeaseState::Active, LeaseState::Revoking, LeaseState::Revoked, LeaseState::Expired, LeaseState::Irrevocable];
    const REVOCATIONS: [Revocation; 3] = [Revocation::Immediate, Revocation::DenyPolicy, Revocation::Expiry];

    /// Everything but the claims, which follow in one of two forms.
    pub(super) fn write_lease(l: &Lease, out: &mut Vec<u8>) {
        for s in [&l.id, &l.job, &l.policy, &l.issuer] {
            put_str(out, s);
        }
        put_i64(out, l.created_at);
        put_i64(out, l.expires_at);
        out.push(STATES.iter().position(|s| *s == l.state).unwrap_or(0) as u8);
        put_opt(out, l.reason.as_deref());
        put_varint(out, u64::from(l.attempts));
        put_i64(out, l.next_attempt_at);
        put_opt(out, l.last_error.as_deref());
        put_varint(out, l.credentials.len() as u64);
        for c in &l.credentials {
            put_str(out, &c.name);
            put_str(out, &c.kind);
            out.push(REVOCATIONS.iter().position(|r| *r == c.revocation).unwrap_or(0) as u8);
            put_str(out, &c.backend);
            put_str(out, &c.data);
        }
        if let Some(r) = &l.renewal {
            put_str(out, &r.token_sha256);
            put_varint(out, u64::from(r.count));
            put_i64(out, r.last_at);
        }
    }

    /// `renewable`: the record's tag says a [`Renewal`] follows the credentials.
    pub(super) fn read_lease(input: &mut &[u8], memo: &mut ReplayMemo, renewable: bool) -> Option<Lease> {
        let id: Arc<str> = get_str(input)?.into();
        let job: Arc<str> = get_str(input)?.into();
        let policy = memo.name(get_str(input)?);
        let issuer = memo.name(get_str(input)?);
        let created_at = get_i64(input)?;
        let expires_at = get_i64(input)?;
        let state = *STATES.get(usize::from(get_u8(input)?))?;
        let reason = get_opt(input)?.map(|r| memo.name(r));
        let attempts = u32::try_from(get_varint(input)?).ok()?;
        let next_attempt_at = get_i64(input)?;
        let last_error = get_opt(input)?.map(Into::into);
        let n = usize::try_from(get_varint(input)?).ok()?;
        // Bounded by the bytes left: a corrupt count cannot make us allocate a huge vector.
        let mut credentials = Vec::with_capacity(n.min(input.len()));
        for _ in 0..n {
            let name = memo.name(get_str(input)?);
            let kind = memo.name(get_str(input)?);
            let revocation = *REVOCATIONS.get(usize::from(get_u8(input)?))?;
            let backend = memo.name(get_str(input)?);
            let data: Box<str> = get_str(input)?.into();
            credentials.push(LeaseCredential { name, kind, revocation, backend, data });
        }
        let renewal = match renewable {
            false => None,
            true => Some(Box::new(Renewal {
                token_sha256: get_str(input)?.into(),
                count: u32::try_from(get_varint(input)?).ok()?,
                last_at: get_i64(input)?,
            })),
        };
        Some(Lease {
            id,
            job,
            policy,
            issuer,
            created_at,
            expires_at,
            state,
            reason,
            attempts,
            next_attempt_at,
            last_error,
            credentials: credentials.into_boxed_slice(),
            claims: ClaimSnapshot::default(), // read next, by the caller (two forms)
            renewal,
        })
    }
}

/// CRC32 over the length field and the payload, so a damaged length is caught too.
fn checksum(len: &[u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Decodes a whole journal file. Returns the events and the length of the good prefix; a torn
/// tail is everything after it. Corruption before the tail is an error.
pub fn decode(bytes: &[u8]) -> Result<(Vec<Event>, u64), String> {
    let mut events = Vec::new();
    let good = decode_with(bytes, |e| events.push(e))?;
    Ok((events, good))
}

/// How many records the file seems to hold (lengths only, no checks): for sizing the ledger
/// before a replay, so its maps do not grow a million entries by doubling.
pub fn count_records(bytes: &[u8]) -> usize {
    let mut at = MAGIC.len();
    let mut n = 0;
    while let Some(header) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len == 0 || len > MAX_RECORD_BYTES {
            break;
        }
        at += 8 + len;
        n += 1;
    }
    n
}

/// [`decode`], handing each event to `sink` as it is read (replay applies a million leases: no
/// vector of them all). On an error, events before the corrupt record have been handed out.
pub fn decode_with(bytes: &[u8], mut sink: impl FnMut(Event)) -> Result<u64, String> {
    if bytes.len() < MAGIC.len() {
        // A crash while writing the magic of a brand-new journal: nothing was recorded yet.
        return if MAGIC.starts_with(bytes) { Ok(0) } else { Err("not an ephemera journal".into()) };
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err("not an ephemera journal (bad magic)".into());
    }
    let mut memo = ReplayMemo::default();
    let mut at = MAGIC.len();
    while at < bytes.len() {
        let rest = &bytes[at..];
        // After a crash the file system may show unsynced appended blocks as zeros.
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let Some(header) = rest.get(..8) else { break }; // torn: header cut short
        let len_bytes = [header[0], header[1], header[2], header[3]];
        let len = u32::from_le_bytes(len_bytes) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_RECORD_BYTES {
            return Err(format!("corrupt record at byte {at}: impossible length {len}"));
        }
        let Some(payload) = rest.get(8..8 + len) else { break }; // torn: runs past the end
        let after = &rest[8 + len..];
        if checksum(&len_bytes, payload) != crc {
            // Torn: the last record's bytes did not all reach the disk. Only zeros may follow it:
            // the room the file was grown by ahead of its records (`FileStorage`'s `ROOM_STEP`),
            // which a torn append lands in. Anything else after it means records were appended
            // after it: corruption, and silently dropping it and what follows could forget a
            // lease that still needs revoking.
            if after.iter().all(|b| *b == 0) {
                break;
            }
            let after = after.len();
            return Err(format!("corrupt record at byte {at}: checksum mismatch, with {after} bytes after it"));
        }
        let event = decode_payload(payload, &mut memo).map_err(|e| format!("unreadable record at byte {at}: {e}"))?;
        sink(event);
        at += 8 + len;
    }
    Ok(at as u64)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    // `events`, `file_with` and `lease` are shared with the `file` and `writer` tests.

    pub(crate) fn events(n: usize) -> Vec<Event> {
        (0..n).map(|i| Event::Revoked { id: format!("lse_{i}"), at: i as i64 }).collect()
    }

    pub(crate) fn file_with(events: &[Event]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        encode(events, &mut bytes);
        bytes
    }

    pub(crate) fn lease(i: usize) -> Event {
        let claims = serde_json::json!({
            "repository": "octo-org/octo-repo", "repository_id": "74", "jti": format!("jti-{i}"),
            "iat": 1632493567, "aud": ["a", "b"], "ref_protected": "true", "none": null,
        });
        let lease = serde_json::json!({
            "id": format!("lse_{i}"), "job": format!("github:74:{i}:1:{i}"), "policy": "deploy", "issuer": "github",
            "created_at": 10, "expires_at": -5, "state": "revoking", "reason": "policy-changed", "attempts": 3,
            "next_attempt_at": 99, "last_error": "backend jwt: boom",
            "credentials": [
                {"name": "api", "kind": "jwt", "revocation": "immediate", "handle": {"backend": "jwt", "data": {"jti": "jti_x"}}},
                {"name": "aws", "kind": "aws", "revocation": "deny-policy", "handle": {"backend": "aws-prod", "data": {"role": "r", "n": 5}}},
            ],
            "claims": claims,
        });
        serde_json::from_value(serde_json::json!({"t": "created", "lease": lease})).unwrap()
    }

    #[test]
    fn leases_round_trip_through_the_binary_record() {
        let all = vec![lease(1), events(1).remove(0), lease(2)];
        let bytes = file_with(&all);
        assert_eq!(bytes[MAGIC.len() + 8], BINARY_LEASE, "a lease is written in binary");
        let (decoded, good) = decode(&bytes).unwrap();
        assert_eq!(decoded, all);
        assert_eq!(good, bytes.len() as u64);
    }

    #[test]
    fn a_journal_with_json_lease_records_still_replays() {
        // The record format before binary leases: every payload JSON.
        let mut bytes = MAGIC.to_vec();
        for event in [lease(7), events(1).remove(0)] {
            let payload = serde_json::to_vec(&event).unwrap();
            let len = (payload.len() as u32).to_le_bytes();
            bytes.extend_from_slice(&len);
            bytes.extend_from_slice(&checksum(&len, &payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
        }
        let (decoded, _) = decode(&bytes).unwrap();
        assert_eq!(decoded, vec![lease(7), events(1).remove(0)]);
    }

    /// The payloads of the records in `bytes` (no magic).
    fn payloads(mut bytes: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        while bytes.len() >= 8 {
            let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            out.push(&bytes[8..8 + len]);
            bytes = &bytes[8 + len..];
        }
        out
    }

    #[test]
    fn a_damaged_binary_lease_is_an_error_not_a_misread_lease() {
        let mut self_contained = Vec::new();
        encode(&[lease(3)], &mut self_contained);
        let mut compacted = Vec::new();
        SnapshotEncoder::default().encode(&[lease(3)], &mut compacted);
        for (form, bytes) in [(BINARY_LEASE, self_contained), (DICT_LEASE, compacted)] {
            let mut payload = payloads(&bytes)[0].to_vec();
            assert_eq!(payload[0], form);
            assert_eq!(decode_payload(&payload, &mut ReplayMemo::default()).unwrap(), lease(3));
            for cut in 1..payload.len() {
                assert!(decode_payload(&payload[..cut], &mut ReplayMemo::default()).is_err(), "{form}: cut at {cut}");
            }
            payload.push(0);
            assert!(decode_payload(&payload, &mut ReplayMemo::default()).is_err(), "{form}: trailing bytes");
        }
    }

    fn renewable(i: usize) -> Event {
        let Event::Created { mut lease } = lease(i) else { unreachable!() };
        std::sync::Arc::make_mut(&mut lease).renewal =
            Some(Box::new(crate::ledger::Renewal { token_sha256: "ab".repeat(32).into(), count: 7, last_at: 42 }));
        Event::Created { lease }
    }

    #[test]
    fn a_renewable_lease_round_trips_in_both_forms_and_every_cut_is_an_error() {
        let mut self_contained = Vec::new();
        encode(&[renewable(4)], &mut self_contained);
        let mut compacted = Vec::new();
        SnapshotEncoder::default().encode(&[renewable(4)], &mut compacted);
        for (form, bytes) in [(BINARY_RENEWABLE, self_contained), (DICT_RENEWABLE, compacted)] {
            let payload = payloads(&bytes)[0].to_vec();
            assert_eq!(payload[0], form);
            assert_eq!(decode_payload(&payload, &mut ReplayMemo::default()).unwrap(), renewable(4));
            for cut in 1..payload.len() {
                assert!(decode_payload(&payload[..cut], &mut ReplayMemo::default()).is_err(), "{form}: cut at {cut}");
            }
        }
        // A lease without a renewal keeps the forms journals had before renewals existed.
        let mut plain = Vec::new();
        encode(&[lease(4)], &mut plain);
        assert_eq!(payloads(&plain)[0][0], BINARY_LEASE);
    }

    #[test]
    fn a_compaction_encodes_a_lease_whose_strings_the_file_has_while_an_exchange_holds_the_string_table() {
        // Every exchange takes the string table's lock (interning its claims). A compaction
        // thread that took it for every lease, then was set aside by the scheduler (it runs at
        // nice +10), would hold every exchange up; it takes it only for a string new to the file.
        let (first, second) = (lease(1), lease(2));
        let mut encoder = SnapshotEncoder::default();
        let mut out = Vec::new();
        encoder.encode(std::slice::from_ref(&first), &mut out);
        let held = crate::ledger::strings::table();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            encoder.encode(std::slice::from_ref(&second), &mut out);
            // `second` goes back with the rest: dropping it here would take the lock.
            let _ = done.send((encoder, out, second));
        });
        let (encoder, mut out, second) =
            finished.recv_timeout(std::time::Duration::from_secs(30)).expect("the encoder waited for the table's lock");
        drop(held);
        // A new string still defines itself (taking the lock, now free).
        let mut third = lease(3);
        if let Event::Created { lease } = &mut third {
            let lease = std::sync::Arc::make_mut(lease);
            let claims = serde_json::json!({"repository": "octo-org/another-repo-entirely"});
            lease.claims = ClaimSnapshot::new(claims.as_object().unwrap());
        }
        let mut encoder = encoder;
        encoder.encode(std::slice::from_ref(&third), &mut out);
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&out);
        assert_eq!(decode(&file).unwrap().0, vec![first, second, third]);
    }

    #[test]
    fn a_compacted_journal_replays_the_same_leases_and_writes_each_shared_string_once() {
        let all: Vec<Event> = (0..200).map(lease).chain(events(2)).collect();
        let mut compacted = MAGIC.to_vec();
        let mut encoder = SnapshotEncoder::default();
        // In batches, as the bench writes it: the dictionary carries over between them.
        encoder.encode(&all[..70], &mut compacted);
        encoder.encode(&all[70..], &mut compacted);
        assert_eq!(compacted[MAGIC.len() + 8], DICT_LEASE);
        let (decoded, good) = decode(&compacted).unwrap();
        assert_eq!(decoded, all);
        assert_eq!(good, compacted.len() as u64);

        let occurrences = |bytes: &[u8], text: &[u8]| bytes.windows(text.len()).filter(|w| *w == text).count();
        assert_eq!(occurrences(&compacted, b"octo-org/octo-repo"), 1, "a shared value is defined once");
        assert_eq!(occurrences(&compacted, b"ref_protected"), 1, "a claim name is defined once");
        let self_contained = file_with(&all);
        assert_eq!(occurrences(&self_contained, b"octo-org/octo-repo"), 200);
        assert!(
            compacted.len() * 10 < self_contained.len() * 8,
            "{} bytes compacted vs {} self-contained",
            compacted.len(),
            self_contained.len()
        );

        // Appends after a compaction are self-contained records; both kinds replay together.
        let mut appended = compacted.clone();
        encode(&[lease(500)], &mut appended);
        let (decoded, _) = decode(&appended).unwrap();
        assert_eq!(decoded.last(), Some(&lease(500)));
    }

    #[test]
    fn a_compacted_record_that_uses_a_string_the_file_never_defined_is_corrupt() {
        // The second lease's record refers to strings the first one defined. Without the first
        // (a file spliced together, or a bug), the ids point nowhere: refused, never misread.
        let mut bytes = Vec::new();
        SnapshotEncoder::default().encode(&[lease(1), lease(2)], &mut bytes);
        let second = payloads(&bytes)[1];
        assert_eq!(second[..2], [DICT_LEASE, 0], "the second record defines nothing new");
        let err = decode_payload(second, &mut ReplayMemo::default()).unwrap_err();
        assert_eq!(err, "not a lease record");

        let mut file = MAGIC.to_vec();
        push_record(&mut file, |out| out.extend_from_slice(second));
        push_record(&mut file, |out| out.extend_from_slice(second));
        let err = decode(&file).unwrap_err();
        assert!(err.starts_with("unreadable record at byte 8"), "{err}");
    }

    #[test]
    fn records_round_trip() {
        let bytes = file_with(&events(3));
        let (decoded, good) = decode(&bytes).unwrap();
        assert_eq!(decoded, events(3));
        assert_eq!(good, bytes.len() as u64);
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_possible_length() {
        let whole = file_with(&events(3));
        let two = file_with(&events(2)).len();
        for cut in two..whole.len() {
            let (decoded, good) = decode(&whole[..cut]).unwrap();
            assert_eq!(decoded, events(2), "cut at {cut}");
            assert_eq!(good, two as u64, "cut at {cut}");
        }
    }

    #[test]
    fn a_last_record_with_bad_bytes_is_a_torn_tail() {
        let mut bytes = file_with(&events(3));
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(decode(&bytes).unwrap().0, events(2));
    }

    #[test]
    fn a_corrupt_middle_record_stops_with_its_offset() {
        let mut bytes = file_with(&events(3));
        bytes[MAGIC.len() + 10] ^= 0xff; // inside the first payload
        let err = decode(&bytes).unwrap_err();
        assert!(err.contains("corrupt record at byte 8"), "{err}");
    }

    #[test]
    fn a_zero_filled_tail_after_a_crash_is_torn_not_corrupt() {
        let mut bytes = file_with(&events(2));
        bytes.extend_from_slice(&[0u8; 4096]);
        assert_eq!(decode(&bytes).unwrap().0, events(2));
    }

    #[test]
    fn a_torn_record_in_the_zero_room_after_the_records_is_torn_at_every_length_not_corrupt() {
        // A journal grown ahead in zeros (`FileStorage`'s room): a crash mid-append leaves the
        // record's first bytes, then the zeros it did not overwrite.
        let whole = file_with(&events(3));
        let two = file_with(&events(2)).len();
        for cut in two + 1..whole.len() {
            let mut bytes = whole[..cut].to_vec();
            bytes.resize(whole.len() + 4096, 0);
            let (decoded, good) = decode(&bytes).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!((decoded, good), (events(2), two as u64), "cut at {cut}");
        }
        // A record whose bytes are damaged with a later record's bytes after it, though, is
        // corruption even when the room follows them both.
        let mut bytes = whole.clone();
        bytes[two + 10] ^= 0xff;
        bytes.extend_from_slice(&file_with(&events(1))[MAGIC.len()..]);
        bytes.resize(bytes.len() + 4096, 0);
        let err = decode(&bytes).unwrap_err();
        assert!(err.contains(&format!("corrupt record at byte {two}")), "{err}");
    }

    #[test]
    fn a_damaged_length_field_mid_file_is_corruption() {
        let mut bytes = file_with(&events(3));
        bytes[MAGIC.len()] ^= 0x01; // length of the first record, off by one
        assert!(decode(&bytes).unwrap_err().contains("corrupt record at byte 8"));
    }

    #[test]
    fn another_file_is_not_a_journal() {
        assert!(decode(b"{\"some\": \"json\"}").is_err());
    }
}
