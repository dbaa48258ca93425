//! The `no_std` DER reader (`idgate_pki::der`) the device runs on certificates
//! from the gateway. Every element read must re-encode, with the DER writer, to
//! exactly the bytes it was read from; the certificate accessors must return
//! sub-slices of their input that are themselves whole DER elements.
#![no_main]

use idgate_pki::der::{DerError, Reader, Writer, certificate_parts, certificate_spki, tag};
use libfuzzer_sys::fuzz_target;

/// Reads `input` as a sequence of elements, descending into constructed ones.
fn walk(input: &[u8], depth: u32) {
    let mut reader = Reader::new(input);
    let mut consumed = 0;
    while !reader.is_empty() {
        let Ok(element) = reader.any() else {
            return;
        };
        // `encoded` is the header then `content`, where the input had it.
        assert_eq!(
            element.encoded.as_ptr(),
            input[consumed..].as_ptr(),
            "element starts where the last one ended"
        );
        assert!(element.encoded.ends_with(element.content));
        assert_eq!(element.encoded[0], element.tag);
        consumed += element.encoded.len();
        // The writer produces the same (minimal) header.
        let mut out = vec![0u8; element.encoded.len()];
        let mut writer = Writer::new(&mut out);
        match writer.primitive(element.tag, element.content) {
            Ok(()) => {
                assert_eq!(writer.position(), element.encoded.len());
                assert_eq!(out, element.encoded, "DER round trip");
            }
            // The writer stops at 64 KiB of content; the reader reads 3-byte lengths.
            Err(DerError::Invalid) => assert!(element.content.len() > 0xffff),
            Err(e) => panic!("writer: {e:?}"),
        }
        if element.tag & 0x20 != 0 && depth < 16 {
            walk(element.content, depth + 1);
        }
    }
    assert_eq!(consumed, input.len());
}

fn is_within(part: &[u8], whole: &[u8]) -> bool {
    let range = whole.as_ptr_range();
    part.is_empty() || (range.contains(&part.as_ptr()) && part.as_ptr_range().end <= range.end)
}

fn whole_element(bytes: &[u8], tag: u8) {
    let mut r = Reader::new(bytes);
    r.expect(tag).expect("a whole element");
    assert!(r.is_empty());
}

fuzz_target!(|data: &[u8]| {
    walk(data, 0);

    if let Ok(spki) = certificate_spki(data) {
        assert!(is_within(spki, data));
        whole_element(spki, tag::SEQUENCE);
    }
    if let Ok((tbs, algorithm, signature)) = certificate_parts(data) {
        assert!(is_within(tbs, data) && is_within(algorithm, data) && is_within(signature, data));
        whole_element(tbs, tag::SEQUENCE);
        whole_element(algorithm, tag::SEQUENCE);
    }

    // INTEGER writer ↔ reader: the magnitude comes back without leading zeros.
    let mut out = vec![0u8; data.len() + 8];
    let mut writer = Writer::new(&mut out);
    if writer.unsigned_integer(data).is_ok() {
        let n = writer.position();
        let mut r = Reader::new(&out[..n]);
        let integer = r.expect(tag::INTEGER).expect("written INTEGER reads back");
        assert!(r.is_empty());
        let strip = |b: &[u8]| -> Vec<u8> {
            b.iter().copied().skip_while(|&x| x == 0).collect()
        };
        assert_eq!(strip(integer.content), strip(data));
        // Minimal, non-negative.
        assert!(!integer.content.is_empty());
        assert_eq!(integer.content[0] & 0x80, 0);
        if integer.content.len() > 1 {
            assert!(integer.content[0] != 0 || integer.content[1] & 0x80 != 0);
        }
    }
});
