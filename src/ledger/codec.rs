//! The byte-level pieces both binary ledger formats are built from — the journal's lease
//! records ([`super::journal`]) and claim snapshots ([`super::snapshot`]): LEB128 varints,
//! zigzag integers, length-prefixed strings and bytes. Readers take `&mut &[u8]`, advance it, and
//! answer `None` for input that is cut short or malformed, never a misread value.

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_varint(out, zigzag(v));
}

pub fn get_i64(input: &mut &[u8]) -> Option<i64> {
    get_varint(input).map(unzigzag)
}

pub fn get_u8(input: &mut &[u8]) -> Option<u8> {
    let (&b, rest) = input.split_first()?;
    *input = rest;
    Some(b)
}

pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub fn get_bytes<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(get_varint(input)?).ok()?;
    if input.len() < len {
        return None;
    }
    let (bytes, rest) = input.split_at(len);
    *input = rest;
    Some(bytes)
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

pub fn get_str<'a>(input: &mut &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(get_bytes(input)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_cut_input_reads_as_none() {
        let mut out = Vec::new();
        for v in [0i64, 1, -1, 63, -64, 300, i64::MAX, i64::MIN] {
            put_i64(&mut out, v);
        }
        put_str(&mut out, "ünï");
        let mut input = out.as_slice();
        for v in [0i64, 1, -1, 63, -64, 300, i64::MAX, i64::MIN] {
            assert_eq!(get_i64(&mut input), Some(v));
        }
        assert_eq!(get_str(&mut input), Some("ünï"));
        assert!(input.is_empty());
        let mut short: &[u8] = &[0x05, b'a', b'b'];
        assert_eq!(get_str(&mut short), None, "a length past the end");
        let mut endless: &[u8] = &[0xff; 11];
        assert_eq!(get_varint(&mut endless), None, "more than 64 bits");
    }
}
