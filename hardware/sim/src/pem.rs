//! PEM output for certificates (RFC 7468: base64 in 64-character lines, LF).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// `certificates` as consecutive `CERTIFICATE` blocks.
pub fn certificates<'a>(certificates: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut out = String::new();
    for der in certificates {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let text = STANDARD.encode(der);
        for line in text.as_bytes().chunks(64) {
            // base64 output is ASCII, so any byte boundary is a char boundary.
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_64_characters() {
        let der = [0xabu8; 100];
        let pem = certificates([&der[..]]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2].len(), 64);
        assert_eq!(lines[3].len(), 136 - 128);
        let mut reader = pem.as_bytes();
        let back: Vec<_> = rustls_pemfile::certs(&mut reader).collect();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref().unwrap().as_ref(), &der[..]);
        assert_eq!(certificates([]), "");
    }
}
