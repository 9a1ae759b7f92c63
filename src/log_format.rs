//! The broker's log lines: one JSON object per event, the shape `tracing-subscriber`'s JSON
//! format writes (`timestamp`, `level`, `fields`, `target`, and the current `span` with its
//! fields and `name`), written straight into the line buffer.
//!
//! `tracing-subscriber`'s own JSON format keeps each span's fields as JSON text, parses that
//! text back into a map for every event inside the span, and parses and rewrites it again
//! whenever a field is recorded on the span: every request paid for both, for one line. Here a
//! span's fields are kept as `"key":value` pairs that are copied into the line as they are, and
//! an event's fields are escaped into the buffer without a map in between.
//! `tests` hold the two formats to the same JSON for the same events.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format: `tracing_subscriber::fmt().fmt_fields(JsonFields).event_format(JsonLine)`.
pub struct JsonLine;

/// A span's fields as comma-separated `"key":value` pairs (no braces), appended to as fields
/// are recorded.
pub struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        pairs(&mut writer, true, fields)
    }

    fn add_fields(&self, current: &mut FormattedFields<Self>, fields: &tracing::span::Record<'_>) -> fmt::Result {
        let first = current.fields.is_empty();
        pairs(&mut current.fields, first, fields)
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, JsonFields>, mut out: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        out.write_str("{\"timestamp\":\"")?;
        write!(out, "{}", humantime::format_rfc3339_micros(std::time::SystemTime::now()))?;
        write!(out, "\",\"level\":\"{}\",\"fields\":{{", meta.level())?;
        pairs(&mut out, true, event)?;
        out.write_str("},\"target\":")?;
        string(&mut out, meta.target())?;
        let span = event.parent().and_then(|id| ctx.span(id)).or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            out.write_str(",\"span\":{")?;
            let extensions = span.extensions();
            if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>()
                && !fields.fields.is_empty()
            {
                out.write_str(&fields.fields)?;
                out.write_char(',')?;
            }
            out.write_str("\"name\":")?;
            string(&mut out, span.name())?;
            out.write_char('}')?;
        }
        out.write_str("}\n")
    }
}

/// Writes `fields` as `"name":value` pairs, commas between (and before the first unless
/// `first`).
fn pairs(out: &mut impl fmt::Write, first: bool, fields: impl RecordFields) -> fmt::Result {
    let mut visitor = Pairs { out, first, result: Ok(()) };
    fields.record(&mut visitor);
    visitor.result
}

/// Writes each field it visits as `"name":value`, commas between.
struct Pairs<'a, W: fmt::Write> {
    out: &'a mut W,
    first: bool,
    result: fmt::Result,
}

impl<W: fmt::Write> Pairs<'_, W> {
    fn pair(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(',')?;
            }
            string(self.out, field.name())?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl<W: fmt::Write> Visit for Pairs<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.pair(field, |out| string(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: null, as serde_json writes them.
        self.pair(field, |out| if value.is_finite() { write!(out, "{value:?}") } else { out.write_str("null") });
    }

    /// Everything else (`%display`, `?debug`, errors, 128-bit integers, the message) is text.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.pair(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `text` as a JSON string.
fn string(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(text)?;
    out.write_char('"')
}

/// Escapes what passes through it as the inside of a JSON string, as serde_json does: `"`, `\`
/// and the control characters. A log line is one line whatever a field holds (a header value,
/// a claim, an upstream's error text): a newline in it cannot start a forged line.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut start = 0;
        for (i, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&text[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&text[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// The events the broker writes, in every field type, with text that needs escaping.
    fn emit() {
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} del \u{7f} é ✓";
        tracing::info!("ledger resumed");
        let span = tracing::info_span!("request", request_id = %"req_01", lease_id = tracing::field::Empty);
        span.in_scope(|| tracing::warn!(code = "bad_request", status = 400u64, detail = %awkward, "request refused"));
        span.record("lease_id", "lse_01");
        span.in_scope(|| {
            tracing::info!(method = %"POST", route = %"/v1/exchange", status = 201u16, micros = 812u64, "request");
            tracing::error!(signed = -3i64, ok = true, ratio = 0.25f64, nan = f64::NAN, big = 1u128 << 100, list = ?["a", "b"], "{awkward}");
        });
        let empty = tracing::info_span!("quiet");
        empty.in_scope(|| {
            tracing::info!(error = &std::io::Error::other("disk \"full\"") as &dyn std::error::Error, "x")
        });
    }

    fn lines(buffer: &Buffer) -> Vec<String> {
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn a_line_is_the_json_tracing_subscriber_writes_for_the_same_event() {
        let (theirs, ours) = (Buffer::default(), Buffer::default());
        let reference = tracing_subscriber::fmt()
            .json()
            .with_writer(theirs.clone())
            .with_current_span(true)
            .with_span_list(false)
            .finish();
        tracing::subscriber::with_default(reference, emit);
        let fast =
            tracing_subscriber::fmt().fmt_fields(JsonFields).event_format(JsonLine).with_writer(ours.clone()).finish();
        tracing::subscriber::with_default(fast, emit);

        let (theirs, ours) = (lines(&theirs), lines(&ours));
        assert_eq!(theirs.len(), 5, "{theirs:#?}");
        assert_eq!(ours.len(), theirs.len(), "{ours:#?}");
        for (t, o) in theirs.iter().zip(&ours) {
            let mut t: Value = serde_json::from_str(t).unwrap();
            let mut o: Value = serde_json::from_str(o).unwrap_or_else(|e| panic!("not JSON ({e}): {o}"));
            let (t_time, o_time) = (t["timestamp"].take(), o["timestamp"].take());
            assert_eq!(o, t, "ours:\n{o}\ntheirs:\n{t}");
            // Both RFC 3339 in UTC with microseconds.
            let shape = |v: &Value| v.as_str().map(|s| (s.len(), s.ends_with('Z'), s.as_bytes()[19] == b'.'));
            assert_eq!(shape(&o_time), shape(&t_time), "{o_time} vs {t_time}");
        }
        assert!(ours.iter().all(|l| !l.contains('\u{7}')), "control characters are escaped");
    }
}
