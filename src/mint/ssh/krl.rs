//! Key revocation lists (PROTOCOL.krl), the file sshd's `RevokedKeys` reads: which certificate
//! serials each CA has revoked. The broker keeps the serials of ended leases whose certificates
//! have not expired yet ([`Revoked`]) and encodes them on request ([`encode`]).

use crate::clock::UnixSeconds;
use crate::ssh_format::wire::Writer;
use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// `"SSHKRL\n\0"`.
const MAGIC: &[u8; 8] = b"SSHKRL\n\0";
const FORMAT_VERSION: u32 = 1;
/// A section revoking certificates of one CA.
const SECTION_CERTIFICATES: u8 = 1;
/// Inside it: a list of `uint64` serials.
const CERT_SERIAL_LIST: u8 = 0x20;

/// Revoked serials, each with the end of its certificate's validity: past that, sshd refuses the
/// certificate anyway, and it leaves the list.
#[derive(Debug, Default)]
pub struct Revoked {
    serials: Mutex<BTreeMap<u64, UnixSeconds>>,
}

impl Revoked {
    /// Records a revoked serial (again is harmless); one already expired is not kept.
    pub fn add(&self, serial: u64, valid_before: UnixSeconds, now: UnixSeconds) {
        if valid_before > now {
            self.serials.lock().unwrap_or_else(PoisonError::into_inner).insert(serial, valid_before);
        }
    }

    /// The serials whose certificates have not expired at `now`, ascending; the expired ones are
    /// forgotten.
    pub fn live(&self, now: UnixSeconds) -> Vec<u64> {
        let mut serials = self.serials.lock().unwrap_or_else(PoisonError::into_inner);
        serials.retain(|_, valid_before| *valid_before > now);
        serials.keys().copied().collect()
    }
}

/// A KRL: the header (`krl_version` and `generated_date` both `now`, which only grows), then one
/// certificates section per CA listing its serials. A CA with no serial gets no section.
pub fn encode(cas: &[(&[u8], Vec<u64>)], now: UnixSeconds, comment: &str) -> Vec<u8> {
    let now = u64::try_from(now).unwrap_or(0);
    let mut w = Writer::new();
    w.raw(MAGIC).u32(FORMAT_VERSION).u64(now).u64(now).u64(0).string("").string(comment);
    for (ca, serials) in cas.iter().filter(|(_, s)| !s.is_empty()) {
        let mut list = Writer::new();
        for serial in serials {
            list.u64(*serial);
        }
        let mut section = Writer::new();
        section.string(ca).string("").u8(CERT_SERIAL_LIST).string(list.bytes());
        w.u8(SECTION_CERTIFICATES).string(section.bytes());
    }
    w.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh_format::wire::Reader;

    #[test]
    fn serials_stay_until_their_certificate_expires() {
        let revoked = Revoked::default();
        revoked.add(7, 200, 100);
        revoked.add(3, 150, 100);
        revoked.add(9, 100, 100); // expires now: never listed
        revoked.add(7, 200, 101); // again: harmless
        assert_eq!(revoked.live(100), [3, 7]);
        assert_eq!(revoked.live(150), [7]);
        assert!(revoked.live(200).is_empty());
    }

    #[test]
    fn a_krl_has_the_header_and_one_serial_list_per_ca_as_protocol_krl_says() {
        let krl =
            encode(&[(b"ca-one", vec![1, u64::MAX]), (b"ca-two", vec![]), (b"ca-three", vec![42])], 1_796_000_000, "c");
        let mut r = Reader::new(&krl);
        assert_eq!(r.raw(8).unwrap(), MAGIC);
        assert_eq!(r.u32().unwrap(), 1);
        assert_eq!((r.u64().unwrap(), r.u64().unwrap(), r.u64().unwrap()), (1_796_000_000, 1_796_000_000, 0));
        assert!(r.string().unwrap().is_empty(), "reserved");
        assert_eq!(r.text().unwrap(), "c");
        let mut sections = Vec::new();
        while !r.is_empty() {
            assert_eq!(r.u8().unwrap(), SECTION_CERTIFICATES);
            let mut section = Reader::new(r.string().unwrap());
            let ca = section.text().unwrap().to_string();
            assert!(section.string().unwrap().is_empty(), "reserved");
            assert_eq!(section.u8().unwrap(), CERT_SERIAL_LIST);
            let mut list = Reader::new(section.string().unwrap());
            assert!(section.finish().is_ok());
            let mut serials = Vec::new();
            while !list.is_empty() {
                serials.push(list.u64().unwrap());
            }
            sections.push((ca, serials));
        }
        assert_eq!(sections, [("ca-one".to_string(), vec![1, u64::MAX]), ("ca-three".to_string(), vec![42])]);
        assert_eq!(encode(&[(b"ca", vec![])], 5, "").len(), 8 + 4 + 24 + 4 + 4, "header only");
    }
}
