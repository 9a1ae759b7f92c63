//! The mutator: byte-level havoc (flips, interesting bytes, inserted, deleted and duplicated
//! ranges, splices from other corpus entries, dictionary tokens, hostile numbers, deep nesting,
//! long runs, invalid UTF-8), plus one structure-aware mutation per target, so most inputs still
//! parse far enough to reach the checks behind the parser:
//!
//! - JSON (token header and claims, JWKS, webhook bodies, journal JSON records): parsed, one
//!   node replaced, removed, added, retyped (`74` ↔ `"74"`), copied from elsewhere, then written
//!   back, sometimes with a hostile literal serde_json could not write (`1e309`, `-0`, a key twice).
//! - YAML and TOML (policies, configs): lines deleted, duplicated, swapped, re-indented, taken
//!   from another corpus entry, dictionary lines inserted, values replaced.
//! - tokens given as text: one of the three parts decoded, mutated, re-encoded.
//! - journals: records mutated with their checksum fixed up (so they reach the decoder), records
//!   dropped, repeated, reordered and spliced across journals; sometimes a length or checksum
//!   broken on purpose, or the file cut (a torn tail).

use serde_json::Value;

/// splitmix64: small, fast, and reproducible from `--seed`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    /// True `num` times in `den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Numbers that break parsers: beyond i64/u64/f64, negative zero, exponents, leading zeros.
#[rustfmt::skip]
const NUMBERS: [&str; 16] = [
    "0", "-1", "-0", "1e309", "-1e309", "1e-400", "18446744073709551615", "18446744073709551616",
    "9223372036854775807", "-9223372036854775809", "9007199254740993", "1.5", "00", "0x10", "1_000",
    "99999999999999999999999999999999999999",
];

/// Byte sequences that are not UTF-8: a bad continuation, a surrogate, past U+10FFFF, 0xFF.
const NOT_UTF8: [&[u8]; 5] = [b"\xC3\x28", b"\xED\xA0\x80", b"\xF4\x90\x80\x80", b"\xFF", b"\xC0\x80"];

/// Text every target gets: quoting, escapes, control and format characters, separators.
#[rustfmt::skip]
const COMMON: [&str; 22] = [
    "\"", "'", "\\", "\n", "\r\n", "\t", "\0", "\u{feff}", "\u{202e}", "é", "𝔘", "\\u0000", "\\ud800", "${", "}",
    "%3A", ":", "..", "/", "*", "null", "true",
];

pub struct Mutator {
    target: &'static str,
    dictionary: Vec<Vec<u8>>,
    /// YAML or TOML lines for the line mutations.
    lines: Vec<&'static str>,
    max_len: usize,
}

impl Mutator {
    pub fn new(target: &'static str) -> Mutator {
        let (words, lines, max_len): (&[&str], &[&str], usize) = match target {
            "token" => (TOKEN_WORDS, &[], 20 * 1024),
            "jwks" => (JWKS_WORDS, &[], 70 * 1024),
            "policy" => (POLICY_WORDS, POLICY_LINES, 64 * 1024),
            "config" => (CONFIG_WORDS, CONFIG_LINES, 64 * 1024),
            "webhook" => (WEBHOOK_WORDS, &[], 64 * 1024),
            _ => (&[], &[], 256 * 1024),
        };
        let mut dictionary: Vec<Vec<u8>> =
            COMMON.iter().chain(words).chain(NUMBERS.iter()).map(|w| w.as_bytes().to_vec()).collect();
        dictionary.extend(NOT_UTF8.iter().map(|b| b.to_vec()));
        if target == "journal" {
            dictionary.extend(JOURNAL_BYTES.iter().map(|b| b.to_vec()));
            dictionary.extend(JOURNAL_JSON.iter().map(|w| w.as_bytes().to_vec()));
        }
        Mutator { target, dictionary, lines: lines.to_vec(), max_len }
    }

    /// A new input from `input` (and, for splices, the rest of `corpus`).
    pub fn mutate(&self, rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
        // Tokens and journals have a mutation of their parts that already mixes in byte-level
        // havoc; havoc over the whole input (the mode byte, the framing) is rarer for them.
        let whole = if matches!(self.target, "token" | "journal") { 10 } else { 4 };
        let mut out = match rng.chance(whole - 1, whole) {
            true => self.structured(rng, input, corpus).unwrap_or_else(|| input.to_vec()),
            false => input.to_vec(),
        };
        if out == input || rng.chance(1, whole) {
            havoc(rng, &mut out, corpus, &self.dictionary);
        }
        out.truncate(self.max_len);
        out
    }

    fn structured(&self, rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Option<Vec<u8>> {
        match self.target {
            "token" => self.token(rng, input, corpus),
            "jwks" => json(rng, input, corpus, &self.dictionary),
            "policy" | "config" => Some(lines(rng, input, corpus, &self.lines, &self.dictionary)),
            "webhook" => {
                let (platform, rest) = input.split_first()?;
                let (event, body) = split_ff(rest);
                let mut out = vec![*platform];
                if rng.chance(1, 8) {
                    out[0] = *rng.pick(b"glbx");
                }
                match rng.chance(1, 6) {
                    true => out.extend_from_slice(rng.pick(WEBHOOK_EVENTS).as_bytes()),
                    false => out.extend_from_slice(event),
                }
                out.push(0xFF);
                match json(rng, body, corpus, &self.dictionary) {
                    Some(body) => out.extend_from_slice(&body),
                    None => out.extend_from_slice(body),
                }
                Some(out)
            }
            "journal" => Some(journal(rng, input, corpus, &self.dictionary)),
            _ => None,
        }
    }

    /// Structured inputs: the header or (mostly) the claims mutated as JSON, rarely the signing
    /// key. Raw tokens: one part decoded, mutated, encoded again, or parts added or dropped.
    fn token(&self, rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Option<Vec<u8>> {
        let (&mode, rest) = input.split_first()?;
        if matches!(mode, b'R' | b'B' | b'E') {
            let (header, claims) = split_ff(rest);
            let (mut header, mut claims) = (header.to_vec(), claims.to_vec());
            // RSA signing costs ~1 ms, Ed25519 tens of µs: most structured inputs stay (or
            // become) Ed25519, and a switch of key usually names the new key in the header.
            let new_mode = match rng.below(100) {
                0 => b'R',
                1 => b'B',
                2 => b'T',
                _ if mode != b'E' && rng.chance(9, 10) => b'E',
                _ => mode,
            };
            if new_mode != mode
                && rng.chance(3, 4)
                && let Ok(Value::Object(mut h)) = serde_json::from_slice::<Value>(&header)
            {
                let (alg, kid) = if new_mode == b'E' { ("EdDSA", "ed-a") } else { ("RS256", "rsa-a") };
                h.insert("alg".into(), Value::from(alg));
                h.insert("kid".into(), Value::from(kid));
                header = Value::Object(h).to_string().into_bytes();
            }
            // One part changed: the claims three times in four, as JSON mostly, as bytes sometimes.
            let part = if rng.chance(1, 4) { &mut header } else { &mut claims };
            match json(rng, part, corpus, &self.dictionary) {
                Some(mutated) if rng.chance(7, 8) => *part = mutated,
                _ => havoc(rng, part, corpus, &self.dictionary),
            }
            let mut out = vec![new_mode];
            out.extend_from_slice(&header);
            out.push(0xFF);
            out.extend_from_slice(&claims);
            return Some(out);
        }
        let text = String::from_utf8_lossy(rest).into_owned();
        let mut parts: Vec<String> = text.split('.').map(str::to_string).collect();
        match rng.below(8) {
            0 if parts.len() > 1 => {
                parts.remove(rng.below(parts.len()));
            }
            1 => {
                let at = rng.below(parts.len() + 1);
                let part = parts[rng.below(parts.len())].clone();
                parts.insert(at, part);
            }
            2 => {
                // A part of another raw token (a signature over other bytes, say).
                let other = corpus[rng.below(corpus.len())].as_slice();
                if other.first() == Some(&b'T') {
                    let other = String::from_utf8_lossy(&other[1..]).into_owned();
                    let theirs: Vec<&str> = other.split('.').collect();
                    let at = rng.below(parts.len());
                    parts[at] = theirs[rng.below(theirs.len())].to_string();
                }
            }
            _ => {
                let at = rng.below(parts.len().min(3));
                let bytes = ephemera::ids::b64url_decode(&parts[at]).unwrap_or_else(|| parts[at].as_bytes().to_vec());
                let mutated = match at {
                    2 => {
                        let mut b = bytes;
                        havoc(rng, &mut b, corpus, &self.dictionary);
                        b
                    }
                    _ => json(rng, &bytes, corpus, &self.dictionary).unwrap_or(bytes),
                };
                parts[at] = match rng.chance(1, 16) {
                    // Standard base64 with padding, which base64url without padding refuses.
                    true => {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD.encode(&mutated)
                    }
                    false => ephemera::ids::b64url(&mutated),
                };
            }
        }
        let mut out = vec![b'T'];
        out.extend_from_slice(parts.join(".").as_bytes());
        Some(out)
    }
}

/// (before the first `0xFF`, after it).
fn split_ff(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|b| *b == 0xFF) {
        Some(at) => (&bytes[..at], &bytes[at + 1..]),
        None => (bytes, &[]),
    }
}

// ---- bytes -----------------------------------------------------------------------------------

/// 1–6 stacked byte-level mutations.
pub fn havoc(rng: &mut Rng, out: &mut Vec<u8>, corpus: &[Vec<u8>], dictionary: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(6) {
        let len = out.len();
        let at = rng.below(len + 1);
        match rng.below(16) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = *rng.pick(b"\x00\xff\x7f\x80 \"\\{}[]:,.\n09-");
            }
            2 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next_u64() as u8;
            }
            3 if len > 0 => {
                let most = if rng.chance(1, 4) { len } else { len.min(16) };
                let n = 1 + rng.below(most);
                let from = rng.below(len + 1 - n.min(len));
                out.drain(from..(from + n).min(len));
            }
            4 => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                out.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(256));
                let chunk = out[from..from + n].to_vec();
                out.splice(at..at, chunk);
            }
            6 | 7 => {
                let word = rng.pick(dictionary).clone();
                out.splice(at..at, word);
            }
            8 if len > 0 => {
                let word = rng.pick(dictionary).clone();
                let end = (at + word.len()).min(len);
                out.splice(at..end, word);
            }
            9 => {
                // Splice: a chunk of another entry, inserted or over this one's tail.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let n = 1 + rng.below(other.len() - from);
                    let chunk = other[from..from + n].to_vec();
                    match rng.chance(1, 2) {
                        true => out.splice(at..at, chunk),
                        false => out.splice(at.., chunk),
                    };
                }
            }
            10 => {
                // A run of digits (or any spot) becomes a hostile number.
                let start = (at..len).find(|i| out[*i].is_ascii_digit()).unwrap_or(at);
                let end = (start..len).find(|i| !out[*i].is_ascii_digit() && out[*i] != b'.').unwrap_or(len);
                out.splice(start..end, rng.pick(&NUMBERS).bytes());
            }
            11 => {
                // Deep nesting: around serde_json's limit of 128, and far beyond it.
                let depth = *rng.pick(&[64, 127, 128, 129, 300, 5_000, 50_000]);
                let (open, close) =
                    *rng.pick(&[("[", "]"), ("{\"a\":", "}"), ("- ", ""), ("[[", "]]"), ("a = [", "]")]);
                let mut nest = open.repeat(depth).into_bytes();
                if rng.chance(1, 2) {
                    nest.extend_from_slice(close.repeat(depth).as_bytes());
                }
                out.splice(at..at, nest);
            }
            12 => {
                let word = rng.pick(&NOT_UTF8).to_vec();
                out.splice(at..at, word);
            }
            13 if len > 0 => out.truncate(at),
            14 if rng.chance(1, 8) => {
                // A long run: past the size caps (16 KiB tokens, 64 KiB documents).
                let n = *rng.pick(&[300, 1_024, 17_000, 66_000]);
                let c = *rng.pick(b"A\"\\ 9a");
                out.splice(at..at, std::iter::repeat_n(c, n));
            }
            _ => {
                let word = rng.pick(dictionary).clone();
                out.splice(at..at, word);
            }
        }
    }
}

/// A dictionary entry as text.
fn word(rng: &mut Rng, dictionary: &[Vec<u8>]) -> String {
    let w: &Vec<u8> = rng.pick(dictionary);
    String::from_utf8_lossy(w).into_owned()
}

// ---- JSON ------------------------------------------------------------------------------------

/// One tree mutation of a JSON document (`None` when it is not JSON).
pub fn json(rng: &mut Rng, bytes: &[u8], corpus: &[Vec<u8>], dictionary: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(bytes).ok()?;
    let mut paths = Vec::new();
    collect_paths(&doc, String::new(), &mut paths);
    let path = rng.pick(&paths).clone();
    let donor = random_node(rng, corpus, &doc);
    let node = doc.pointer_mut(&path)?;
    match rng.below(8) {
        0 | 1 => *node = interesting(rng, dictionary),
        2 => {
            if let Value::Object(map) = node {
                let key = word(rng, dictionary);
                map.insert(key, interesting(rng, dictionary));
            } else if let Value::Array(items) = node {
                let at = rng.below(items.len() + 1);
                items.insert(at, interesting(rng, dictionary));
            } else {
                *node = interesting(rng, dictionary);
            }
        }
        3 => *node = retyped(rng, node),
        4 => {
            if let Value::String(s) = node {
                let word = word(rng, dictionary);
                let at = s.char_indices().map(|(i, _)| i).nth(rng.below(s.chars().count() + 1)).unwrap_or(s.len());
                s.insert_str(at, &word);
            } else {
                *node = retyped(rng, node);
            }
        }
        5 => {
            if let Some(donor) = donor {
                *node = donor;
            }
        }
        6 => *node = Value::Array(vec![node.take()]),
        _ => {
            // Remove it from its parent.
            if let Some((parent, last)) = path.rsplit_once('/') {
                let last = last.replace("~1", "/").replace("~0", "~");
                match doc.pointer_mut(parent) {
                    Some(Value::Object(map)) => {
                        map.remove(&last);
                    }
                    Some(Value::Array(items)) => {
                        if let Ok(i) = last.parse::<usize>()
                            && i < items.len()
                        {
                            items.remove(i);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let mut out = match rng.chance(1, 10) {
        true => serde_json::to_vec_pretty(&doc).ok()?,
        false => serde_json::to_vec(&doc).ok()?,
    };
    if rng.chance(1, 8) {
        text_trick(rng, &mut out);
    }
    Some(out)
}

/// What serde_json never writes: a number beyond every type, a key twice.
fn text_trick(rng: &mut Rng, out: &mut Vec<u8>) {
    let spots: Vec<usize> = out.iter().enumerate().filter(|(_, b)| **b == b'{').map(|(i, _)| i + 1).collect();
    match rng.chance(1, 2) {
        true if !spots.is_empty() => {
            // Duplicate the object's first member: `{"a":1,...}` → `{"a":1,"a":1,...}`.
            let at = *rng.pick(&spots);
            if let Some(end) = out[at..].iter().position(|b| *b == b',' || *b == b'}') {
                let member = out[at..at + end].to_vec();
                if !member.is_empty() {
                    let mut dup = member;
                    dup.push(b',');
                    out.splice(at..at, dup);
                }
            }
        }
        _ => {
            let start = rng.below(out.len());
            if let Some(s) = out[start..].iter().position(|b| b.is_ascii_digit()) {
                let s = start + s;
                let e = out[s..].iter().position(|b| !b.is_ascii_digit() && *b != b'.').map_or(out.len(), |e| s + e);
                out.splice(s..e, rng.pick(&NUMBERS).bytes());
            }
        }
    }
}

fn collect_paths(v: &Value, path: String, out: &mut Vec<String>) {
    if out.len() > 4_096 {
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                collect_paths(child, format!("{path}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_paths(child, format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(path);
}

/// A node of another corpus entry that is JSON (or of this document).
fn random_node(rng: &mut Rng, corpus: &[Vec<u8>], doc: &Value) -> Option<Value> {
    let other = &corpus[rng.below(corpus.len())];
    // Token inputs carry a mode byte and two documents: take the claims.
    let text = match other.iter().position(|b| *b == 0xFF) {
        Some(at) => &other[at + 1..],
        None => other.as_slice(),
    };
    let theirs: Value = serde_json::from_slice(text).ok().unwrap_or_else(|| doc.clone());
    let mut paths = Vec::new();
    collect_paths(&theirs, String::new(), &mut paths);
    let path: &String = rng.pick(&paths);
    theirs.pointer(path).cloned()
}

/// The same value as another type: `74` ↔ `"74"`, `true` ↔ `"true"`, a string split into a list.
fn retyped(rng: &mut Rng, v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Bool(b) => Value::String(b.to_string()),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(parsed) if !parsed.is_string() => parsed,
            _ if rng.chance(1, 2) => Value::Array(vec![Value::String(s.clone())]),
            _ => Value::Null,
        },
        Value::Array(items) if !items.is_empty() => items[0].clone(),
        Value::Object(map) => Value::Array(map.values().cloned().collect()),
        _ => Value::Object(serde_json::Map::new()),
    }
}

fn interesting(rng: &mut Rng, dictionary: &[Vec<u8>]) -> Value {
    use serde_json::json;
    match rng.below(14) {
        0 => Value::Null,
        1 => json!(rng.chance(1, 2)),
        2 => json!(*rng.pick(&[0i64, -1, 1, i64::MAX, i64::MIN, 9_007_199_254_740_993, 1_787_166_757])),
        3 => json!(u64::MAX),
        4 => json!(*rng.pick(&[1.5f64, -0.0, 1e300, 1.787166757e9, 0.1])),
        5 => json!(*rng.pick(&["", "0", "-1", "00", " 74", "74 ", "1:2", "a:b", "+1", "74\n", "٧٤"])),
        6 => json!("A".repeat(*rng.pick(&[100, 1_000, 20_000]))),
        7 => json!([]),
        8 => json!({}),
        9 => {
            let depth = *rng.pick(&[2, 16, 120]);
            let mut v = json!(null);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }
        _ => Value::String(word(rng, dictionary)),
    }
}

// ---- lines (YAML, TOML) ----------------------------------------------------------------------

pub fn lines(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], extra: &[&str], dictionary: &[Vec<u8>]) -> Vec<u8> {
    let text = String::from_utf8_lossy(input).into_owned();
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    let n = lines.len();
    match rng.below(9) {
        0 if n > 0 => {
            lines.remove(rng.below(n));
        }
        1 if n > 0 => {
            let i = rng.below(n);
            let line = lines[i].clone();
            lines.insert(rng.below(n + 1), line);
        }
        2 if n > 1 => {
            let (i, j) = (rng.below(n), rng.below(n));
            lines.swap(i, j);
        }
        3 if n > 0 => {
            let i = rng.below(n);
            match rng.chance(1, 2) {
                true => lines[i].insert_str(0, "  "),
                false => lines[i] = lines[i].trim_start().to_string(),
            }
        }
        4 => {
            // A line from another entry (a key another config or policy uses).
            let other = String::from_utf8_lossy(&corpus[rng.below(corpus.len())]).into_owned();
            let theirs: Vec<&str> = other.split_inclusive('\n').collect();
            if !theirs.is_empty() {
                lines.insert(rng.below(n + 1), rng.pick(&theirs).to_string());
            }
        }
        5 if n > 0 => {
            // Replace a value: what follows `: ` or ` = `.
            let i = rng.below(n);
            let line = lines[i].trim_end_matches('\n').to_string();
            let value = match rng.chance(1, 2) {
                true => rng.pick(&NUMBERS).to_string(),
                false => word(rng, dictionary),
            };
            if let Some((key, _)) = line.split_once(" = ").or_else(|| line.split_once(": ")) {
                let sep = if line.contains(" = ") { " = " } else { ": " };
                lines[i] = format!("{key}{sep}{value}\n");
            }
        }
        _ if !extra.is_empty() => {
            let indent = if n > 0 && rng.chance(1, 2) {
                let i = rng.below(n);
                lines[i].len() - lines[i].trim_start().len()
            } else {
                0
            };
            let line = format!("{}{}\n", " ".repeat(indent), rng.pick(extra));
            lines.insert(rng.below(n + 1), line);
        }
        _ => {}
    }
    lines.concat().into_bytes()
}

// ---- journal ---------------------------------------------------------------------------------

const MAGIC: &[u8] = b"EPHJRNL1";

/// The records of a journal file (payloads) and what follows the last whole one.
fn records(bytes: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut out = Vec::new();
    let mut at = MAGIC.len().min(bytes.len());
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        match bytes.get(at + 8..at + 8 + len) {
            Some(payload) if len > 0 => out.push(payload.to_vec()),
            _ => break,
        }
        at += 8 + len;
    }
    (out, bytes[at..].to_vec())
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

pub fn journal(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], dictionary: &[Vec<u8>]) -> Vec<u8> {
    let (mut payloads, mut tail) = records(input);
    let n = payloads.len();
    match rng.below(12) {
        // Most often: one record's payload, checksum fixed up, so it reaches the decoder.
        0..=5 if n > 0 => {
            let i = rng.below(n);
            let p = &mut payloads[i];
            match p.first() {
                Some(b'{') if rng.chance(2, 3) => {
                    if let Some(m) = json(rng, p, corpus, dictionary) {
                        *p = m;
                    }
                }
                _ => havoc(rng, p, corpus, dictionary),
            }
            if p.is_empty() {
                p.push(b'{');
            }
        }
        6 if n > 0 => {
            payloads.remove(rng.below(n));
        }
        7 if n > 0 => {
            let p = payloads[rng.below(n)].clone();
            payloads.insert(rng.below(n + 1), p);
        }
        8 if n > 1 => {
            let (i, j) = (rng.below(n), rng.below(n));
            payloads.swap(i, j);
        }
        9 => {
            // A record of another journal: its dictionary ids mean nothing here.
            let (theirs, _) = records(&corpus[rng.below(corpus.len())]);
            if !theirs.is_empty() {
                payloads.insert(rng.below(n + 1), rng.pick(&theirs).clone());
            }
        }
        10 => {
            tail = match rng.below(3) {
                0 => vec![0; 1 + rng.below(4096)],
                1 => {
                    let mut partial = Vec::new();
                    if let Some(p) = payloads.last() {
                        frame(&mut partial, p);
                        partial.truncate(rng.below(partial.len()));
                    }
                    partial
                }
                _ => Vec::new(),
            };
        }
        _ => {
            // The framing itself: the whole file, lengths and checksums included, unfixed.
            let mut raw = input.to_vec();
            havoc(rng, &mut raw, corpus, dictionary);
            return raw;
        }
    }
    let mut out = MAGIC.to_vec();
    for p in &payloads {
        frame(&mut out, p);
    }
    out.extend_from_slice(&tail);
    out
}

// ---- dictionaries ----------------------------------------------------------------------------

#[rustfmt::skip]
const TOKEN_WORDS: &[&str] = &[
    "alg", "kid", "typ", "jwk", "jku", "x5u", "x5c", "crit", "none", "None", "HS256", "RS256", "RS384", "PS256",
    "ES256", "EdDSA", "rsa-a", "rsa-b", "ed-a", "iss", "aud", "sub", "exp", "iat", "nbf", "jti", "repository",
    "repository_id", "repository_owner_id", "run_id", "run_attempt", "check_run_id", "actor_id", "event_name",
    "ref", "ref_protected", "runner_environment", "project_id", "project_path", "namespace_id", "job_id",
    "pipeline_source", "runner_id", "user_id", "job_project_id", "organization_slug", "organization_id",
    "pipeline_slug", "pipeline_id", "build_number", "workspaceUuid", "repositoryUuid", "stepUuid", "org_id",
    "prj_id", "def_id", "oidc.circleci.com/project-id", "oidc.circleci.com/job-id",
    "oidc.circleci.com/ssh-rerun", "https://token.actions.githubusercontent.com", "https://gitlab.com",
    "https://agent.buildkite.com", "https://ephemera.example.com", "https://spire.example.com",
    "https://jenkins.example.com/job/platform/oidc", "api://AzureADTokenExchange",
    "{0184990a-477b-4fa8-9968-496074483cee}", "0184990a-477b-4fa8-9968-496074483cee", "github:74:1:1:1",
    "refs/heads/main", "self-hosted", "pull_request_target", "1787166757",
];

#[rustfmt::skip]
const JWKS_WORDS: &[&str] = &[
    "keys", "kty", "kid", "use", "alg", "crv", "RSA", "EC", "OKP", "oct", "sig", "enc", "P-256", "P-384",
    "P-521", "Ed25519", "X25519", "secp256k1", "n", "e", "x", "y", "d", "k", "AQAB", "AA", "AQ", "RS256",
    "ES256", "ES384", "EdDSA", "HS256", "PS256", "none", "x5c", "x5t", "key_ops",
];

#[rustfmt::skip]
const WEBHOOK_WORDS: &[&str] = &[
    "action", "completed", "in_progress", "queued", "workflow_job", "id", "run_id", "run_attempt", "repository",
    "object_kind", "build", "pipeline", "build_status", "success", "failed", "canceled", "running",
    "project_id", "build_id", "job", "event", "job.finished", "0184990a-477b-4fa8-9968-496074483cee",
    "0184990A-477B-4FA8-9968-496074483CEE",
];

const WEBHOOK_EVENTS: &[&str] =
    &["workflow_job", "ping", "workflow_run", "push", "job.finished", "job.started", "build.finished", "", "Job Hook"];

#[rustfmt::skip]
const POLICY_WORDS: &[&str] = &[
    "issuer", "match", "deny", "ttl", "default", "max", "grants", "backend", "audience", "claims", "renew",
    "max_lease", "actors", "tools", "data", "glob", "regex", "not", "exists", "contains", "jwt", "aws", "gh",
    "db", "ssh", "github", "gitlab", "buildkite", "circleci", "azure-pipelines", "bitbucket", "jenkins",
    "agents", "role_arn", "session_policy", "policy_arns", "external_id", "session_tags", "owner",
    "repositories", "permissions", "roles", "database", "principals", "force_command", "source_address",
    "extensions", "${repository}", "${ref}", "${sub}", "${a b}", "$${", "5m", "1h", "0s", "-1s",
    "99999999999999999999h", "2h30m", "refs/heads/*", "(a+)+$", "[", "(?i)", "\\p{L}", "&a", "*a", "<<: *a",
    "!!binary", "!!str", "---", "? ", "|", ">-", "{", "[", "~",
];

const POLICY_LINES: &[&str] = &[
    "issuer: github",
    "issuer: gitlab",
    "match:",
    "deny:",
    "  repository_id: \"74\"",
    "  repository_owner_id: [\"65\", 66]",
    "  event_name: [pull_request, pull_request_target]",
    "  ref: {glob: \"refs/heads/*\"}",
    "  ref: {regex: \"(main|release/.*)\"}",
    "  ref: {regex: \"(a+)+$\"}",
    "  environment: {not: {exists: false}}",
    "  groups_direct: {contains: {glob: \"admin*\"}}",
    "  runner_environment: {exists: true}",
    "ttl: {default: 5m, max: 1h}",
    "ttl: {default: 2h, max: 1h}",
    "renew: {max_lease: 2h}",
    "grants:",
    "  api: {backend: jwt, audience: \"https://api.example.com/${repository}\"}",
    "  api: {backend: jwt, audience: x, claims: {repo: \"${repository}\", n: [1, {a: \"${sub}\"}]}}",
    "  cloud: {backend: aws, role_arn: \"arn:aws:iam::123456789012:role/deploy\"}",
    "  code: {backend: gh, owner: \"${repository_owner}\", repositories: [\"${repository}\"], permissions: {contents: write}}",
    "  db: {backend: db, roles: [app_read]}",
    "  shell: {backend: ssh, principals: [\"${sub}\"], extensions: [permit-pty]}",
    "description: |",
    "  a",
    "anchors: &a {x: 1}",
    "more: *a",
    "<<: *a",
    "a: &a [x, x, x, x, x, x, x, x]",
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a]",
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]",
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c]",
    "---",
    "%YAML 1.2",
    "!!python/object:os.system x: 1",
    "? [complex, key]",
    ": value",
    "tools:",
    "  github: {resource: \"https://mcp.example.com/github\", scopes: [repo:read]}",
    "actors:",
    "  reviewer: {issuer: agents, match: {sub: \"spiffe://ci.example/agent/reviewer\"}}",
    "data:",
    "  repo: \"${repository}\"",
];

#[rustfmt::skip]
const CONFIG_WORDS: &[&str] = &[
    "issuers", "name", "platform", "url", "audiences", "algorithms", "max_token_lifetime", "leeway",
    "jwks_file", "jwks_url", "job_key_claims", "identity_claims", "replay_protection", "backends", "type",
    "jwt", "aws", "github-app", "postgres", "ssh", "ledger", "store", "hooks", "limits", "audit", "renew",
    "public_url", "listen", "policies", "data_dir", "github-actions", "gitlab-ci", "buildkite", "generic",
    "jenkins", "HS256", "none", "RS256", "EdDSA", "http://127.0.0.1:1", "http://localhost.evil.example",
    "https://u:p@x.example", "https://x.example/?q#f", "file:///etc/passwd", "0s", "61s", "1y", "-1s",
    "99999999999999999999d", "inf", "nan", "[::1]:0", "0.0.0.0:99999",
];

const CONFIG_LINES: &[&str] = &[
    "[[issuers]]",
    "name = \"ci\"",
    "platform = \"github-actions\"",
    "platform = \"generic\"",
    "url = \"https://token.actions.githubusercontent.com\"",
    "url = \"http://10.0.0.1\"",
    "algorithms = [\"HS256\", \"none\"]",
    "algorithms = []",
    "leeway = \"61s\"",
    "max_token_lifetime = \"99999999999999d\"",
    "job_key_claims = [\"sub\", \"sub\"]",
    "jwks_url = \"https://169.254.169.254/latest\"",
    "[backends.x]",
    "type = \"aws\"",
    "type = \"postgres\"",
    "url = \"postgres://admin:pw@db/app?sslmode=disable\"",
    "region = \"\"",
    "[ledger]",
    "store = \"postgres\"",
    "compact_bytes = 0",
    "[hooks]",
    "github_secret_file = \"/dev/null\"",
    "[limits]",
    "per_address = \"0/s\"",
    "[audit]",
    "file = \"\"",
    "[renew]",
    "max_lease = \"8d\"",
    "listen = \"[::1]:0\"",
    "public_url = \"http://[::1]\"",
    "a.b.c = 1",
    "x = 1979-05-27T07:32:00Z",
    "x = inf",
    "x = 0x7fffffffffffffff",
    "x = '''multi",
    "x = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "x = {a = {b = {c = {d = 1}}}}",
    "[issuers]",
    "[[backends]]",
];

/// Journal bytes: record tags, varints that overflow, u32 lengths, claim value tags.
const JOURNAL_BYTES: &[&[u8]] = &[
    b"\x01",
    b"\x02",
    b"\x03",
    b"\x04",
    b"\x05",
    b"\x06",
    b"\x80",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x80\x80\x80\x80\x00",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x40\x00",
    b"\x00\x00\x00\x00",
    b"EPHJRNL1",
];

const JOURNAL_JSON: &[&str] = &[
    "{\"t\":\"revoked\",\"id\":\"lse_x\",\"at\":1}",
    "{\"t\":\"renewed\",\"id\":\"lse_x\",\"at\":1,\"count\":4294967295,\"credentials\":[]}",
    "{\"t\":\"jti_used\",\"key\":\"k\",\"exp\":-9223372036854775808}",
    "\"t\":\"created\"",
    "\"state\":\"irrevocable\"",
    "\"revocation\":\"deny-policy\"",
];
