//! The name a client certificate gives its holder: the subject's Common Name, or the first
//! DNS name of its subjectAltName when it has no CN.
//!
//! Invariant: only ever built from a certificate the handshake verified (see the parent
//! module), and a name is a whole CN or DNS name, never a part of one or a lossy decoding:
//! anything this reader does not understand gives no name rather than a wrong one.

use rustls::pki_types::CertificateDer;

/// The verified client certificate's name, in the extensions of every request on that
/// connection; absent when the client presented no certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerCertName(pub String);

/// `id-at-commonName`, 2.5.4.3, as its DER contents.
const COMMON_NAME_OID: &[u8] = &[0x55, 0x04, 0x03];

impl PeerCertName {
    /// The name of `cert`: its subject's first non-empty CN, else its first DNS name.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Option<PeerCertName> {
        let cert = webpki::EndEntityCert::try_from(cert).ok()?;
        common_name(cert.subject())
            .filter(|cn| !cn.is_empty())
            .or_else(|| cert.valid_dns_names().next().map(str::to_string))
            .map(PeerCertName)
    }
}

/// The first CN in a DER `Name`'s contents (a SEQUENCE OF RelativeDistinguishedName, each a
/// SET OF {type OID, value}).
fn common_name(name: &[u8]) -> Option<String> {
    let mut rdns = name;
    while !rdns.is_empty() {
        let (set, rest) = tlv(rdns, 0x31)?;
        rdns = rest;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (attribute, rest) = tlv(attributes, 0x30)?;
            attributes = rest;
            let (oid, value) = tlv(attribute, 0x06)?;
            if oid == COMMON_NAME_OID {
                return directory_string(value);
            }
        }
    }
    None
}

/// A `DirectoryString` as text, for the string types certificates use.
fn directory_string(der: &[u8]) -> Option<String> {
    let (&tag, _) = der.split_first()?;
    let (text, _) = tlv(der, tag)?;
    match tag {
        // UTF8String, PrintableString, IA5String
        0x0c | 0x13 | 0x16 => String::from_utf8(text.to_vec()).ok(),
        // BMPString: UCS-2, big-endian
        0x1e if text.len() % 2 == 0 => {
            let units: Vec<u16> = text
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// One DER element with tag `tag` at the start of `input`: its contents and what follows.
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (first as usize, rest),
        // Long form, at most four length bytes: a certificate is far smaller than 4 GiB.
        0x81..=0x84 => {
            let n = (first & 0x7f) as usize;
            if rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |l, &b| (l << 8) | b as usize);
            (len, &rest[n..])
        }
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert(cn: Option<&str>, dns: &[&str]) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(DnType::OrganizationName, "staged tests");
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn name(c: &CertificateDer<'_>) -> Option<String> {
        PeerCertName::of_certificate(c).map(|n| n.0)
    }

    #[test]
    fn the_common_name_comes_first() {
        let c = cert(Some("asvo-prod"), &["asvo.example.org"]);
        assert_eq!(name(&c).as_deref(), Some("asvo-prod"));
    }

    #[test]
    fn without_a_common_name_the_first_dns_name() {
        let c = cert(None, &["a.example.org", "b.example.org"]);
        assert_eq!(name(&c).as_deref(), Some("a.example.org"));
    }

    #[test]
    fn a_certificate_with_neither_has_no_name() {
        assert_eq!(name(&cert(None, &["127.0.0.1"])), None);
        assert_eq!(name(&CertificateDer::from(vec![0x30, 0x03, 0x02])), None);
    }

    #[test]
    fn der_strings_and_lengths() {
        // UTF8String "é", BMPString "ab", a T61String (not understood: no name).
        assert_eq!(
            directory_string(&[0x0c, 2, 0xc3, 0xa9]).as_deref(),
            Some("é")
        );
        assert_eq!(
            directory_string(&[0x1e, 4, 0, b'a', 0, b'b']).as_deref(),
            Some("ab")
        );
        assert_eq!(directory_string(&[0x14, 1, b'x']), None);
        // A long-form length, and one running past the end.
        let mut long = vec![0x04, 0x81, 200];
        long.extend([7u8; 200]);
        assert_eq!(
            tlv(&long, 0x04).map(|(v, r)| (v.len(), r.len())),
            Some((200, 0))
        );
        assert_eq!(tlv(&[0x04, 0x05, 1, 2], 0x04), None);
        assert_eq!(tlv(&[0x04, 0x80], 0x04), None);
    }
}
