//! A minimal DER writer and reader for the few structures a device builds and
//! checks (its CSR, the SubjectPublicKeyInfo inside a certificate). `no_std`, no
//! heap: the writer fills a caller's buffer, the reader borrows from its input.

use core::fmt;

/// DER tags used by the device side.
pub mod tag {
    /// INTEGER
    pub const INTEGER: u8 = 0x02;
    /// BIT STRING
    pub const BIT_STRING: u8 = 0x03;
    /// OBJECT IDENTIFIER
    pub const OID: u8 = 0x06;
    /// UTF8String
    pub const UTF8_STRING: u8 = 0x0c;
    /// SEQUENCE (constructed)
    pub const SEQUENCE: u8 = 0x30;
    /// SET (constructed)
    pub const SET: u8 = 0x31;
    /// `[0]` constructed, context-specific
    pub const CONTEXT_0: u8 = 0xa0;
}

/// A DER structure could not be written or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DerError {
    /// The output buffer is too small.
    BufferTooSmall,
    /// The input ends inside an element.
    Truncated,
    /// A length or tag that DER does not allow, or an unexpected tag.
    Invalid,
}

impl fmt::Display for DerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DerError::BufferTooSmall => "DER output buffer too small",
            DerError::Truncated => "DER input truncated",
            DerError::Invalid => "DER input invalid",
        })
    }
}

impl core::error::Error for DerError {}

/// Writes DER into a slice. Constructed elements take a closure that writes their
/// content; it runs twice (once to measure, once to write), so it must be pure.
#[derive(Debug)]
pub struct Writer<'a> {
    out: Option<&'a mut [u8]>,
    position: usize,
}

impl<'a> Writer<'a> {
    /// A writer that fills `out` from its start.
    pub fn new(out: &'a mut [u8]) -> Self {
        Writer {
            out: Some(out),
            position: 0,
        }
    }

    fn counter() -> Writer<'static> {
        Writer {
            out: None,
            position: 0,
        }
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Writes raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<(), DerError> {
        let end = self.position + bytes.len();
        if let Some(out) = self.out.as_deref_mut() {
            out.get_mut(self.position..end)
                .ok_or(DerError::BufferTooSmall)?
                .copy_from_slice(bytes);
        }
        self.position = end;
        Ok(())
    }

    fn header(&mut self, tag: u8, len: usize) -> Result<(), DerError> {
        let mut header = [tag, 0, 0, 0];
        let used = match len {
            0..=0x7f => {
                header[1] = len as u8;
                2
            }
            0x80..=0xff => {
                header[1] = 0x81;
                header[2] = len as u8;
                3
            }
            0x100..=0xffff => {
                header[1] = 0x82;
                header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            _ => return Err(DerError::Invalid),
        };
        self.raw(&header[..used])
    }

    /// Writes a primitive element.
    pub fn primitive(&mut self, tag: u8, content: &[u8]) -> Result<(), DerError> {
        self.header(tag, content.len())?;
        self.raw(content)
    }

    /// Writes a constructed element whose content `body` writes.
    pub fn constructed(
        &mut self,
        tag: u8,
        body: impl Fn(&mut Writer<'_>) -> Result<(), DerError>,
    ) -> Result<(), DerError> {
        let mut counter = Writer::counter();
        body(&mut counter)?;
        self.header(tag, counter.position)?;
        body(self)
    }

    /// Writes a non-negative INTEGER from big-endian magnitude bytes.
    pub fn unsigned_integer(&mut self, magnitude: &[u8]) -> Result<(), DerError> {
        let start = magnitude
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(magnitude.len().saturating_sub(1));
        let trimmed = magnitude.get(start..).unwrap_or(&[]);
        let pad = trimmed.first().is_none_or(|&b| b & 0x80 != 0);
        self.header(tag::INTEGER, trimmed.len() + usize::from(pad))?;
        if pad {
            self.raw(&[0])?;
        }
        self.raw(trimmed)
    }

    /// Writes a BIT STRING with no unused bits.
    pub fn bit_string(&mut self, bits: &[u8]) -> Result<(), DerError> {
        self.header(tag::BIT_STRING, bits.len() + 1)?;
        self.raw(&[0])?;
        self.raw(bits)
    }
}

/// One element read from DER input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Element<'a> {
    /// The tag byte (only single-byte tags are supported).
    pub tag: u8,
    /// The content octets.
    pub content: &'a [u8],
    /// The whole encoding: header and content.
    pub encoded: &'a [u8],
}

/// Reads consecutive DER elements from a slice.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Reader { rest: input }
    }

    /// Whether all input has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Reads the next element, whatever its tag.
    pub fn any(&mut self) -> Result<Element<'a>, DerError> {
        let input = self.rest;
        let (&tag, after_tag) = input.split_first().ok_or(DerError::Truncated)?;
        if tag & 0x1f == 0x1f {
            return Err(DerError::Invalid); // multi-byte tags never occur here
        }
        let (&first, after_len) = after_tag.split_first().ok_or(DerError::Truncated)?;
        let (len, after_header) = match first {
            0..=0x7f => (usize::from(first), after_len),
            0x81 => {
                let (&b, rest) = after_len.split_first().ok_or(DerError::Truncated)?;
                if b < 0x80 {
                    return Err(DerError::Invalid); // not minimal
                }
                (usize::from(b), rest)
            }
            0x82 => {
                let bytes = after_len.get(..2).ok_or(DerError::Truncated)?;
                let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
                if len < 0x100 {
                    return Err(DerError::Invalid);
                }
                (len, &after_len[2..])
            }
            0x83 => {
                let bytes = after_len.get(..3).ok_or(DerError::Truncated)?;
                let len = (usize::from(bytes[0]) << 16)
                    | (usize::from(bytes[1]) << 8)
                    | usize::from(bytes[2]);
                if len < 0x1_0000 {
                    return Err(DerError::Invalid);
                }
                (len, &after_len[3..])
            }
            _ => return Err(DerError::Invalid),
        };
        let content = after_header.get(..len).ok_or(DerError::Truncated)?;
        let header_len = input.len() - after_header.len();
        self.rest = &after_header[len..];
        Ok(Element {
            tag,
            content,
            encoded: &input[..header_len + len],
        })
    }

    /// Reads the next element and checks its tag.
    pub fn expect(&mut self, tag: u8) -> Result<Element<'a>, DerError> {
        let element = self.any()?;
        if element.tag == tag {
            Ok(element)
        } else {
            Err(DerError::Invalid)
        }
    }
}

/// The SubjectPublicKeyInfo (whole encoding) of an X.509 certificate.
pub fn certificate_spki(certificate: &[u8]) -> Result<&[u8], DerError> {
    let mut outer = Reader::new(certificate);
    let certificate_seq = outer.expect(tag::SEQUENCE)?;
    if !outer.is_empty() {
        return Err(DerError::Invalid);
    }
    let mut fields = Reader::new(certificate_seq.content);
    let tbs = fields.expect(tag::SEQUENCE)?;
    let mut tbs = Reader::new(tbs.content);
    let mut element = tbs.any()?;
    if element.tag == tag::CONTEXT_0 {
        element = tbs.any()?; // version present: next is the serial
    }
    if element.tag != tag::INTEGER {
        return Err(DerError::Invalid);
    }
    tbs.expect(tag::SEQUENCE)?; // signature algorithm
    tbs.expect(tag::SEQUENCE)?; // issuer
    tbs.expect(tag::SEQUENCE)?; // validity
    tbs.expect(tag::SEQUENCE)?; // subject
    Ok(tbs.expect(tag::SEQUENCE)?.encoded)
}

/// What [`certificate_parts`] returns: (TBSCertificate, signatureAlgorithm,
/// signature value).
pub type CertificateParts<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// The three parts of an X.509 certificate a signature check needs: the whole
/// TBSCertificate encoding (the signed bytes), the whole signatureAlgorithm
/// AlgorithmIdentifier encoding, and the signatureValue BIT STRING's content
/// without its unused-bits octet (which must be 0).
pub fn certificate_parts(certificate: &[u8]) -> Result<CertificateParts<'_>, DerError> {
    let mut outer = Reader::new(certificate);
    let certificate_seq = outer.expect(tag::SEQUENCE)?;
    if !outer.is_empty() {
        return Err(DerError::Invalid);
    }
    let mut fields = Reader::new(certificate_seq.content);
    let tbs = fields.expect(tag::SEQUENCE)?;
    let algorithm = fields.expect(tag::SEQUENCE)?;
    let signature = fields.expect(tag::BIT_STRING)?;
    if !fields.is_empty() {
        return Err(DerError::Invalid);
    }
    match signature.content.split_first() {
        Some((0, bits)) => Ok((tbs.encoded, algorithm.encoded, bits)),
        Some(_) => Err(DerError::Invalid),
        None => Err(DerError::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_minimal_and_positive() {
        let mut buf = [0u8; 16];
        for (input, expected) in [
            (&[0x00, 0x00, 0x01][..], &[0x02, 0x01, 0x01][..]),
            (&[0x80][..], &[0x02, 0x02, 0x00, 0x80][..]),
            (&[0x00][..], &[0x02, 0x01, 0x00][..]),
            (&[0x00, 0x7f, 0xff][..], &[0x02, 0x02, 0x7f, 0xff][..]),
        ] {
            let mut w = Writer::new(&mut buf);
            w.unsigned_integer(input).unwrap();
            let n = w.position();
            assert_eq!(&buf[..n], expected);
        }
    }

    #[test]
    fn long_lengths_round_trip() {
        let content = [0x55u8; 300];
        let mut buf = [0u8; 400];
        let mut w = Writer::new(&mut buf);
        w.constructed(tag::SEQUENCE, |w| w.primitive(tag::OID, &content))
            .unwrap();
        let n = w.position();
        assert_eq!(&buf[..4], &[0x30, 0x82, 0x01, 0x30]);
        let mut r = Reader::new(&buf[..n]);
        let seq = r.expect(tag::SEQUENCE).unwrap();
        assert!(r.is_empty());
        let inner = Reader::new(seq.content).expect(tag::OID).unwrap();
        assert_eq!(inner.content, &content[..]);
        assert_eq!(
            Writer::new(&mut [0u8; 10]).primitive(tag::OID, &content),
            Err(DerError::BufferTooSmall)
        );
    }

    #[test]
    fn reader_refuses_bad_lengths() {
        for bad in [
            &[0x30][..],
            &[0x30, 0x05, 0x00],
            &[0x30, 0x81, 0x10],
            &[0x30, 0x82, 0x00, 0x10],
            &[0x30, 0x84, 0, 0, 0, 1],
            &[0x1f, 0x01, 0x00],
        ] {
            assert!(Reader::new(bad).any().is_err(), "{bad:?}");
        }
        assert!(certificate_spki(&[0x30, 0x00]).is_err());
        assert!(certificate_parts(&[0x30, 0x00]).is_err());
    }

    #[test]
    fn certificate_parts_split_the_outer_sequence() {
        // SEQUENCE { SEQUENCE {01}, SEQUENCE {06 00}, BIT STRING {00 aa bb} }
        let certificate = [
            0x30, 0x0c, 0x30, 0x01, 0x01, 0x30, 0x02, 0x06, 0x00, 0x03, 0x03, 0x00, 0xaa, 0xbb,
        ];
        let (tbs, algorithm, signature) = certificate_parts(&certificate).unwrap();
        assert_eq!(tbs, &[0x30, 0x01, 0x01]);
        assert_eq!(algorithm, &[0x30, 0x02, 0x06, 0x00]);
        assert_eq!(signature, &[0xaa, 0xbb]);
        let mut unused_bits = certificate;
        unused_bits[11] = 1;
        assert_eq!(certificate_parts(&unused_bits), Err(DerError::Invalid));
        let mut trailing = [0u8; 16];
        trailing[..14].copy_from_slice(&certificate);
        trailing[1] = 0x0e;
        trailing[14] = 0x05;
        assert_eq!(certificate_parts(&trailing), Err(DerError::Invalid));
    }
}
