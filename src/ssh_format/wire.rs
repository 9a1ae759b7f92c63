//! SSH's wire encoding (RFC 4251 §5), the one every OpenSSH format here is made of: public keys,
//! certificates (PROTOCOL.certkeys), private keys (PROTOCOL.key) and KRLs (PROTOCOL.krl).
//! [`Writer`] builds, [`Reader`] takes apart; neither allocates more than its input.

/// Bytes that are not what the format says: cut short, a length past the end, bytes left over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("truncated or malformed SSH wire data")
    }
}

/// Appends SSH wire values to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    pub fn u8(&mut self, value: u8) -> &mut Writer {
        self.buf.push(value);
        self
    }

    pub fn u32(&mut self, value: u32) -> &mut Writer {
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Writer {
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// `string`: a `uint32` length, then the bytes.
    pub fn string(&mut self, bytes: impl AsRef<[u8]>) -> &mut Writer {
        let bytes = bytes.as_ref();
        // Everything written here is bounded far below 4 GiB (keys, names, a KRL of live
        // certificates); a longer value would saturate rather than wrap.
        self.u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(bytes);
        self
    }

    /// `mpint` of a non-negative number given as unsigned big-endian bytes: leading zeros
    /// dropped, and one zero byte put back when the top bit is set (else it would read as
    /// negative). Zero is the empty string.
    pub fn mpint(&mut self, magnitude: &[u8]) -> &mut Writer {
        let first = magnitude.iter().position(|b| *b != 0).unwrap_or(magnitude.len());
        let digits = &magnitude[first..];
        if digits.first().is_some_and(|b| b & 0x80 != 0) {
            self.u32(u32::try_from(digits.len() + 1).unwrap_or(u32::MAX));
            self.buf.push(0);
            self.buf.extend_from_slice(digits);
            self
        } else {
            self.string(digits)
        }
    }

    /// Bytes as they are, without a length.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Writer {
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads SSH wire values from the front of a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    /// The next `n` bytes, as they are.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.rest.len() {
            return Err(Malformed);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.raw(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let mut out = [0u8; 4];
        out.copy_from_slice(self.raw(4)?);
        Ok(u32::from_be_bytes(out))
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        let mut out = [0u8; 8];
        out.copy_from_slice(self.raw(8)?);
        Ok(u64::from_be_bytes(out))
    }

    /// A `string`'s bytes. Its length is checked against what is left before anything is taken,
    /// so a hostile length cannot make a reader allocate or read past the end.
    pub fn string(&mut self) -> Result<&'a [u8], Malformed> {
        let len = usize::try_from(self.u32()?).map_err(|_| Malformed)?;
        self.raw(len)
    }

    /// A `string` that must be UTF-8 text.
    pub fn text(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.string()?).map_err(|_| Malformed)
    }

    /// A non-negative `mpint`'s magnitude, big-endian, without the sign byte. A negative or
    /// non-minimal encoding is malformed (OpenSSH refuses both too).
    pub fn mpint(&mut self) -> Result<&'a [u8], Malformed> {
        let bytes = self.string()?;
        match bytes {
            [] => Ok(bytes),
            [first, ..] if first & 0x80 != 0 => Err(Malformed),
            [0, second, ..] if second & 0x80 != 0 => Ok(&bytes[1..]),
            [0, ..] => Err(Malformed),
            _ => Ok(bytes),
        }
    }

    /// What has not been read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Nothing may be left over.
    pub fn finish(self) -> Result<(), Malformed> {
        if self.rest.is_empty() { Ok(()) } else { Err(Malformed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_written_as_rfc_4251_says() {
        let mut w = Writer::new();
        w.u8(7).u32(0x0102_0304).u64(42).string("ssh").string(b"");
        assert_eq!(
            w.bytes(),
            [&[7u8, 1, 2, 3, 4][..], &[0, 0, 0, 0, 0, 0, 0, 42], &[0, 0, 0, 3], b"ssh", &[0, 0, 0, 0]].concat()
        );
    }

    #[test]
    fn mpints_are_minimal_and_never_read_as_negative() {
        // RFC 4251 §5's own examples: 0, 0x9a378f9b2e332a7, 0x80, -1234 (refused), -0xdeadbeef.
        let cases: [(&[u8], &[u8]); 5] = [
            (&[], &[0, 0, 0, 0]),
            (&[0, 0], &[0, 0, 0, 0]),
            (
                &[0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7],
                &[0, 0, 0, 8, 0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7],
            ),
            (&[0x80], &[0, 0, 0, 2, 0x00, 0x80]),
            (&[0, 0, 0x7f], &[0, 0, 0, 1, 0x7f]),
        ];
        for (magnitude, wire) in cases {
            let mut w = Writer::new();
            w.mpint(magnitude);
            assert_eq!(w.bytes(), wire, "{magnitude:x?}");
            let mut r = Reader::new(wire);
            let read = r.mpint().unwrap();
            let trimmed: Vec<u8> = magnitude.iter().copied().skip_while(|b| *b == 0).collect();
            assert_eq!(read, trimmed.as_slice());
        }
        for refused in [&[0, 0, 0, 1, 0x80][..], &[0, 0, 0, 2, 0x00, 0x7f], &[0, 0, 0, 1, 0x00]] {
            assert_eq!(Reader::new(refused).mpint(), Err(Malformed), "{refused:x?}");
        }
    }

    #[test]
    fn a_reader_refuses_lengths_past_the_end_and_leftovers() {
        let mut r = Reader::new(&[0, 0, 0, 5, b'a', b'b']);
        assert_eq!(r.string(), Err(Malformed), "a length longer than what is left");
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.string(), Err(Malformed), "4 GiB claimed, nothing there");
        let mut r = Reader::new(&[0, 0, 0, 1, b'a', 9]);
        assert_eq!(r.text(), Ok("a"));
        assert_eq!(r.clone().finish(), Err(Malformed), "a byte left over");
        assert_eq!(r.u8(), Ok(9));
        assert!(r.is_empty() && r.finish().is_ok());
        assert_eq!(Reader::new(&[0, 0, 0, 1, 0xff]).text(), Err(Malformed), "not UTF-8");
        assert_eq!(Reader::new(&[1, 2, 3]).u32(), Err(Malformed));
    }
}
