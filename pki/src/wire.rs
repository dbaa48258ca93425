//! The gateway's side of the codec: decoding requests and encoding replies in
//! both formats. CBOR goes through the same `no_std` code as the device
//! ([`crate::protocol`]); JSON carries the same fields, with byte fields as
//! padded base64 (RFC 4648 §4).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

use crate::protocol::{
    DecodeError, EnrollRequest, Format, Issued, MAX_PAYLOAD, Rejected, RenewRequest, check_rid,
};

/// A decoded `enroll` request, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollRequestBuf {
    /// Request id.
    pub rid: String,
    /// CSR, DER.
    pub csr: Vec<u8>,
    /// Enrollment proof.
    pub proof: Vec<u8>,
}

impl EnrollRequestBuf {
    fn borrowed(&self) -> EnrollRequest<'_> {
        EnrollRequest {
            rid: &self.rid,
            csr: &self.csr,
            proof: &self.proof,
        }
    }
}

/// A request that could not be decoded, with the `rid` if one could be read, so
/// that the rejection reaches the device's pending request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undecodable {
    /// The request id, if the payload carried a valid one.
    pub rid: Option<String>,
    /// What is wrong.
    pub error: DecodeError,
}

/// Decodes and checks an `enroll` request.
pub fn decode_enroll(format: Format, payload: &[u8]) -> Result<EnrollRequestBuf, Undecodable> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Undecodable {
            rid: None,
            error: DecodeError::TooLarge,
        });
    }
    let request = match format {
        Format::Cbor => {
            let request = EnrollRequest::decode_cbor_unchecked(payload)
                .map_err(|error| Undecodable { rid: None, error })?;
            EnrollRequestBuf {
                rid: request.rid.to_owned(),
                csr: request.csr.to_vec(),
                proof: request.proof.to_vec(),
            }
        }
        Format::Json => decode_enroll_json(payload)?,
    };
    request.borrowed().check().map_err(|error| Undecodable {
        rid: check_rid(&request.rid).is_ok().then(|| request.rid.clone()),
        error,
    })?;
    Ok(request)
}

fn decode_enroll_json(payload: &[u8]) -> Result<EnrollRequestBuf, Undecodable> {
    let syntax = |error| Undecodable { rid: None, error };
    let value: Value = serde_json::from_slice(payload).map_err(|_| syntax(DecodeError::Syntax))?;
    let Value::Object(object) = value else {
        return Err(syntax(DecodeError::Syntax));
    };
    let rid = match object.get("rid") {
        None => return Err(syntax(DecodeError::Missing("rid"))),
        Some(Value::String(rid)) => rid.clone(),
        Some(_) => return Err(syntax(DecodeError::Invalid("rid"))),
    };
    let with_rid = |error| Undecodable {
        rid: crate::protocol::check_rid(&rid)
            .is_ok()
            .then(|| rid.clone()),
        error,
    };
    let csr = json_bytes(&object, "csr").map_err(with_rid)?;
    let proof = json_bytes(&object, "proof").map_err(with_rid)?;
    Ok(EnrollRequestBuf { rid, csr, proof })
}

fn json_bytes(object: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, DecodeError> {
    match object.get(name) {
        None => Err(DecodeError::Missing(name)),
        Some(Value::String(text)) => BASE64
            .decode(text.as_bytes())
            .map_err(|_| DecodeError::Invalid(name)),
        Some(_) => Err(DecodeError::Invalid(name)),
    }
}

/// A decoded `renew` request, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenewRequestBuf {
    /// Request id.
    pub rid: String,
    /// CSR for the new key, DER.
    pub csr: Vec<u8>,
    /// Serial of the current certificate, lowercase hex.
    pub serial: String,
    /// Monotonic counter.
    pub counter: u64,
    /// Signature by the current key over the renewal message.
    pub sig: Vec<u8>,
}

impl RenewRequestBuf {
    /// The borrowed form.
    pub fn borrowed(&self) -> RenewRequest<'_> {
        RenewRequest {
            rid: &self.rid,
            csr: &self.csr,
            serial: &self.serial,
            counter: self.counter,
            sig: &self.sig,
        }
    }
}

/// Decodes and checks a `renew` request.
pub fn decode_renew(format: Format, payload: &[u8]) -> Result<RenewRequestBuf, Undecodable> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Undecodable {
            rid: None,
            error: DecodeError::TooLarge,
        });
    }
    let syntax = |error| Undecodable { rid: None, error };
    let request = match format {
        Format::Cbor => {
            let r = RenewRequest::decode_cbor_unchecked(payload).map_err(syntax)?;
            RenewRequestBuf {
                rid: r.rid.to_owned(),
                csr: r.csr.to_vec(),
                serial: r.serial.to_owned(),
                counter: r.counter,
                sig: r.sig.to_vec(),
            }
        }
        Format::Json => {
            let value: Value =
                serde_json::from_slice(payload).map_err(|_| syntax(DecodeError::Syntax))?;
            let Value::Object(object) = value else {
                return Err(syntax(DecodeError::Syntax));
            };
            let rid = match object.get("rid") {
                None => return Err(syntax(DecodeError::Missing("rid"))),
                Some(Value::String(rid)) => rid.clone(),
                Some(_) => return Err(syntax(DecodeError::Invalid("rid"))),
            };
            let with_rid = |error| Undecodable {
                rid: check_rid(&rid).is_ok().then(|| rid.clone()),
                error,
            };
            let serial = match object.get("serial") {
                None => return Err(with_rid(DecodeError::Missing("serial"))),
                Some(Value::String(serial)) => serial.clone(),
                Some(_) => return Err(with_rid(DecodeError::Invalid("serial"))),
            };
            let counter = match object.get("counter") {
                None => return Err(with_rid(DecodeError::Missing("counter"))),
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| with_rid(DecodeError::Invalid("counter")))?,
            };
            RenewRequestBuf {
                csr: json_bytes(&object, "csr").map_err(with_rid)?,
                sig: json_bytes(&object, "sig").map_err(with_rid)?,
                rid,
                serial,
                counter,
            }
        }
    };
    request.borrowed().check().map_err(|error| Undecodable {
        rid: check_rid(&request.rid).is_ok().then(|| request.rid.clone()),
        error,
    })?;
    Ok(request)
}

/// Encodes a renew request (used by tests and simulated clients).
pub fn encode_renew(format: Format, request: &RenewRequest<'_>) -> Vec<u8> {
    match format {
        Format::Cbor => encode_cbor_growing(|buf| request.encode_cbor(buf)),
        Format::Json => json!({
            "rid": request.rid,
            "csr": BASE64.encode(request.csr),
            "serial": request.serial,
            "counter": request.counter,
            "sig": BASE64.encode(request.sig),
        })
        .to_string()
        .into_bytes(),
    }
}

/// Encodes an enroll request (used by tests and simulated clients).
pub fn encode_enroll(format: Format, request: &EnrollRequest<'_>) -> Vec<u8> {
    match format {
        Format::Cbor => encode_cbor_growing(|buf| request.encode_cbor(buf)),
        Format::Json => json!({
            "rid": request.rid,
            "csr": BASE64.encode(request.csr),
            "proof": BASE64.encode(request.proof),
        })
        .to_string()
        .into_bytes(),
    }
}

/// Encodes an accepted reply.
pub fn encode_issued(format: Format, issued: &Issued<'_>) -> Vec<u8> {
    match format {
        Format::Cbor => encode_cbor_growing(|buf| issued.encode_cbor(buf)),
        Format::Json => json!({
            "rid": issued.rid,
            "certificate": BASE64.encode(issued.certificate),
            "chain": issued.chain.iter().map(|c| BASE64.encode(c)).collect::<Vec<_>>(),
            "serial": issued.serial,
            "not_before": issued.not_before,
            "not_after": issued.not_after,
            "time": issued.time,
            "renew_after": issued.renew_after,
            "renew_before": issued.renew_before,
        })
        .to_string()
        .into_bytes(),
    }
}

/// Encodes a rejection.
pub fn encode_rejected(format: Format, rejected: &Rejected<'_>) -> Vec<u8> {
    match format {
        Format::Cbor => encode_cbor_growing(|buf| rejected.encode_cbor(buf)),
        Format::Json => json!({
            "rid": rejected.rid,
            "code": rejected.code,
            "message": rejected.message,
        })
        .to_string()
        .into_bytes(),
    }
}

/// Runs a slice encoder with a buffer that grows until the message fits.
fn encode_cbor_growing(
    encode: impl Fn(&mut [u8]) -> Result<usize, crate::protocol::EncodeError>,
) -> Vec<u8> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0u8; size];
        if let Ok(n) = encode(&mut buf) {
            buf.truncate(n);
            return buf;
        }
        size *= 2;
    }
}

/// A decoded accepted reply, owned (for host-side clients and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedBuf {
    /// Request id.
    pub rid: String,
    /// Device certificate, DER.
    pub certificate: Vec<u8>,
    /// Chain, DER, issuer first.
    pub chain: Vec<Vec<u8>>,
    /// Serial, hex.
    pub serial: String,
    /// Validity start.
    pub not_before: u64,
    /// Validity end.
    pub not_after: u64,
    /// Gateway clock.
    pub time: u64,
    /// Renewal window start.
    pub renew_after: u64,
    /// Renewal window end.
    pub renew_before: u64,
}

/// Decodes an accepted reply in either format.
pub fn decode_issued(format: Format, payload: &[u8]) -> Result<IssuedBuf, DecodeError> {
    match format {
        Format::Cbor => {
            let issued = Issued::decode_cbor(payload)?;
            Ok(IssuedBuf {
                rid: issued.rid.to_owned(),
                certificate: issued.certificate.to_vec(),
                chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
                serial: issued.serial.to_owned(),
                not_before: issued.not_before,
                not_after: issued.not_after,
                time: issued.time,
                renew_after: issued.renew_after,
                renew_before: issued.renew_before,
            })
        }
        Format::Json => {
            let value: Value = serde_json::from_slice(payload).map_err(|_| DecodeError::Syntax)?;
            let Value::Object(object) = value else {
                return Err(DecodeError::Syntax);
            };
            let text = |name: &'static str| match object.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(DecodeError::Invalid(name)),
                None => Err(DecodeError::Missing(name)),
            };
            let number = |name: &'static str| match object.get(name) {
                Some(v) => v.as_u64().ok_or(DecodeError::Invalid(name)),
                None => Err(DecodeError::Missing(name)),
            };
            let chain = match object.get("chain") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .and_then(|s| BASE64.decode(s).ok())
                            .ok_or(DecodeError::Invalid("chain"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Some(_) => return Err(DecodeError::Invalid("chain")),
                None => return Err(DecodeError::Missing("chain")),
            };
            Ok(IssuedBuf {
                rid: text("rid")?,
                certificate: json_bytes(&object, "certificate")?,
                chain,
                serial: text("serial")?,
                not_before: number("not_before")?,
                not_after: number("not_after")?,
                time: number("time")?,
                renew_after: number("renew_after")?,
                renew_before: number("renew_before")?,
            })
        }
    }
}

/// A decoded rejection, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedBuf {
    /// Request id (empty if the request carried none).
    pub rid: String,
    /// The code.
    pub code: String,
    /// The human explanation.
    pub message: String,
}

/// Decodes a rejection in either format.
pub fn decode_rejected(format: Format, payload: &[u8]) -> Result<RejectedBuf, DecodeError> {
    match format {
        Format::Cbor => {
            let r = Rejected::decode_cbor(payload)?;
            Ok(RejectedBuf {
                rid: r.rid.to_owned(),
                code: r.code.to_owned(),
                message: r.message.to_owned(),
            })
        }
        Format::Json => {
            let value: Value = serde_json::from_slice(payload).map_err(|_| DecodeError::Syntax)?;
            let field = |name: &'static str| {
                value
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or(DecodeError::Missing(name))
            };
            Ok(RejectedBuf {
                rid: field("rid").unwrap_or_default(),
                code: field("code")?,
                message: field("message").unwrap_or_default(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> (String, Vec<u8>, Vec<u8>) {
        ("r-1".into(), vec![0x30, 1, 2], vec![5u8; 32])
    }

    #[test]
    fn both_formats_round_trip_the_same_request() {
        let (rid, csr, proof) = request();
        let borrowed = EnrollRequest {
            rid: &rid,
            csr: &csr,
            proof: &proof,
        };
        for format in [Format::Json, Format::Cbor] {
            let payload = encode_enroll(format, &borrowed);
            let decoded = decode_enroll(format, &payload).unwrap();
            assert_eq!(decoded.borrowed(), borrowed);
        }
        let json = String::from_utf8(encode_enroll(Format::Json, &borrowed)).unwrap();
        assert!(json.contains(r#""csr":"MAEC""#), "{json}");
    }

    #[test]
    fn json_errors_name_the_field_and_keep_the_rid() {
        let cases: [(&[u8], Option<&str>, DecodeError); 7] = [
            (b"not json", None, DecodeError::Syntax),
            (b"[1,2]", None, DecodeError::Syntax),
            (
                br#"{"csr":"AA==","proof":"AA=="}"#,
                None,
                DecodeError::Missing("rid"),
            ),
            (br#"{"rid":5}"#, None, DecodeError::Invalid("rid")),
            (
                br#"{"rid":"r","csr":"@@@","proof":"AA=="}"#,
                Some("r"),
                DecodeError::Invalid("csr"),
            ),
            (
                br#"{"rid":"r","csr":"MAEC"}"#,
                Some("r"),
                DecodeError::Missing("proof"),
            ),
            (
                br#"{"rid":"r","csr":"MAEC","proof":"AA=="}"#,
                Some("r"),
                DecodeError::Invalid("proof"),
            ),
        ];
        for (payload, rid, error) in cases {
            let got = decode_enroll(Format::Json, payload).unwrap_err();
            assert_eq!(got.error, error, "{}", String::from_utf8_lossy(payload));
            assert_eq!(got.rid.as_deref(), rid);
        }
        let bad_rid =
            br#"{"rid":"a/b","csr":"MAEC","proof":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#;
        let got = decode_enroll(Format::Json, bad_rid).unwrap_err();
        assert_eq!((got.rid, got.error), (None, DecodeError::Invalid("rid")));
    }

    #[test]
    fn oversized_payloads_are_refused_before_parsing() {
        let big = vec![b' '; MAX_PAYLOAD + 1];
        for format in [Format::Json, Format::Cbor] {
            assert_eq!(
                decode_enroll(format, &big).unwrap_err().error,
                DecodeError::TooLarge
            );
        }
    }

    #[test]
    fn renew_requests_round_trip_in_both_formats() {
        let sig = [4u8; 64];
        let request = RenewRequest {
            rid: "r9",
            csr: &[0x30, 0x00],
            serial: "4abc",
            counter: 12,
            sig: &sig,
        };
        for format in [Format::Json, Format::Cbor] {
            let decoded = decode_renew(format, &encode_renew(format, &request)).unwrap();
            assert_eq!(decoded.borrowed(), request);
        }
        let bad = br#"{"rid":"r","csr":"MAA=","serial":"4abc","counter":-1,"sig":"AA=="}"#;
        let got = decode_renew(Format::Json, bad).unwrap_err();
        assert_eq!(
            (got.rid.as_deref(), got.error),
            (Some("r"), DecodeError::Invalid("counter"))
        );
        let short_sig = br#"{"rid":"r","csr":"MAA=","serial":"4abc","counter":1,"sig":"AA=="}"#;
        assert_eq!(
            decode_renew(Format::Json, short_sig).unwrap_err().error,
            DecodeError::Invalid("sig")
        );
    }

    #[test]
    fn replies_round_trip_in_both_formats() {
        let chain_cert = vec![3u8; 40];
        let mut chain = heapless::Vec::new();
        chain.push(chain_cert.as_slice()).unwrap();
        let issued = Issued {
            rid: "r",
            certificate: &[1, 2, 3],
            chain,
            serial: "4f",
            not_before: 10,
            not_after: 20,
            time: 11,
            renew_after: 15,
            renew_before: 19,
        };
        let rejected = Rejected {
            rid: "r",
            code: "bad_proof",
            message: "proof does not match",
        };
        for format in [Format::Json, Format::Cbor] {
            let back = decode_issued(format, &encode_issued(format, &issued)).unwrap();
            assert_eq!(back.certificate, vec![1, 2, 3]);
            assert_eq!(back.chain, vec![chain_cert.clone()]);
            assert_eq!((back.not_before, back.renew_before), (10, 19));
            let back = decode_rejected(format, &encode_rejected(format, &rejected)).unwrap();
            assert_eq!(back.code, "bad_proof");
        }
    }
}
