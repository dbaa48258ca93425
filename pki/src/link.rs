//! The line link: the framed byte protocol between a line station (the factory
//! fixture) and a device on its serial port.
//!
//! A frame on the byte stream is its body, COBS-encoded (so it contains no zero
//! byte), followed by one `0x00` delimiter. A receiver that joins mid-stream,
//! or sees noise, loses at most the frame in progress and resynchronises on the
//! next delimiter. The body is
//!
//! ```text
//! version (1) | kind (1) | fields… | CRC-32/IEEE of everything before it (4, big-endian)
//! ```
//!
//! where a field is a single byte (an enumeration) or a byte string prefixed by
//! its length as a big-endian `u16`. `docs/protocol.md` ("Line link") is the
//! normative description. Everything here is `no_std`, allocation-free and
//! panic-free on any input: the firmware decodes with the same code as the
//! station.

use core::fmt;

use crate::protocol::{self, Format, Op, Reply};

/// The link version carried in every body.
pub const VERSION: u8 = 1;

/// The largest body (version, kind, fields and CRC) either side sends or
/// accepts. A real enrollment reply (P-256 certificate, one-CA chain) is a
/// 1,151-byte body in CBOR and 1,531 in JSON (measured by the `line` end-to-end
/// test); 4 KiB leaves room for a longer chain while fitting a small MCU's RAM.
pub const MAX_BODY: usize = 4096;

/// The largest wire frame (COBS overhead and delimiter included) for a body of
/// [`MAX_BODY`] bytes: the size of an encode buffer that fits any frame.
pub const MAX_FRAME: usize = wire_len_max(MAX_BODY);

/// The largest token a `Provision` frame carries (tokens are 32 characters).
pub const MAX_TOKEN: usize = 64;

/// The largest agent version text in a `HelloAck`.
pub const MAX_AGENT_VERSION: usize = 64;

/// The largest failure message in a `Failed` frame.
pub const MAX_MESSAGE: usize = 256;

/// Bytes of a body that are not fields: version, kind and CRC.
const BODY_OVERHEAD: usize = 1 + 1 + 4;

/// The size of the wire frame, at most, for a body of `body_len` bytes: one
/// COBS code byte per started 254-byte block, and the delimiter. Also the size
/// [`Frame::encode`] needs as its output buffer (it encodes in place).
pub const fn wire_len_max(body_len: usize) -> usize {
    body_len + body_len / 254 + 2
}

/// Why a frame could not be decoded, or encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkError {
    /// The frame's body is longer than the receive buffer (or [`MAX_BODY`]);
    /// it was skipped up to its delimiter.
    TooLong,
    /// The COBS encoding is broken: the delimiter came in the middle of a
    /// block (a half frame, or noise).
    Cobs,
    /// The body is shorter than a version, a kind and a CRC.
    TooShort,
    /// The CRC does not match the body: the frame was damaged on the line.
    Crc,
    /// The sender speaks another link version.
    Version(u8),
    /// A frame kind this version does not define.
    UnknownKind(u8),
    /// A field runs past the end of the body, or bytes follow the last field.
    Malformed,
    /// A field holds a value it may not hold (which one is the `&str`).
    BadField(&'static str),
    /// Encoding: the output buffer is too small, or a field is longer than the
    /// link allows (which one is the `&str`).
    TooLarge(&'static str),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::TooLong => f.write_str("frame longer than the receive buffer"),
            LinkError::Cobs => f.write_str("broken frame encoding (half frame or noise)"),
            LinkError::TooShort => f.write_str("frame too short"),
            LinkError::Crc => f.write_str("frame CRC mismatch"),
            LinkError::Version(v) => write!(f, "unsupported link version {v}"),
            LinkError::UnknownKind(k) => write!(f, "unknown frame kind 0x{k:02x}"),
            LinkError::Malformed => f.write_str("malformed frame fields"),
            LinkError::BadField(name) => write!(f, "invalid field `{name}`"),
            LinkError::TooLarge(what) => write!(f, "{what} too large for the link"),
        }
    }
}

impl core::error::Error for LinkError {}

/// Where a device stands, as it tells the station in its `HelloAck`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// No device id and no token yet: fresh from programming.
    Blank,
    /// It has its device id and token but no certificate.
    Provisioned,
    /// It holds a certificate already.
    Enrolled,
}

impl DeviceState {
    const fn code(self) -> u8 {
        match self {
            DeviceState::Blank => 0,
            DeviceState::Provisioned => 1,
            DeviceState::Enrolled => 2,
        }
    }

    const fn from_code(code: u8) -> Option<DeviceState> {
        match code {
            0 => Some(DeviceState::Blank),
            1 => Some(DeviceState::Provisioned),
            2 => Some(DeviceState::Enrolled),
            _ => None,
        }
    }

    /// A lowercase name for reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceState::Blank => "blank",
            DeviceState::Provisioned => "provisioned",
            DeviceState::Enrolled => "enrolled",
        }
    }
}

/// One message on the link. Station → device: [`Frame::Hello`],
/// [`Frame::Provision`], [`Frame::Reply`]. Device → station:
/// [`Frame::HelloAck`], [`Frame::Request`], [`Frame::Done`], [`Frame::Failed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The station opens a session with a unit.
    Hello,
    /// The station gives the device its id and one-time enrollment token.
    Provision {
        /// The device id (syntax of `docs/protocol.md` section 3).
        device_id: &'a str,
        /// The enrollment token, exactly as printed (at most [`MAX_TOKEN`] bytes).
        token: &'a [u8],
    },
    /// The gateway's answer to the device's request, relayed unchanged.
    Reply {
        /// The operation answered.
        op: Op,
        /// The encoding of `payload`.
        format: Format,
        /// Accepted or rejected (the MQTT reply topic's last level).
        outcome: Reply,
        /// The reply payload, exactly as the gateway published it.
        payload: &'a [u8],
    },
    /// The device answers `Hello`.
    HelloAck {
        /// What the device holds.
        state: DeviceState,
        /// Its device id; empty when `state` is [`DeviceState::Blank`].
        device_id: &'a str,
        /// The agent's version, for the report (at most [`MAX_AGENT_VERSION`] bytes).
        agent_version: &'a str,
    },
    /// A request the device wants published to the gateway (the payload of
    /// `docs/protocol.md` section 6.4 or 7.1); the station relays it unchanged.
    Request {
        /// The operation (the `{op}` topic level).
        op: Op,
        /// The encoding of `payload` (the `{fmt}` topic level).
        format: Format,
        /// The request payload.
        payload: &'a [u8],
    },
    /// The device checked and stored its certificate.
    Done {
        /// The certificate's serial, lowercase hex.
        serial: &'a str,
    },
    /// The device gave up.
    Failed {
        /// A stable code: a gateway rejection code (`docs/protocol.md`
        /// section 9) or the agent's own (`bad_certificate`, `storage`, …).
        code: &'a str,
        /// An explanation for people (at most [`MAX_MESSAGE`] bytes).
        message: &'a str,
    },
}

const KIND_HELLO: u8 = 0x01;
const KIND_PROVISION: u8 = 0x02;
const KIND_REPLY: u8 = 0x03;
const KIND_HELLO_ACK: u8 = 0x81;
const KIND_REQUEST: u8 = 0x82;
const KIND_DONE: u8 = 0x83;
const KIND_FAILED: u8 = 0x84;

const fn op_code(op: Op) -> u8 {
    match op {
        Op::Enroll => 1,
        Op::Renew => 2,
    }
}

const fn op_from_code(code: u8) -> Option<Op> {
    match code {
        1 => Some(Op::Enroll),
        2 => Some(Op::Renew),
        _ => None,
    }
}

const fn format_code(format: Format) -> u8 {
    match format {
        Format::Cbor => 1,
        Format::Json => 2,
    }
}

const fn format_from_code(code: u8) -> Option<Format> {
    match code {
        1 => Some(Format::Cbor),
        2 => Some(Format::Json),
        _ => None,
    }
}

const fn outcome_code(outcome: Reply) -> u8 {
    match outcome {
        Reply::Accepted => 0,
        Reply::Rejected => 1,
    }
}

const fn outcome_from_code(code: u8) -> Option<Reply> {
    match code {
        0 => Some(Reply::Accepted),
        1 => Some(Reply::Rejected),
        _ => None,
    }
}

impl<'a> Frame<'a> {
    /// The frame's kind byte.
    pub const fn kind(&self) -> u8 {
        match self {
            Frame::Hello => KIND_HELLO,
            Frame::Provision { .. } => KIND_PROVISION,
            Frame::Reply { .. } => KIND_REPLY,
            Frame::HelloAck { .. } => KIND_HELLO_ACK,
            Frame::Request { .. } => KIND_REQUEST,
            Frame::Done { .. } => KIND_DONE,
            Frame::Failed { .. } => KIND_FAILED,
        }
    }

    /// A short name of the kind, for logs and reports.
    pub const fn name(&self) -> &'static str {
        match self {
            Frame::Hello => "hello",
            Frame::Provision { .. } => "provision",
            Frame::Reply { .. } => "reply",
            Frame::HelloAck { .. } => "hello_ack",
            Frame::Request { .. } => "request",
            Frame::Done { .. } => "done",
            Frame::Failed { .. } => "failed",
        }
    }

    /// The length of the fields (between kind and CRC).
    const fn fields_len(&self) -> usize {
        match self {
            Frame::Hello => 0,
            Frame::Provision { device_id, token } => 2 + device_id.len() + 2 + token.len(),
            Frame::Reply { payload, .. } => 3 + 2 + payload.len(),
            Frame::HelloAck {
                device_id,
                agent_version,
                ..
            } => 1 + 2 + device_id.len() + 2 + agent_version.len(),
            Frame::Request { payload, .. } => 2 + 2 + payload.len(),
            Frame::Done { serial } => 2 + serial.len(),
            Frame::Failed { code, message } => 2 + code.len() + 2 + message.len(),
        }
    }

    /// The body length: version, kind, fields and CRC.
    pub const fn body_len(&self) -> usize {
        BODY_OVERHEAD + self.fields_len()
    }

    /// The limits a frame must respect to be sent: the same ones the decoder
    /// enforces, so nothing is sent that the other side would refuse.
    fn check(&self) -> Result<(), LinkError> {
        match *self {
            Frame::Provision { device_id, token } => {
                check_id(device_id)?;
                if token.is_empty() || token.len() > MAX_TOKEN {
                    return Err(LinkError::BadField("token"));
                }
            }
            Frame::HelloAck {
                state,
                device_id,
                agent_version,
            } => {
                if state == DeviceState::Blank {
                    if !device_id.is_empty() {
                        return Err(LinkError::BadField("device_id"));
                    }
                } else {
                    check_id(device_id)?;
                }
                if agent_version.len() > MAX_AGENT_VERSION {
                    return Err(LinkError::BadField("agent_version"));
                }
            }
            Frame::Done { serial } => {
                protocol::check_serial(serial).map_err(|_| LinkError::BadField("serial"))?;
            }
            Frame::Failed { code, message } => {
                if code.is_empty() || code.len() > 64 {
                    return Err(LinkError::BadField("code"));
                }
                if message.len() > MAX_MESSAGE {
                    return Err(LinkError::BadField("message"));
                }
            }
            Frame::Hello | Frame::Reply { .. } | Frame::Request { .. } => {}
        }
        if self.body_len() > MAX_BODY {
            return Err(LinkError::TooLarge("frame"));
        }
        Ok(())
    }

    /// Encodes the frame for the wire into `out` (COBS body and the `0x00`
    /// delimiter) and returns the number of bytes written. `out` must hold
    /// [`wire_len_max`]`(self.body_len())` bytes (at most [`MAX_FRAME`]): the
    /// body is laid out at the end of that space and COBS-encoded in place, so
    /// no second buffer is needed.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, LinkError> {
        self.check()?;
        let body_len = self.body_len();
        let need = wire_len_max(body_len);
        if out.len() < need {
            return Err(LinkError::TooLarge("output buffer"));
        }
        // The body starts far enough in that the COBS writer, which is at most
        // one code byte per 254 input bytes (plus one) ahead, never overtakes it.
        let start = need - body_len;
        let body = out
            .get_mut(start..need)
            .ok_or(LinkError::TooLarge("output buffer"))?;
        self.write_body(body)?;
        let written = cobs_encode_in_place(out, start, body_len);
        match out.get_mut(written) {
            Some(delimiter) => *delimiter = 0,
            None => return Err(LinkError::TooLarge("output buffer")),
        }
        Ok(written + 1)
    }

    fn write_body(&self, body: &mut [u8]) -> Result<(), LinkError> {
        let mut w = Writer { buf: body, at: 0 };
        w.byte(VERSION)?;
        w.byte(self.kind())?;
        match *self {
            Frame::Hello => {}
            Frame::Provision { device_id, token } => {
                w.field(device_id.as_bytes())?;
                w.field(token)?;
            }
            Frame::Reply {
                op,
                format,
                outcome,
                payload,
            } => {
                w.byte(op_code(op))?;
                w.byte(format_code(format))?;
                w.byte(outcome_code(outcome))?;
                w.field(payload)?;
            }
            Frame::HelloAck {
                state,
                device_id,
                agent_version,
            } => {
                w.byte(state.code())?;
                w.field(device_id.as_bytes())?;
                w.field(agent_version.as_bytes())?;
            }
            Frame::Request {
                op,
                format,
                payload,
            } => {
                w.byte(op_code(op))?;
                w.byte(format_code(format))?;
                w.field(payload)?;
            }
            Frame::Done { serial } => w.field(serial.as_bytes())?,
            Frame::Failed { code, message } => {
                w.field(code.as_bytes())?;
                w.field(message.as_bytes())?;
            }
        }
        let crc = crc32(w.buf.get(..w.at).unwrap_or_default());
        w.bytes(&crc.to_be_bytes())?;
        if w.at != w.buf.len() {
            return Err(LinkError::Malformed);
        }
        Ok(())
    }

    /// Decodes a frame body (after COBS decoding): checks the CRC, the
    /// version, the kind and every field. Bytes borrow from `body`.
    pub fn decode_body(body: &'a [u8]) -> Result<Frame<'a>, LinkError> {
        if body.len() < BODY_OVERHEAD {
            return Err(LinkError::TooShort);
        }
        let (content, crc) = body.split_at(body.len() - 4);
        let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32(content) != expected {
            return Err(LinkError::Crc);
        }
        let mut r = Reader { rest: content };
        let version = r.byte()?;
        if version != VERSION {
            return Err(LinkError::Version(version));
        }
        let kind = r.byte()?;
        let frame = match kind {
            KIND_HELLO => Frame::Hello,
            KIND_PROVISION => Frame::Provision {
                device_id: r.text("device_id")?,
                token: r.field()?,
            },
            KIND_REPLY => Frame::Reply {
                op: op_from_code(r.byte()?).ok_or(LinkError::BadField("op"))?,
                format: format_from_code(r.byte()?).ok_or(LinkError::BadField("format"))?,
                outcome: outcome_from_code(r.byte()?).ok_or(LinkError::BadField("outcome"))?,
                payload: r.field()?,
            },
            KIND_HELLO_ACK => Frame::HelloAck {
                state: DeviceState::from_code(r.byte()?).ok_or(LinkError::BadField("state"))?,
                device_id: r.text("device_id")?,
                agent_version: r.text("agent_version")?,
            },
            KIND_REQUEST => Frame::Request {
                op: op_from_code(r.byte()?).ok_or(LinkError::BadField("op"))?,
                format: format_from_code(r.byte()?).ok_or(LinkError::BadField("format"))?,
                payload: r.field()?,
            },
            KIND_DONE => Frame::Done {
                serial: r.text("serial")?,
            },
            KIND_FAILED => Frame::Failed {
                code: r.text("code")?,
                message: r.text("message")?,
            },
            other => return Err(LinkError::UnknownKind(other)),
        };
        if !r.rest.is_empty() {
            return Err(LinkError::Malformed);
        }
        frame.check()?;
        Ok(frame)
    }
}

fn check_id(device_id: &str) -> Result<(), LinkError> {
    protocol::check_device_id(device_id).map_err(|_| LinkError::BadField("device_id"))
}

struct Writer<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        let end = self.at + bytes.len();
        let dst = self
            .buf
            .get_mut(self.at..end)
            .ok_or(LinkError::TooLarge("frame"))?;
        dst.copy_from_slice(bytes);
        self.at = end;
        Ok(())
    }

    fn byte(&mut self, byte: u8) -> Result<(), LinkError> {
        self.bytes(&[byte])
    }

    fn field(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        let len = u16::try_from(bytes.len()).map_err(|_| LinkError::TooLarge("field"))?;
        self.bytes(&len.to_be_bytes())?;
        self.bytes(bytes)
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LinkError> {
        if self.rest.len() < n {
            return Err(LinkError::Malformed);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, LinkError> {
        Ok(self.take(1)?[0])
    }

    fn field(&mut self) -> Result<&'a [u8], LinkError> {
        let len = self.take(2)?;
        let len = u16::from_be_bytes([len[0], len[1]]);
        self.take(usize::from(len))
    }

    fn text(&mut self, name: &'static str) -> Result<&'a str, LinkError> {
        core::str::from_utf8(self.field()?).map_err(|_| LinkError::BadField(name))
    }
}

/// COBS-encodes `buf[start..start + len]` into `buf[0..]` and returns the
/// encoded length (without delimiter). Requires `start >= len / 254 + 2`, which
/// keeps the write position behind the read position.
fn cobs_encode_in_place(buf: &mut [u8], start: usize, len: usize) -> usize {
    let mut code_at = 0;
    let mut write = 1;
    let mut code: u8 = 1;
    for i in 0..len {
        let byte = buf.get(start + i).copied().unwrap_or(0);
        if byte == 0 {
            set(buf, code_at, code);
            code_at = write;
            write += 1;
            code = 1;
        } else {
            set(buf, write, byte);
            write += 1;
            code += 1;
            // A full block (254 data bytes) ends without an implied zero; a
            // new block starts only if data follows.
            if code == 0xFF && i + 1 < len {
                set(buf, code_at, code);
                code_at = write;
                write += 1;
                code = 1;
            }
        }
    }
    set(buf, code_at, code);
    write
}

fn set(buf: &mut [u8], at: usize, byte: u8) {
    if let Some(slot) = buf.get_mut(at) {
        *slot = byte;
    }
}

/// CRC-32 as in IEEE 802.3 / zlib (reflected polynomial `0xEDB88320`, initial
/// value and final XOR `0xFFFFFFFF`). A nibble table keeps it 64 bytes of flash.
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 16] = {
        let mut table = [0u32; 16];
        let mut i = 0;
        while i < 16 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 4 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc = TABLE[((crc ^ u32::from(byte)) & 0x0F) as usize] ^ (crc >> 4);
        crc = TABLE[((crc ^ u32::from(byte >> 4)) & 0x0F) as usize] ^ (crc >> 4);
    }
    !crc
}

/// The incremental receiver: feed it the bytes from the line one at a time,
/// it hands out each complete frame. The receive buffer is the caller's (a
/// `[u8; MAX_BODY]`, a `Vec<u8>`, a `&mut [u8]`…); a body longer than the
/// buffer is skipped and reported as [`LinkError::TooLong`].
#[derive(Debug)]
pub struct Decoder<B> {
    buf: B,
    len: usize,
    /// Data bytes left in the current COBS block.
    left: u8,
    /// The current block's code byte; 0 before the first one of a frame.
    code: u8,
    /// The frame in progress is being skipped (too long).
    skipping: bool,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Decoder<B> {
    /// A decoder receiving into `buf`; its length is the largest body accepted.
    pub fn new(buf: B) -> Self {
        Decoder {
            buf,
            len: 0,
            left: 0,
            code: 0,
            skipping: false,
        }
    }

    /// Forgets the frame in progress (for instance after a timeout).
    pub fn reset(&mut self) {
        self.len = 0;
        self.left = 0;
        self.code = 0;
        self.skipping = false;
    }

    /// Whether part of a frame has been received.
    pub fn in_frame(&self) -> bool {
        self.code != 0 || self.skipping
    }

    /// Takes one byte from the line. Returns `None` while a frame is in
    /// progress (and for empty frames: a lone `0x00` is a harmless way to
    /// resynchronise), and at each delimiter the decoded frame or why it was
    /// refused. After an error the decoder is ready for the next frame.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame<'_>, LinkError>> {
        match self.push_body(byte)? {
            Ok(len) => {
                let body = self.buf.as_ref().get(..len).unwrap_or_default();
                Some(Frame::decode_body(body))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Like [`push`](Self::push) but stops at the COBS layer: at a delimiter,
    /// the length of the decoded body now at the start of the buffer.
    pub fn push_body(&mut self, byte: u8) -> Option<Result<usize, LinkError>> {
        if byte == 0 {
            let result = if self.skipping {
                Err(LinkError::TooLong)
            } else if self.code == 0 {
                self.reset();
                return None;
            } else if self.left != 0 {
                Err(LinkError::Cobs)
            } else {
                Ok(self.len)
            };
            let len = self.len;
            self.reset();
            return Some(result.map(|_| len));
        }
        if self.skipping {
            return None;
        }
        if self.left == 0 {
            // A code byte: the previous block, unless it was a full one,
            // stood for a zero.
            if self.code != 0 && self.code != 0xFF && !self.store(0) {
                return None;
            }
            self.code = byte;
            self.left = byte - 1;
        } else {
            self.left -= 1;
            if !self.store(byte) {
                return None;
            }
        }
        None
    }

    fn store(&mut self, byte: u8) -> bool {
        match self.buf.as_mut().get_mut(self.len) {
            Some(slot) => {
                *slot = byte;
                self.len += 1;
                true
            }
            None => {
                self.skipping = true;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A straightforward COBS encoder to check the in-place one against.
    fn reference_cobs(data: &[u8]) -> std::vec::Vec<u8> {
        let mut out = vec![0u8];
        let mut code_at = 0;
        let mut code = 1u8;
        for (i, &b) in data.iter().enumerate() {
            if b == 0 {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            } else {
                out.push(b);
                code += 1;
                if code == 0xFF && i + 1 < data.len() {
                    out[code_at] = code;
                    code_at = out.len();
                    out.push(0);
                    code = 1;
                }
            }
        }
        out[code_at] = code;
        out
    }

    fn decode_all(
        decoder: &mut Decoder<std::vec::Vec<u8>>,
        wire: &[u8],
        mut each: impl FnMut(Result<Frame<'_>, LinkError>),
    ) {
        for &b in wire {
            if let Some(r) = decoder.push(b) {
                each(r);
            }
        }
    }

    fn samples() -> std::vec::Vec<Frame<'static>> {
        static PAYLOAD: [u8; 700] = [0u8; 700];
        vec![
            Frame::Hello,
            Frame::Provision {
                device_id: "sensor-0001",
                token: b"abcdefghijklmnopqrstuvwxyz234567",
            },
            Frame::Reply {
                op: Op::Enroll,
                format: Format::Cbor,
                outcome: Reply::Accepted,
                payload: &PAYLOAD,
            },
            Frame::Reply {
                op: Op::Renew,
                format: Format::Json,
                outcome: Reply::Rejected,
                payload: b"{\"code\":\"bad_proof\"}",
            },
            Frame::HelloAck {
                state: DeviceState::Blank,
                device_id: "",
                agent_version: "0.1.0",
            },
            Frame::HelloAck {
                state: DeviceState::Enrolled,
                device_id: "sensor-0001",
                agent_version: "",
            },
            Frame::Request {
                op: Op::Enroll,
                format: Format::Cbor,
                payload: b"\xa3\x00\x00\xff",
            },
            Frame::Done {
                serial: "4a1f6b3c9d8e7f60514233241506f7e8",
            },
            Frame::Failed {
                code: "bad_proof",
                message: "the proof does not match",
            },
        ]
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn every_kind_round_trips() {
        let mut decoder = Decoder::new(vec![0u8; MAX_BODY]);
        for frame in samples() {
            let mut out = [0u8; MAX_FRAME];
            let n = frame.encode(&mut out).unwrap();
            assert!(n <= wire_len_max(frame.body_len()));
            assert_eq!(out[n - 1], 0);
            assert!(!out[..n - 1].contains(&0), "{frame:?}: zero inside a frame");
            let mut seen = 0;
            decode_all(&mut decoder, &out[..n], |r| {
                assert_eq!(r.unwrap(), frame);
                seen += 1;
            });
            assert_eq!(seen, 1);
        }
    }

    #[test]
    fn in_place_cobs_matches_the_reference() {
        // Lengths around the 254-byte block boundary, with and without zeros.
        let mut seed = 0x1234_5678u32;
        for len in (0..600).chain([1016, 1017, 4090]) {
            for density in [0u32, 1, 50, 255] {
                let data: std::vec::Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        let b = (seed >> 16) as u8;
                        if u32::from(b) < density { 0 } else { b | 1 }
                    })
                    .collect();
                let start = len / 254 + 2;
                let mut buf = vec![0xAAu8; start + len];
                buf[start..].copy_from_slice(&data);
                let n = cobs_encode_in_place(&mut buf, start, len);
                assert_eq!(&buf[..n], reference_cobs(&data).as_slice(), "len {len}");
                // And the decoder undoes it.
                let mut decoder = Decoder::new(vec![0u8; 4096]);
                let mut got = None;
                for &b in buf[..n].iter().chain(&[0]) {
                    if let Some(r) = decoder.push_body(b) {
                        got = Some(r);
                    }
                }
                if len == 0 {
                    // An empty body encodes as the single code byte 0x01.
                    assert_eq!(got, Some(Ok(0)));
                } else {
                    assert_eq!(got, Some(Ok(len)));
                }
            }
        }
    }

    #[test]
    fn resynchronises_after_noise_and_half_frames() {
        let mut wire = vec![];
        let frames = samples();
        for (i, frame) in frames.iter().enumerate() {
            let mut out = [0u8; MAX_FRAME];
            let n = frame.encode(&mut out).unwrap();
            match i % 3 {
                0 => wire.extend_from_slice(&[0x13, 0x37, 0xFF, 0x00]),
                // Half a frame, then the line drops it.
                1 => {
                    wire.extend_from_slice(&out[..n / 2]);
                    wire.push(0);
                }
                _ => {}
            }
            wire.extend_from_slice(&out[..n]);
        }
        let mut decoder = Decoder::new(vec![0u8; MAX_BODY]);
        let mut good = vec![];
        let mut errors = 0;
        decode_all(&mut decoder, &wire, |r| match r {
            Ok(f) => good.push(format!("{f:?}")),
            Err(_) => errors += 1,
        });
        let expected: std::vec::Vec<_> = frames.iter().map(|f| format!("{f:?}")).collect();
        assert_eq!(good, expected);
        assert!(errors >= 3, "noise and half frames are reported: {errors}");
    }

    #[test]
    fn damaged_frames_are_refused_with_a_reason() {
        let frame = Frame::Provision {
            device_id: "sensor-0001",
            token: b"abcdefghijklmnopqrstuvwxyz234567",
        };
        let mut out = [0u8; MAX_FRAME];
        let n = frame.encode(&mut out).unwrap();
        // Flip one bit in every non-delimiter position: each is refused (or,
        // when it hits a code byte, still never decodes to a different frame).
        for i in 0..n - 1 {
            let mut wire = out[..n].to_vec();
            wire[i] ^= 0x10;
            let mut decoder = Decoder::new(vec![0u8; MAX_BODY]);
            decode_all(&mut decoder, &wire, |r| {
                assert!(r.is_err(), "bit flip at {i} accepted");
            });
        }
    }

    #[test]
    fn field_errors() {
        fn body(content: &[u8]) -> std::vec::Vec<u8> {
            let mut b = content.to_vec();
            b.extend_from_slice(&crc32(content).to_be_bytes());
            b
        }
        assert_eq!(Frame::decode_body(&[1, 1, 0]), Err(LinkError::TooShort));
        assert_eq!(
            Frame::decode_body(&body(&[2, KIND_HELLO])),
            Err(LinkError::Version(2))
        );
        assert_eq!(
            Frame::decode_body(&body(&[1, 0x7F])),
            Err(LinkError::UnknownKind(0x7F))
        );
        assert_eq!(
            Frame::decode_body(&body(&[1, KIND_HELLO, 0])),
            Err(LinkError::Malformed)
        );
        assert_eq!(
            Frame::decode_body(&body(&[1, KIND_DONE, 0, 9, b'a'])),
            Err(LinkError::Malformed)
        );
        assert_eq!(
            Frame::decode_body(&body(&[1, KIND_REQUEST, 9, 1, 0, 0])),
            Err(LinkError::BadField("op"))
        );
        assert_eq!(
            Frame::decode_body(&body(&[1, KIND_PROVISION, 0, 2, b'a', b'/', 0, 1, b'x'])),
            Err(LinkError::BadField("device_id"))
        );
        assert_eq!(
            Frame::decode_body(&body(&[1, KIND_DONE, 0, 2, 0xC3, 0x28])),
            Err(LinkError::BadField("serial"))
        );
        let mut bad_crc = body(&[1, KIND_HELLO]);
        bad_crc[5] ^= 1;
        assert_eq!(Frame::decode_body(&bad_crc), Err(LinkError::Crc));
    }

    #[test]
    fn encode_refuses_what_the_decoder_would() {
        let mut out = [0u8; MAX_FRAME];
        let big = [7u8; MAX_BODY];
        let too_big = Frame::Request {
            op: Op::Enroll,
            format: Format::Json,
            payload: &big,
        };
        assert_eq!(too_big.encode(&mut out), Err(LinkError::TooLarge("frame")));
        let bad_id = Frame::Provision {
            device_id: "a b",
            token: b"t",
        };
        assert_eq!(
            bad_id.encode(&mut out),
            Err(LinkError::BadField("device_id"))
        );
        let mut small = [0u8; 8];
        assert_eq!(
            Frame::Done { serial: "0abc" }.encode(&mut small),
            Err(LinkError::TooLarge("output buffer"))
        );
        // The largest frame fits MAX_FRAME.
        let largest = Frame::Request {
            op: Op::Enroll,
            format: Format::Json,
            payload: &big[..MAX_BODY - BODY_OVERHEAD - 4],
        };
        assert_eq!(largest.body_len(), MAX_BODY);
        assert!(largest.encode(&mut out).is_ok());
    }

    #[test]
    fn a_body_longer_than_the_buffer_is_skipped_then_reported() {
        let frame = Frame::Reply {
            op: Op::Enroll,
            format: Format::Cbor,
            outcome: Reply::Accepted,
            payload: &[5u8; 300],
        };
        let mut out = [0u8; MAX_FRAME];
        let n = frame.encode(&mut out).unwrap();
        let mut small = Decoder::new([0u8; 64]);
        let mut results = vec![];
        for &b in &out[..n] {
            if let Some(r) = small.push(b) {
                results.push(r.map(|f| f.kind()));
            }
        }
        assert_eq!(results, vec![Err(LinkError::TooLong)]);
        // The next frame decodes.
        let n = Frame::Hello.encode(&mut out).unwrap();
        let mut got = None;
        for &b in &out[..n] {
            if let Some(r) = small.push(b) {
                got = Some(r.map(|f| f.kind()));
            }
        }
        assert_eq!(got, Some(Ok(KIND_HELLO)));
    }

    #[test]
    fn garbage_never_panics_and_lone_delimiters_are_silent() {
        let mut decoder = Decoder::new([0u8; 256]);
        for _ in 0..10 {
            assert!(decoder.push(0).is_none());
        }
        let mut seed = 7u32;
        for _ in 0..200_000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let b = (seed >> 16) as u8;
            // Mostly non-zero so frames grow long enough to exercise overflow.
            let _ = decoder.push(if b < 8 { 0 } else { b });
        }
    }
}
