//! The inline deny policy `ephemera-revoked` that revokes STS sessions one by one: build it,
//! parse it back (refusing anything ephemera did not write), merge new entries and drop expired
//! ones, check IAM's size limit on a role's inline policies, and the `YYYYMMDDHH` hour in each
//! statement's Sid that says when its sessions are dead anyway.

use super::{compact, shown};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Name of the role inline policy that denies revoked sessions.
pub const DENY_POLICY_NAME: &str = "ephemera-revoked";

/// IAM: the inline policies of one role may total at most 10,240 characters, whitespace excluded.
pub const MAX_ROLE_INLINE_POLICY_CHARS: usize = 10_240;

/// Seconds a deny entry outlives its hour bucket in [`merge_deny_entries`], so a broker clock
/// running ahead of AWS's cannot lift a deny while AWS still honours the session.
pub const DENY_CLOCK_SKEW_SECS: i64 = 300;

/// Sid prefix of the statements ephemera writes into [`DENY_POLICY_NAME`].
const DENY_SID_PREFIX: &str = "EphemeraRevokedUntil";
/// Policy language version of the deny document.
const POLICY_VERSION: &str = "2012-10-17";
/// 9999-12-31T23:00:00Z: the last hour a ten-digit `YYYYMMDDHH` Sid suffix can express.
const LAST_SID_HOUR: i64 = 253_402_297_200;

/// The end of the hour bucket for a session expiry: rounded up to a whole UTC hour (a time on
/// the hour stays), clamped to 1970..=9999 so the Sid keeps ten digits. Idempotent.
fn hour_bucket_end(expires_at: i64) -> i64 {
    let t = expires_at.clamp(0, LAST_SID_HOUR);
    (t + 3599) / 3600 * 3600
}

/// The inline deny policy for [`DENY_POLICY_NAME`]: one statement per hour bucket, Sid
/// `EphemeraRevokedUntil{YYYYMMDDHH}` (UTC end of the bucket), denying everything to sessions
/// whose `aws:SourceIdentity` is a revoked lease id. Entries are `(lease_id, session_expires_at)`;
/// a lease id appears once, in the bucket of its latest expiry; ids and statements are sorted so
/// the document is deterministic. IAM stores no expiry, so the Sid carries it and
/// [`parse_deny_policy`] can tell which entries are dead. `None` when empty: delete the policy.
pub fn deny_policy_document(entries: &[(String, i64)]) -> Option<Value> {
    let mut latest: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, expires_at) in entries {
        let slot = latest.entry(id.as_str()).or_insert(*expires_at);
        *slot = (*slot).max(*expires_at);
    }
    let mut buckets: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for (id, expires_at) in latest {
        buckets.entry(hour_bucket_end(expires_at)).or_default().push(id);
    }
    if buckets.is_empty() {
        return None;
    }
    let statements: Vec<Value> = buckets.iter().map(|(until, ids)| deny_statement(*until, ids)).collect();
    Some(json!({"Version": POLICY_VERSION, "Statement": statements}))
}

fn deny_statement(until: i64, lease_ids: &[&str]) -> Value {
    json!({
        "Sid": format!("{DENY_SID_PREFIX}{}", sid_hour(until)),
        "Effect": "Deny",
        "Action": "*",
        "Resource": "*",
        "Condition": {"StringEquals": {"aws:SourceIdentity": lease_ids}},
    })
}

/// Reads back a document written by [`deny_policy_document`] as `(lease_id, bucket_end_unix)`.
/// Any statement not exactly in ephemera's shape (a foreign Sid, an edited Effect or Condition)
/// is an error naming its Sid: a policy someone else wrote or changed is never overwritten.
pub fn parse_deny_policy(doc: &Value) -> Result<Vec<(String, i64)>, String> {
    let foreign_doc =
        || format!("inline policy {DENY_POLICY_NAME} is not a document ephemera wrote; leaving it untouched");
    let obj = doc.as_object().ok_or_else(foreign_doc)?;
    let only_ours = obj.len() == 2 && obj.get("Version").and_then(Value::as_str) == Some(POLICY_VERSION);
    let statements = match obj.get("Statement") {
        Some(Value::Array(list)) if only_ours => list.as_slice(),
        Some(one @ Value::Object(_)) if only_ours => std::slice::from_ref(one),
        _ => return Err(foreign_doc()),
    };
    let mut entries = Vec::new();
    for statement in statements {
        entries.extend(parse_deny_statement(statement)?);
    }
    Ok(entries)
}

fn parse_deny_statement(statement: &Value) -> Result<Vec<(String, i64)>, String> {
    let sid = statement.get("Sid").and_then(Value::as_str);
    let foreign = || {
        let named = sid.map_or_else(|| "without a Sid".to_string(), shown);
        format!(
            "inline policy {DENY_POLICY_NAME} holds statement {named} that ephemera did not write; leaving it untouched"
        )
    };
    let until = sid.and_then(|s| s.strip_prefix(DENY_SID_PREFIX)).and_then(parse_sid_hour).ok_or_else(foreign)?;
    let ids: Vec<&str> = statement
        .pointer("/Condition/StringEquals/aws:SourceIdentity")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // Rebuilding the statement from what was read proves every other field is exactly ours.
    if ids.is_empty() || deny_statement(until, &ids) != *statement {
        return Err(foreign());
    }
    Ok(ids.into_iter().map(|id| (id.to_string(), until)).collect())
}

/// Merges revoked leases into the existing deny entries: each lease id once, with its later
/// expiry; entries whose hour bucket ended at least [`DENY_CLOCK_SKEW_SECS`] before `now` are
/// dropped (their sessions are dead), which keeps the policy under IAM's size limit. Sorted by
/// lease id.
pub fn merge_deny_entries(existing: Vec<(String, i64)>, add: &[(String, i64)], now: i64) -> Vec<(String, i64)> {
    let mut latest: BTreeMap<String, i64> = BTreeMap::new();
    for (id, expires_at) in existing.into_iter().chain(add.iter().cloned()) {
        let slot = latest.entry(id).or_insert(expires_at);
        *slot = (*slot).max(expires_at);
    }
    latest.into_iter().filter(|(_, expires_at)| hour_bucket_end(*expires_at) + DENY_CLOCK_SKEW_SECS > now).collect()
}

/// Whether `doc`, added to a role already holding `other_inline_chars` of inline policy, stays
/// within IAM's 10,240-character aggregate (counted on the compact serialization, whitespace
/// between tokens excluded as IAM does). A `PutRolePolicy` over the limit fails, and with it
/// the revocation, so the caller must know before it tries.
pub fn fits_inline_limit(doc: &Value, other_inline_chars: usize) -> bool {
    compact(doc).is_ok_and(|(_, chars)| chars.saturating_add(other_inline_chars) <= MAX_ROLE_INLINE_POLICY_CHARS)
}

// ---------------------------------------------------------------------------------------------
// UTC civil time (Howard Hinnant's algorithms), for the deny Sid
// ---------------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `(year, month, day)` of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYYMMDDHH` (UTC) of a unix time.
fn sid_hour(unix: i64) -> String {
    let (year, month, day) = civil_from_days(unix.div_euclid(86_400));
    let hour = unix.rem_euclid(86_400) / 3600;
    format!("{year:04}{month:02}{day:02}{hour:02}")
}

/// The unix time of a `YYYYMMDDHH` suffix; `None` unless it is exactly what [`sid_hour`] writes
/// for a real date and hour.
fn parse_sid_hour(digits: &str) -> Option<i64> {
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |range: std::ops::Range<usize>| digits.get(range).and_then(|s| s.parse::<i64>().ok());
    let (year, month, day, hour) = (field(0..4)?, field(4..6)?, field(6..8)?, field(8..10)?);
    let unix = days_from_civil(year, month, day) * 86_400 + hour * 3600;
    (sid_hour(unix) == digits).then_some(unix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_crosses_year_month_and_leap_day_boundaries() {
        let cases = [
            ("epoch", 0, "1970010100"),
            ("last hour of 1999", 946_684_799, "1999123123"),
            ("millennium", 946_684_800, "2000010100"),
            ("leap day 2000", 951_782_400, "2000022900"),
            ("after leap day 2000", 951_868_800, "2000030100"),
            ("leap day 2024", 1_709_164_800, "2024022900"),
            ("end of january", 1_706_745_599, "2024013123"),
            ("start of february", 1_706_745_600, "2024020100"),
            ("2100 is not leap", 4_107_538_800, "2100022823"),
            ("march 2100", 4_107_542_400, "2100030100"),
            ("last sid hour", LAST_SID_HOUR, "9999123123"),
        ];
        for (scenario, unix, want) in cases {
            assert_eq!(sid_hour(unix), want, "{scenario}");
            let hour_start = unix - unix % 3600;
            assert_eq!(parse_sid_hour(want), Some(hour_start), "{scenario}");
        }
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn sid_hours_that_are_not_real_times_are_refused() {
        for bad in ["2023022900", "2024130100", "2024010024", "2024000100", "202401010", "20240101x0", "+024010100"] {
            assert_eq!(parse_sid_hour(bad), None, "{bad}");
        }
    }

    const T0: i64 = 1_709_164_800; // 2024-02-29T00:00:00Z

    type Entries = Vec<(String, i64)>;

    fn entry(id: &str, at: i64) -> (String, i64) {
        (id.to_string(), at)
    }

    #[test]
    fn deny_document_groups_leases_by_expiry_hour() {
        let entries = [
            entry("lease-b", T0 + 10),
            entry("lease-a", T0 + 3000),
            entry("lease-c", T0 + 3600),
            entry("lease-d", T0 + 3601),
        ];
        let doc = deny_policy_document(&entries).unwrap();
        let want = json!({"Version": "2012-10-17", "Statement": [
            {"Sid": "EphemeraRevokedUntil2024022901", "Effect": "Deny", "Action": "*", "Resource": "*",
             "Condition": {"StringEquals": {"aws:SourceIdentity": ["lease-a", "lease-b", "lease-c"]}}},
            {"Sid": "EphemeraRevokedUntil2024022902", "Effect": "Deny", "Action": "*", "Resource": "*",
             "Condition": {"StringEquals": {"aws:SourceIdentity": ["lease-d"]}}},
        ]});
        assert_eq!(doc, want);
        assert_eq!(deny_policy_document(&[]), None, "empty: the caller deletes the policy");
    }

    #[test]
    fn deny_document_round_trips_through_parse() {
        let cases: Vec<(&str, Entries, Entries)> = vec![
            ("one lease", vec![entry("l1", T0 + 1)], vec![entry("l1", T0 + 3600)]),
            ("on the hour stays", vec![entry("l1", T0)], vec![entry("l1", T0)]),
            (
                "two buckets",
                vec![entry("l2", T0 + 7000), entry("l1", T0 + 5)],
                vec![entry("l1", T0 + 3600), entry("l2", T0 + 7200)],
            ),
            (
                "duplicate keeps the later",
                vec![entry("l1", T0 + 5), entry("l1", T0 + 4000)],
                vec![entry("l1", T0 + 7200)],
            ),
        ];
        for (scenario, entries, want) in cases {
            let doc = deny_policy_document(&entries).unwrap();
            assert_eq!(parse_deny_policy(&doc).unwrap(), want, "{scenario}");
            let text = serde_json::to_string(&doc).unwrap();
            let reread: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(parse_deny_policy(&reread).unwrap(), want, "{scenario} via text");
        }
    }

    #[test]
    fn deny_documents_ephemera_did_not_write_are_refused() {
        let ours = deny_policy_document(&[entry("l1", T0)]).unwrap();
        let with = |pointer: &str, value: Value| {
            let mut doc = ours.clone();
            *doc.pointer_mut(pointer).unwrap() = value;
            doc
        };
        let mut extra_statement = ours.clone();
        extra_statement["Statement"].as_array_mut().unwrap().push(json!({"Sid": "AllowAll", "Effect": "Allow"}));
        let cases: Vec<(&str, Value, &str)> = vec![
            ("foreign sid", with("/Statement/0/Sid", json!("AdminDenyS3")), "\"AdminDenyS3\""),
            ("foreign statement appended", extra_statement, "\"AllowAll\""),
            ("effect edited", with("/Statement/0/Effect", json!("Allow")), "EphemeraRevokedUntil"),
            ("action narrowed", with("/Statement/0/Action", json!("s3:*")), "EphemeraRevokedUntil"),
            (
                "other condition key",
                with("/Statement/0/Condition", json!({"StringEquals": {"aws:userid": ["l1"]}})),
                "EphemeraRevokedUntil",
            ),
            (
                "impossible sid date",
                with("/Statement/0/Sid", json!("EphemeraRevokedUntil2023022900")),
                "EphemeraRevokedUntil",
            ),
            ("no sid", with("/Statement/0/Sid", Value::Null), "without a Sid"),
            ("empty lease list", with("/Statement/0/Condition/StringEquals/aws:SourceIdentity", json!([])), "Until"),
            ("other version", with("/Version", json!("2008-10-17")), "not a document ephemera wrote"),
            ("not an object", json!("deny"), "not a document ephemera wrote"),
        ];
        for (scenario, doc, named) in cases {
            let err = parse_deny_policy(&doc).unwrap_err();
            assert!(err.contains(named) && err.contains("untouched"), "{scenario}: {err}");
        }
    }

    #[test]
    fn merge_deduplicates_and_drops_expired_buckets() {
        let now = T0 + 10_000;
        let existing = vec![entry("dead", T0 + 3600), entry("live", T0 + 14_400), entry("both", T0 + 10_800)];
        let add = [entry("both", T0 + 18_000), entry("new", T0 + 10_500), entry("new-dead", T0 - 50)];
        let merged = merge_deny_entries(existing, &add, now);
        assert_eq!(merged, vec![entry("both", T0 + 18_000), entry("live", T0 + 14_400), entry("new", T0 + 10_500)]);
        let doc = deny_policy_document(&merged).unwrap();
        let mut reparsed = parse_deny_policy(&doc).unwrap();
        reparsed.sort();
        assert_eq!(merge_deny_entries(reparsed.clone(), &[], now), reparsed, "merging parsed entries is stable");
    }

    #[test]
    fn merge_keeps_a_bucket_until_the_skew_allowance_has_passed() {
        let bucket_end = T0 + 3600;
        let cases = [
            ("before the bucket ends", bucket_end - 1, true),
            ("bucket ended, within skew", bucket_end + DENY_CLOCK_SKEW_SECS - 1, true),
            ("skew passed", bucket_end + DENY_CLOCK_SKEW_SECS, false),
        ];
        for (scenario, now, kept) in cases {
            let merged = merge_deny_entries(vec![entry("l1", T0 + 1)], &[], now);
            assert_eq!(!merged.is_empty(), kept, "{scenario}");
        }
    }

    #[test]
    fn inline_limit_boundary_is_10240_compact_chars() {
        let doc = deny_policy_document(&[entry("l1", T0)]).unwrap();
        let size = serde_json::to_string(&doc).unwrap().len();
        let cases = [
            ("exactly at the limit", MAX_ROLE_INLINE_POLICY_CHARS - size, true),
            ("one over", MAX_ROLE_INLINE_POLICY_CHARS - size + 1, false),
            ("alone", 0, true),
            ("huge other policies", usize::MAX, false),
        ];
        for (scenario, other, fits) in cases {
            assert_eq!(fits_inline_limit(&doc, other), fits, "{scenario}");
        }
    }

    #[test]
    fn extreme_expiry_times_do_not_overflow() {
        let doc = deny_policy_document(&[entry("far", i64::MAX), entry("past", i64::MIN)]).unwrap();
        let parsed = parse_deny_policy(&doc).unwrap();
        assert_eq!(parsed, vec![entry("past", 0), entry("far", LAST_SID_HOUR)]);
        assert_eq!(merge_deny_entries(parsed, &[], i64::MAX), vec![]);
    }
}
