//! The MQTT policy on the client→broker direction of one device connection:
//! which client id a connection may use, which will message it may leave, and
//! which topics it may publish and subscribe to, given who the TLS front
//! verified it to be ([`Identity`]).
//!
//! Sans-IO: [`admit_connect`] takes the CONNECT packet and hands back the bytes
//! to send to the broker (or a [`Refusal`] and, via [`connack_refusal`], the
//! CONNACK to answer with); a [`Guard`] then takes the client's bytes as they
//! arrive and hands back the complete packets that may go on. MQTT 3.1.1
//! (protocol level 4) and MQTT 5 (level 5). Every byte here comes from an
//! untrusted client: parsing never panics, and anything we cannot parse is
//! refused rather than passed on, so rumqttd never sees a packet we did not
//! understand.

use super::CRL_TOPIC;
use crate::line::topic::StationTopic;
use idgate_pki::protocol::{Op, TOPIC_PREFIX, Topic, check_device_id};
use rand::RngCore;

/// Largest packet, fixed header included, that a [`Guard`] passes on: the
/// embedded broker's 64 KiB limit on the remaining length, plus room for the
/// fixed header, topic and properties, so that the broker, not the guard, is
/// the one to enforce its own limit on payloads.
pub const MAX_PACKET: usize = 64 * 1024 + 1024;

/// Prepended to the client id of every connection without a device
/// certificate. Device ids cannot start with `_`, so an anonymous client id
/// can never equal a device's, and an unauthenticated client cannot take over
/// (and so disconnect) a certified device's MQTT session. (rumqttd refuses
/// client ids containing `/`, `+`, `#` or `$`, so those cannot mark it.)
const ANONYMOUS_PREFIX: &str = "_anon.";

/// Prepended to a station's client id, for the same reason: a station id may
/// equal a device id, and the two must never share an MQTT session.
const STATION_PREFIX: &str = "_station.";

/// Longest topic or filter quoted in a [`Refusal`]: the text ends up in logs.
const MAX_QUOTED: usize = 128;

// Packet types (first byte >> 4).
const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// Who is at the other end of a connection, as the TLS front verified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A client certificate naming this device id.
    Device(String),
    /// No client certificate: a device enrolling, or renewing with an expired
    /// certificate.
    Anonymous,
    /// A line station certificate naming this station id: it may relay
    /// enrollment requests under its own station topics only.
    Station(String),
}

/// Why a connection is refused. The connection is closed after the first one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a well-formed MQTT 3.1.1 or 5 packet, or one a client may not
    /// send; in MQTT 5 also a property not valid in its packet (§2.2.2.2).
    #[error("malformed MQTT packet")]
    Malformed,
    /// A well-formed packet that breaks a rule of MQTT 5 the spec calls a
    /// Protocol Error (reason 0x82): a property given twice (§2.2.2.2), a
    /// CONNECT property value the spec forbids (§3.1.2.11), a Topic Alias
    /// or Subscription Identifier of 0 (§3.3.2.3.4, §3.8.2.1.2), or a
    /// Subscription Identifier in a PUBLISH (§3.3.4).
    #[error("MQTT protocol error: {0}")]
    ProtocolError(&'static str),
    /// An MQTT 5 CONNECT with an Authentication Method: the gateway supports
    /// no enhanced authentication (§4.12), and says so with CONNACK 0x8C,
    /// Bad authentication method.
    #[error("MQTT 5 enhanced authentication not supported")]
    BadAuthenticationMethod,
    /// A CONNECT naming MQTT with a protocol level other than 4 (3.1.1) or 5.
    #[error("MQTT protocol level {0} not supported")]
    UnsupportedLevel(u8),
    /// A packet larger than [`MAX_PACKET`].
    #[error("MQTT packet larger than {MAX_PACKET} bytes")]
    TooLarge,
    /// The client id differs from the device id of the client certificate.
    #[error("MQTT client id does not match the certificate's device id")]
    ClientIdMismatch,
    /// An anonymous client id the broker could not be given: empty with a
    /// persistent session (we could not tell the client the id we chose), or
    /// too long once prefixed.
    #[error("MQTT client id not acceptable")]
    ClientIdInvalid,
    /// A PUBLISH to a topic this identity may not publish to (quoted, cut to
    /// 128 bytes; empty for a PUBLISH that names its topic by alias only).
    #[error("publishing to {0:?} is not allowed")]
    TopicNotAllowed(String),
    /// A SUBSCRIBE with a filter this identity may not use (quoted, cut to 128
    /// bytes).
    #[error("subscribing to {0:?} is not allowed")]
    FilterNotAllowed(String),
    /// A will message this identity may not set.
    #[error("will message not allowed")]
    WillNotAllowed,
    /// More topic filters at once than the connection may hold.
    #[error("more than {0} subscriptions on one connection")]
    TooManySubscriptions(usize),
}

/// Checks a complete CONNECT packet (fixed header included) against
/// `identity` and returns the packet to send to the broker.
///
/// A device must use its device id as client id; its username and password
/// pass through untouched (SDKs put metrics there; they are never a
/// credential), and its will topic must be under its own topics. An anonymous
/// client gets `_anon.` prepended to its client id (a random one if it sent
/// none) and may not set a will.
pub fn admit_connect(identity: &Identity, connect: &[u8]) -> Result<Vec<u8>, Refusal> {
    if connect.len() > MAX_PACKET {
        return Err(Refusal::TooLarge);
    }
    let parsed = parse_connect(connect)?;
    match identity {
        Identity::Device(id) => {
            // An id that is not a valid device id would make a prefix with
            // `/` or wildcards in it: such an identity is allowed nothing.
            let prefix = device_prefix(id).ok_or(Refusal::ClientIdMismatch)?;
            if parsed.client_id != id {
                return Err(Refusal::ClientIdMismatch);
            }
            if let Some(topic) = parsed.will_topic {
                check_topic_name(topic)?;
                if !topic.starts_with(&prefix) {
                    return Err(Refusal::WillNotAllowed);
                }
            }
            Ok(connect.to_vec())
        }
        Identity::Station(id) => {
            crate::line::topic::station_prefix(id).ok_or(Refusal::ClientIdMismatch)?;
            if parsed.client_id != id {
                return Err(Refusal::ClientIdMismatch);
            }
            if parsed.will_topic.is_some() {
                return Err(Refusal::WillNotAllowed);
            }
            replace_client_id(connect, &parsed, &format!("{STATION_PREFIX}{id}"))
        }
        Identity::Anonymous => {
            if parsed.will_topic.is_some() {
                return Err(Refusal::WillNotAllowed);
            }
            let client_id = if parsed.client_id.is_empty() {
                // Without a session to come back to, the client needs no id it
                // knows; with one it would expect the broker's assigned id.
                if !parsed.clean_start {
                    return Err(Refusal::ClientIdInvalid);
                }
                format!("{ANONYMOUS_PREFIX}{:016x}", rand::rngs::OsRng.next_u64())
            } else {
                format!("{ANONYMOUS_PREFIX}{}", parsed.client_id)
            };
            let mut packet = replace_client_id(connect, &parsed, &client_id)?;
            force_clean_start(&mut packet)?;
            // MQTT 5 keeps a session past the connection on a Session Expiry
            // Interval alone, Clean Start or not: it becomes 0.
            if let Some(at) = parse_connect(&packet)?.session_expiry_at {
                packet
                    .get_mut(at..at + 4)
                    .ok_or(Refusal::Malformed)?
                    .fill(0);
            }
            Ok(packet)
        }
    }
}

/// What an admitted CONNECT asks of the broker's session handling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTerms {
    /// The client id the broker sees (after [`admit_connect`]).
    pub client_id: String,
    /// Whether rumqttd may keep (or hold from before) a session for this
    /// client id beyond the connection: Clean Session 0 (3.1.1), or Clean
    /// Start 0 or a Session Expiry Interval (5).
    pub persistent: bool,
    /// Whether the broker has state to act on for this client beyond the
    /// connection: a persistent session or a will.
    pub stateful: bool,
    /// The keep-alive interval in seconds (0: none).
    pub keep_alive: u16,
    /// The largest packet, in bytes, the client accepts (MQTT 5 Maximum
    /// Packet Size); `None`: no limit beyond the protocol's.
    pub max_packet_size: Option<u32>,
}

/// The [`SessionTerms`] of a CONNECT that [`admit_connect`] returned.
pub fn session_terms(admitted: &[u8]) -> Result<SessionTerms, Refusal> {
    let parsed = parse_connect(admitted)?;
    let persistent = !parsed.clean_start || parsed.session_expiry;
    Ok(SessionTerms {
        client_id: parsed.client_id.to_owned(),
        persistent,
        stateful: persistent || parsed.will_topic.is_some(),
        keep_alive: parsed.keep_alive,
        max_packet_size: parsed.max_packet_size,
    })
}

/// Sets the Clean Session (3.1.1) / Clean Start (5) flag of a CONNECT: an
/// anonymous client only makes requests and waits for their replies, and a
/// broker should keep no session state for clients nobody vouches for.
fn force_clean_start(packet: &mut [u8]) -> Result<(), Refusal> {
    let (header_len, _) = fixed_header(packet)?.ok_or(Refusal::Malformed)?;
    let name_len = packet
        .get(header_len..header_len + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or(Refusal::Malformed)?;
    let flags = packet
        .get_mut(header_len + 2 + name_len + 1)
        .ok_or(Refusal::Malformed)?;
    *flags |= 0x02;
    Ok(())
}

/// The CONNACK refusing a connection for `refusal`, at protocol `level` (5:
/// MQTT 5, anything else: the 3.1.1 layout), to send before closing; `None`
/// where the connection is closed without one.
///
/// MQTT 3.1.1 has return codes only for a well-formed CONNECT the server
/// does not accept: a malformed one, or one breaking a rule of the
/// protocol, is answered by closing the connection without a CONNACK
/// (§3.1.4, §4.8).
pub fn connack_refusal(level: u8, refusal: &Refusal) -> Option<Vec<u8>> {
    let client_id = matches!(
        refusal,
        Refusal::ClientIdMismatch | Refusal::ClientIdInvalid
    );
    if level == 5 {
        // Client Identifier not valid, Bad authentication method (neither
        // a DISCONNECT reason), or the reason a DISCONNECT would give.
        let reason = match refusal {
            _ if client_id => 0x85,
            Refusal::BadAuthenticationMethod => 0x8c,
            _ => reason_v5(refusal),
        };
        Some(vec![0x20, 3, 0, reason, 0])
    } else if matches!(refusal, Refusal::Malformed | Refusal::ProtocolError(_)) {
        None
    } else {
        // Unacceptable protocol version (the layout 3.1.1 asks for, as a
        // client of another level may not read MQTT 5's), identifier
        // rejected, or not authorized.
        let code = match refusal {
            Refusal::UnsupportedLevel(_) => 1,
            _ if client_id => 2,
            _ => 5,
        };
        Some(vec![0x20, 2, 0, code])
    }
}

/// The DISCONNECT telling an MQTT 5 client why its connection is closed;
/// `None` for 3.1.1, which has no server DISCONNECT.
pub fn disconnect_packet(level: u8, refusal: &Refusal) -> Option<Vec<u8>> {
    (level == 5).then(|| vec![0xe0, 2, reason_v5(refusal), 0])
}

/// The DISCONNECT telling an MQTT 5 client that a newer connection took its
/// client id over (reason 0x8E, Session taken over: MQTT 5 §3.1.4-3);
/// `None` for 3.1.1, whose clients are just closed.
pub fn taken_over_packet(level: u8) -> Option<Vec<u8>> {
    (level == 5).then(|| vec![0xe0, 2, 0x8e, 0])
}

/// MQTT 5 reason code for `refusal`, valid in both CONNACK and DISCONNECT.
fn reason_v5(refusal: &Refusal) -> u8 {
    match refusal {
        Refusal::Malformed => 0x81,
        Refusal::ProtocolError(_) => 0x82,
        Refusal::UnsupportedLevel(_) => 0x84,
        Refusal::TooLarge => 0x95,
        // Quota exceeded.
        Refusal::TooManySubscriptions(_) => 0x97,
        _ => 0x87,
    }
}

/// Inspects the client→broker bytes of one connection after its CONNECT.
#[derive(Debug)]
pub struct Guard {
    policy: Policy,
    v5: bool,
    /// The start of a packet not yet complete (at most [`MAX_PACKET`] bytes:
    /// the size is checked as soon as the fixed header is complete).
    pending: Vec<u8>,
    /// Set by the first refusal; the connection is then dead for good.
    refused: Option<Refusal>,
    /// The filters subscribed to now (as far as SUBSCRIBE and UNSUBSCRIBE
    /// tell), at most `max_filters`: every filter costs memory in the front
    /// or in rumqttd, and a device needs a handful.
    filters: std::collections::HashSet<String>,
    max_filters: usize,
}

/// Filters a connection may hold at once unless the front says otherwise: a
/// device needs its two reply topics per operation, the CRL, and a few of
/// its own.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 64;

/// What an [`Identity`] may do, prepared once per connection.
#[derive(Debug)]
enum Policy {
    /// A device, with its topic prefix `idgate/v1/devices/{id}/`.
    Device {
        prefix: String,
    },
    Anonymous,
    /// A line station, with its topic prefix `idgate/v1/stations/{id}/`.
    Station {
        id: String,
        prefix: String,
    },
    /// A device identity whose id is not a valid device id: nothing allowed.
    Nothing,
}

impl Guard {
    /// A guard for a connection of `identity` that connected with
    /// `protocol_level` (5: MQTT 5; anything else is framed as 3.1.1, the only
    /// other level [`admit_connect`] admits).
    pub fn new(identity: Identity, protocol_level: u8) -> Guard {
        let policy = match identity {
            Identity::Device(id) => match device_prefix(&id) {
                Some(prefix) => Policy::Device { prefix },
                None => Policy::Nothing,
            },
            Identity::Anonymous => Policy::Anonymous,
            Identity::Station(id) => match crate::line::topic::station_prefix(&id) {
                Some(prefix) => Policy::Station { id, prefix },
                None => Policy::Nothing,
            },
        };
        Guard {
            policy,
            v5: protocol_level == 5,
            pending: Vec::new(),
            refused: None,
            filters: std::collections::HashSet::new(),
            max_filters: DEFAULT_MAX_SUBSCRIPTIONS,
        }
    }

    /// The same guard, allowing `max` filters at once.
    pub fn with_max_subscriptions(mut self, max: usize) -> Guard {
        self.max_filters = max;
        self
    }

    /// Takes the next bytes from the client and appends to `forward` every
    /// packet they complete, unchanged, as long as it is allowed.
    ///
    /// On the first violation returns the refusal; `forward` then holds the
    /// allowed packets that came before it, and every later call returns the
    /// same refusal.
    pub fn feed(&mut self, input: &[u8], forward: &mut Vec<u8>) -> Result<(), Refusal> {
        if let Some(refusal) = &self.refused {
            return Err(refusal.clone());
        }
        let result = if self.pending.is_empty() {
            // The common case, whole packets: no copy beyond `forward`.
            self.frames(input, forward).map(|used| {
                self.pending
                    .extend_from_slice(input.get(used..).unwrap_or_default());
            })
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(input);
            let result = self.frames(&pending, forward).map(|used| {
                pending.drain(..used.min(pending.len()));
            });
            self.pending = pending;
            result
        };
        if let Err(refusal) = &result {
            self.refused = Some(refusal.clone());
            self.pending = Vec::new();
        }
        result
    }

    /// Passes on the complete packets at the start of `bytes`; returns how
    /// many bytes they took.
    fn frames(&mut self, bytes: &[u8], forward: &mut Vec<u8>) -> Result<usize, Refusal> {
        let mut used = 0;
        loop {
            let rest = bytes.get(used..).unwrap_or_default();
            let Some(&first) = rest.first() else {
                return Ok(used);
            };
            // Refuse garbage on its first byte rather than buffer it.
            check_first_byte(first, self.v5)?;
            let Some((header_len, remaining)) = fixed_header(rest)? else {
                return Ok(used);
            };
            let total = header_len.saturating_add(remaining);
            if total > MAX_PACKET {
                return Err(Refusal::TooLarge);
            }
            let Some(packet) = rest.get(..total) else {
                return Ok(used);
            };
            self.inspect(first, packet.get(header_len..).unwrap_or_default())?;
            forward.extend_from_slice(packet);
            used += total;
        }
    }

    /// Checks one complete packet, given its first byte and its body.
    fn inspect(&mut self, first: u8, body: &[u8]) -> Result<(), Refusal> {
        let mut r = Reader::new(body);
        match first >> 4 {
            PUBLISH => self.publish(first, &mut r)?,
            SUBSCRIBE => self.subscribe(&mut r)?,
            UNSUBSCRIBE => self.unsubscribe(&mut r)?,
            PUBACK | PUBREC | PUBREL | PUBCOMP => {
                r.u16()?;
                if self.v5 {
                    reason_and_properties(&mut r, Block::Acknowledgement)?;
                }
            }
            DISCONNECT if self.v5 => reason_and_properties(&mut r, Block::Disconnect)?,
            AUTH if self.v5 => reason_and_properties(&mut r, Block::Auth)?,
            PINGREQ | DISCONNECT => {}
            _ => return Err(Refusal::Malformed),
        }
        r.end()
    }

    fn publish(&self, first: u8, r: &mut Reader<'_>) -> Result<(), Refusal> {
        let topic = r.string()?;
        if (first >> 1) & 3 > 0 {
            packet_id(r)?;
        }
        let alias = self.v5 && properties(r, Block::Publish)?.topic_alias;
        r.rest();
        if topic.is_empty() {
            // An alias-only PUBLISH names a topic set earlier on this
            // connection; we do not track aliases, so we cannot check it.
            return Err(if alias {
                Refusal::TopicNotAllowed(String::new())
            } else {
                Refusal::Malformed
            });
        }
        check_topic_name(topic)?;
        let allowed = match &self.policy {
            Policy::Device { prefix } => topic.starts_with(prefix.as_str()),
            Policy::Anonymous => is_request_topic(topic),
            // Its own enrollment requests; which devices it may enroll is the
            // authority's check (the guard knows no batches).
            Policy::Station { id, .. } => StationTopic::parse(topic)
                .is_some_and(|t| t.station_id == id && t.reply.is_none() && t.op == Op::Enroll),
            Policy::Nothing => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal::TopicNotAllowed(quoted(topic)))
        }
    }

    fn subscribe(&mut self, r: &mut Reader<'_>) -> Result<(), Refusal> {
        packet_id(r)?;
        if self.v5 {
            properties(r, Block::Subscribe)?;
        }
        if r.is_empty() {
            return Err(Refusal::Malformed);
        }
        while !r.is_empty() {
            let filter = r.string()?;
            let options = r.u8()?;
            // QoS 3 is reserved; v5 adds no-local, retain-as-published and
            // retain handling (3 reserved) below the two reserved top bits.
            let reserved = if self.v5 {
                options & 0xc0 != 0 || (options >> 4) & 3 == 3
            } else {
                options & 0xfc != 0
            };
            if reserved || options & 3 == 3 {
                return Err(Refusal::Malformed);
            }
            check_filter(filter)?;
            let allowed = match &self.policy {
                Policy::Device { prefix } => {
                    filter == CRL_TOPIC || filter.starts_with(prefix.as_str())
                }
                Policy::Anonymous => filter == CRL_TOPIC || is_reply_filter(filter),
                Policy::Station { prefix, .. } => {
                    filter == CRL_TOPIC || filter.starts_with(prefix.as_str())
                }
                Policy::Nothing => false,
            };
            if !allowed {
                return Err(Refusal::FilterNotAllowed(quoted(filter)));
            }
            if !self.filters.contains(filter) {
                if self.filters.len() >= self.max_filters {
                    return Err(Refusal::TooManySubscriptions(self.max_filters));
                }
                self.filters.insert(filter.to_owned());
            }
        }
        Ok(())
    }

    /// Unsubscribing cannot widen access; only the framing is checked.
    fn unsubscribe(&mut self, r: &mut Reader<'_>) -> Result<(), Refusal> {
        packet_id(r)?;
        if self.v5 {
            properties(r, Block::Unsubscribe)?;
        }
        if r.is_empty() {
            return Err(Refusal::Malformed);
        }
        while !r.is_empty() {
            let filter = r.string()?;
            self.filters.remove(filter);
        }
        Ok(())
    }
}

/// What [`admit_connect`] needs from a CONNECT packet.
#[derive(Debug)]
struct Connect<'a> {
    clean_start: bool,
    /// MQTT 5: a Session Expiry Interval above zero.
    session_expiry: bool,
    /// MQTT 5: where that interval's four bytes are in the packet.
    session_expiry_at: Option<usize>,
    keep_alive: u16,
    /// MQTT 5: the client's Maximum Packet Size.
    max_packet_size: Option<u32>,
    client_id: &'a str,
    /// Where the client id, length prefix included, lies in the packet.
    client_id_span: (usize, usize),
    will_topic: Option<&'a str>,
}

/// Parses a whole CONNECT packet; anything left over is malformed.
fn parse_connect(packet: &[u8]) -> Result<Connect<'_>, Refusal> {
    if packet.first() != Some(&(CONNECT << 4)) {
        return Err(Refusal::Malformed);
    }
    let (header_len, remaining) = fixed_header(packet)?.ok_or(Refusal::Malformed)?;
    if header_len.checked_add(remaining) != Some(packet.len()) {
        return Err(Refusal::Malformed);
    }
    let mut r = Reader::new(packet);
    r.take(header_len)?;
    if r.binary()? != b"MQTT" {
        return Err(Refusal::Malformed);
    }
    let v5 = match r.u8()? {
        4 => false,
        5 => true,
        level => return Err(Refusal::UnsupportedLevel(level)),
    };
    let flags = r.u8()?;
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0x20 != 0;
    let password = flags & 0x40 != 0;
    let username = flags & 0x80 != 0;
    if flags & 0x01 != 0
        || will_qos == 3
        || (!will && (will_qos != 0 || will_retain))
        || (!v5 && password && !username)
    {
        return Err(Refusal::Malformed);
    }
    let keep_alive = r.u16()?;
    let (session_expiry, session_expiry_at, max_packet_size) = if v5 {
        let found = properties(&mut r, Block::Connect)?;
        // No method is supported (MQTT 5 §4.12): rumqttd would go on
        // without one, where the client expects its method to be used.
        if found.authentication_method {
            return Err(Refusal::BadAuthenticationMethod);
        }
        // MQTT 5 §3.1.2.11.10: the data belongs to a method.
        if found.authentication_data && !found.authentication_method {
            return Err(Refusal::ProtocolError(
                "Authentication Data without Authentication Method",
            ));
        }
        (
            found.session_expiry,
            found.session_expiry_at,
            found.max_packet_size,
        )
    } else {
        (false, None, None)
    };
    let start = r.position();
    let client_id = r.string()?;
    let client_id_span = (start, r.position());
    let will_topic = if will {
        if v5 {
            properties(&mut r, Block::Will)?;
        }
        let topic = r.string()?;
        r.binary()?; // will payload
        Some(topic)
    } else {
        None
    };
    if username {
        r.string()?;
    }
    if password {
        r.binary()?;
    }
    r.end()?;
    Ok(Connect {
        clean_start: flags & 0x02 != 0,
        session_expiry,
        session_expiry_at,
        keep_alive,
        max_packet_size,
        client_id,
        client_id_span,
        will_topic,
    })
}

/// Re-encodes `packet` with `client_id` in place of its own: the remaining
/// length is recomputed, every other byte is kept.
fn replace_client_id(
    packet: &[u8],
    parsed: &Connect<'_>,
    client_id: &str,
) -> Result<Vec<u8>, Refusal> {
    let id_len = u16::try_from(client_id.len()).map_err(|_| Refusal::ClientIdInvalid)?;
    let (start, end) = parsed.client_id_span;
    let (header_len, _) = fixed_header(packet)?.ok_or(Refusal::Malformed)?;
    let before = packet.get(header_len..start).ok_or(Refusal::Malformed)?;
    let after = packet.get(end..).ok_or(Refusal::Malformed)?;
    let remaining = before.len() + 2 + client_id.len() + after.len();
    let mut out = Vec::with_capacity(remaining + 5);
    out.push(0x10);
    encode_varint(remaining, &mut out)?;
    out.extend_from_slice(before);
    out.extend_from_slice(&id_len.to_be_bytes());
    out.extend_from_slice(client_id.as_bytes());
    out.extend_from_slice(after);
    Ok(out)
}

/// Encodes an MQTT variable byte integer (at most 4 bytes).
fn encode_varint(mut value: usize, out: &mut Vec<u8>) -> Result<(), Refusal> {
    if value > 0x0fff_ffff {
        return Err(Refusal::TooLarge);
    }
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return Ok(());
        }
        out.push(byte | 0x80);
    }
}

/// Splits the fixed header off the start of `bytes`: `None` while it is
/// incomplete, then its length and the packet's remaining length. The
/// remaining length takes at most 4 bytes; non-minimal encodings are
/// tolerated, as rumqttd does.
fn fixed_header(bytes: &[u8]) -> Result<Option<(usize, usize)>, Refusal> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = bytes.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(Refusal::Malformed)
}

/// Whether a client may send a packet starting with `first` after CONNECT:
/// the type and its fixed flags.
fn check_first_byte(first: u8, v5: bool) -> Result<(), Refusal> {
    let flags = first & 0x0f;
    let ok = match first >> 4 {
        PUBLISH => (flags >> 1) & 3 != 3,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0b0010,
        PUBACK | PUBREC | PUBCOMP | PINGREQ | DISCONNECT => flags == 0,
        AUTH => v5 && flags == 0,
        // CONNECT again, server-to-client packets, reserved types.
        _ => false,
    };
    if ok { Ok(()) } else { Err(Refusal::Malformed) }
}

/// A packet identifier, which must not be zero.
fn packet_id(r: &mut Reader<'_>) -> Result<(), Refusal> {
    if r.u16()? == 0 {
        return Err(Refusal::Malformed);
    }
    Ok(())
}

/// The optional reason code and properties ending an MQTT 5 acknowledgement,
/// DISCONNECT or AUTH.
fn reason_and_properties(r: &mut Reader<'_>, block: Block) -> Result<(), Refusal> {
    if !r.is_empty() {
        r.u8()?;
        if !r.is_empty() {
            properties(r, block)?;
        }
    }
    Ok(())
}

/// The packet (or, for the will, the part of CONNECT) a property block
/// comes from: what a property may be depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Connect,
    Will,
    Publish,
    Subscribe,
    Unsubscribe,
    /// PUBACK, PUBREC, PUBREL or PUBCOMP.
    Acknowledgement,
    Disconnect,
    Auth,
}

/// What the guard needs from an MQTT 5 property block.
#[derive(Debug, Default)]
struct Properties {
    topic_alias: bool,
    /// A Session Expiry Interval above zero (CONNECT): the session outlives
    /// the connection.
    session_expiry: bool,
    /// Where the Session Expiry Interval's four bytes are, as a position
    /// of the reader the block was read from.
    session_expiry_at: Option<usize>,
    /// Maximum Packet Size (CONNECT): the largest packet the client takes.
    max_packet_size: Option<u32>,
    /// Whether the block has an Authentication Method, and Authentication
    /// Data.
    authentication_method: bool,
    authentication_data: bool,
}

/// Whether MQTT 5 allows property `id` in `block`: the table of §2.2.2.2,
/// for the packets a client sends.
fn allowed_in(id: usize, block: Block) -> bool {
    use Block::*;
    match id {
        // Payload Format Indicator, Message Expiry Interval, Content Type,
        // Response Topic, Correlation Data.
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(block, Publish | Will),
        // Subscription Identifier (in a PUBLISH, for the server to send).
        0x0b => matches!(block, Publish | Subscribe),
        // Session Expiry Interval.
        0x11 => matches!(block, Connect | Disconnect),
        // Authentication Method, Authentication Data.
        0x15 | 0x16 => matches!(block, Connect | Auth),
        // Request Problem Information, Request Response Information,
        // Receive Maximum, Topic Alias Maximum, Maximum Packet Size.
        0x17 | 0x19 | 0x21 | 0x22 | 0x27 => block == Connect,
        // Will Delay Interval.
        0x18 => block == Will,
        // Server Reference.
        0x1c => block == Disconnect,
        // Reason String.
        0x1f => matches!(block, Acknowledgement | Disconnect | Auth),
        // Topic Alias.
        0x23 => block == Publish,
        // User Property.
        0x26 => true,
        // CONNACK only (Assigned Client Identifier, Server Keep Alive,
        // Response Information, Maximum QoS, Retain Available, Wildcard,
        // Subscription Identifier and Shared Subscription Available), and
        // identifiers MQTT 5 does not define.
        _ => false,
    }
}

/// Parses an MQTT 5 property block (length, then identifier/value pairs)
/// of a `block` sent by a client. An identifier that is unknown or not
/// valid in `block` is malformed, and a property other than User Property
/// given twice is a protocol error (MQTT 5 §2.2.2.2; the one other that may
/// repeat, Subscription Identifier in PUBLISH, only a server may send).
fn properties(r: &mut Reader<'_>, block: Block) -> Result<Properties, Refusal> {
    const USER_PROPERTY: usize = 0x26;
    let len = r.varint()?;
    let base = r.position();
    let mut p = Reader::new(r.take(len)?);
    let mut found = Properties::default();
    // Identifiers seen so far; every known one is below 64.
    let mut seen = 0u64;
    while !p.is_empty() {
        let id = p.varint()?;
        if !allowed_in(id, block) {
            return Err(Refusal::Malformed);
        }
        if id < 64 && id != USER_PROPERTY {
            if seen & (1 << id) != 0 {
                return Err(Refusal::ProtocolError("a property given twice"));
            }
            seen |= 1 << id;
        }
        match id {
            0x01 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => {
                p.u8()?;
            }
            // Request Response Information and Request Problem Information
            // are flags: any other value is a protocol error (MQTT 5
            // §3.1.2.11.6, §3.1.2.11.7).
            0x19 => {
                if p.u8()? > 1 {
                    return Err(Refusal::ProtocolError(
                        "Request Response Information not 0 or 1",
                    ));
                }
            }
            0x17 => {
                if p.u8()? > 1 {
                    return Err(Refusal::ProtocolError(
                        "Request Problem Information not 0 or 1",
                    ));
                }
            }
            0x13 | 0x22 => {
                p.u16()?;
            }
            0x21 => {
                // Zero is a protocol error (MQTT 5 §3.1.2.11.3): the server
                // could never send a QoS 1 or 2 message.
                if p.u16()? == 0 {
                    return Err(Refusal::ProtocolError("Receive Maximum 0"));
                }
            }
            0x23 => {
                // Zero is a protocol error (MQTT 5 §3.3.2.3.4): aliases
                // start at 1.
                if p.u16()? == 0 {
                    return Err(Refusal::ProtocolError("Topic Alias 0"));
                }
                found.topic_alias = true;
            }
            0x11 => {
                found.session_expiry_at = Some(base + p.position());
                found.session_expiry = p.u32()? > 0;
            }
            0x02 | 0x18 => {
                p.u32()?;
            }
            0x27 => {
                // Zero is a protocol error (MQTT 5 §3.1.2.11.4): there
                // would be no limit to honour.
                let size = p.u32()?;
                if size == 0 {
                    return Err(Refusal::ProtocolError("Maximum Packet Size 0"));
                }
                found.max_packet_size = Some(size);
            }
            0x0b => {
                // MQTT 5 §3.3.4 (MQTT-3.3.4-6): only a server puts one in a
                // PUBLISH; §3.8.2.1.2: zero is a protocol error.
                let identifier = p.varint()?;
                if block == Block::Publish {
                    return Err(Refusal::ProtocolError(
                        "Subscription Identifier in a PUBLISH from a client",
                    ));
                }
                if identifier == 0 {
                    return Err(Refusal::ProtocolError("Subscription Identifier 0"));
                }
            }
            0x03 | 0x08 | 0x12 | 0x1a | 0x1c | 0x1f => {
                p.string()?;
            }
            0x15 => {
                p.string()?;
                found.authentication_method = true;
            }
            0x09 => {
                p.binary()?;
            }
            0x16 => {
                p.binary()?;
                found.authentication_data = true;
            }
            0x26 => {
                p.string()?;
                p.string()?;
            }
            _ => return Err(Refusal::Malformed),
        }
    }
    Ok(found)
}

/// `idgate/v1/devices/{id}/` for a valid device id.
fn device_prefix(id: &str) -> Option<String> {
    check_device_id(id).ok()?;
    Some(format!("{TOPIC_PREFIX}{id}/"))
}

/// A topic name: not empty, no wildcards.
fn check_topic_name(topic: &str) -> Result<(), Refusal> {
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err(Refusal::Malformed);
    }
    Ok(())
}

/// A topic filter: not empty, `+` only as a whole level, `#` only as the
/// whole last level.
fn check_filter(filter: &str) -> Result<(), Refusal> {
    if filter.is_empty() {
        return Err(Refusal::Malformed);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "+" => true,
            "#" => levels.peek().is_none(),
            _ => !level.contains(['+', '#']),
        };
        if !ok {
            return Err(Refusal::Malformed);
        }
    }
    Ok(())
}

/// `idgate/v1/devices/{id}/{enroll|renew}/{json|cbor}`, nothing else.
fn is_request_topic(topic: &str) -> bool {
    Topic::parse(topic).is_some_and(|t| t.reply.is_none() && matches!(t.op, Op::Enroll | Op::Renew))
}

/// `idgate/v1/devices/{id}/{enroll|renew}/{json|cbor}/{accepted|rejected|+}`
/// with a literal device id: one device's replies, never everyone's.
fn is_reply_filter(filter: &str) -> bool {
    let Some(rest) = filter.strip_prefix(TOPIC_PREFIX) else {
        return false;
    };
    let mut levels = rest.split('/');
    let (Some(id), Some(op), Some(format), Some(reply), None) = (
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
    ) else {
        return false;
    };
    check_device_id(id).is_ok()
        && matches!(op, "enroll" | "renew")
        && matches!(format, "json" | "cbor")
        && matches!(reply, "accepted" | "rejected" | "+")
}

/// `text` cut to [`MAX_QUOTED`] bytes on a character boundary.
fn quoted(text: &str) -> String {
    let mut end = text.len().min(MAX_QUOTED);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = text.get(..end).unwrap_or_default().to_owned();
    if end < text.len() {
        out.push('…');
    }
    out
}

/// A cursor over untrusted bytes: every read is checked and fails as
/// [`Refusal::Malformed`] past the end.
#[derive(Debug)]
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, position: 0 }
    }

    fn position(&self) -> usize {
        self.position
    }

    fn is_empty(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn end(&self) -> Result<(), Refusal> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Refusal::Malformed)
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        let end = self.position.checked_add(n).ok_or(Refusal::Malformed)?;
        let taken = self
            .bytes
            .get(self.position..end)
            .ok_or(Refusal::Malformed)?;
        self.position = end;
        Ok(taken)
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.position..).unwrap_or_default();
        self.position = self.bytes.len();
        rest
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        let [byte] = self.take(1)? else {
            return Err(Refusal::Malformed);
        };
        Ok(*byte)
    }

    fn u16(&mut self) -> Result<u16, Refusal> {
        let [a, b] = self.take(2)? else {
            return Err(Refusal::Malformed);
        };
        Ok(u16::from_be_bytes([*a, *b]))
    }

    fn u32(&mut self) -> Result<u32, Refusal> {
        let [a, b, c, d] = self.take(4)? else {
            return Err(Refusal::Malformed);
        };
        Ok(u32::from_be_bytes([*a, *b, *c, *d]))
    }

    /// A variable byte integer of at most 4 bytes.
    fn varint(&mut self) -> Result<usize, Refusal> {
        let mut value = 0usize;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Refusal::Malformed)
    }

    /// Binary data: a 2-byte length, then the bytes.
    fn binary(&mut self) -> Result<&'a [u8], Refusal> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 string: valid UTF-8 without U+0000, as MQTT requires.
    fn string(&mut self) -> Result<&'a str, Refusal> {
        let text = std::str::from_utf8(self.binary()?).map_err(|_| Refusal::Malformed)?;
        if text.contains('\0') {
            return Err(Refusal::Malformed);
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Hand-built MQTT packets, minimal remaining lengths.
    mod build {
        pub fn varint(mut value: usize, out: &mut Vec<u8>) {
            loop {
                let byte = (value & 0x7f) as u8;
                value >>= 7;
                if value == 0 {
                    out.push(byte);
                    return;
                }
                out.push(byte | 0x80);
            }
        }

        pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
            let mut out = vec![first];
            varint(body.len(), &mut out);
            out.extend_from_slice(body);
            out
        }

        pub fn string(text: &str, out: &mut Vec<u8>) {
            binary(text.as_bytes(), out);
        }

        pub fn binary(bytes: &[u8], out: &mut Vec<u8>) {
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(bytes);
        }

        /// A property block around already encoded properties.
        pub fn properties(content: &[u8], out: &mut Vec<u8>) {
            varint(content.len(), out);
            out.extend_from_slice(content);
        }

        /// Some MQTT 5 properties of every value type.
        pub fn sample_properties() -> Vec<u8> {
            let mut p = vec![0x11, 0, 0, 0x0e, 0x10]; // session expiry
            p.extend_from_slice(&[0x21, 0, 10]); // receive maximum
            p.push(0x26); // user property
            string("sdk", &mut p);
            string("aws-iot-device-sdk-embedded-C/4", &mut p);
            p.push(0x17); // request problem information
            p.push(1);
            p
        }

        pub struct Will {
            pub properties: Vec<u8>,
            pub topic: String,
            pub payload: Vec<u8>,
        }

        pub struct Connect {
            pub level: u8,
            pub clean: bool,
            pub properties: Vec<u8>,
            pub client_id: String,
            pub will: Option<Will>,
            pub username: Option<String>,
            pub password: Option<Vec<u8>>,
        }

        impl Connect {
            pub fn new(level: u8, client_id: &str) -> Connect {
                Connect {
                    level,
                    clean: true,
                    properties: Vec::new(),
                    client_id: client_id.to_owned(),
                    will: None,
                    username: None,
                    password: None,
                }
            }

            pub fn encode(&self) -> Vec<u8> {
                let mut body = Vec::new();
                string("MQTT", &mut body);
                body.push(self.level);
                let mut flags = 0u8;
                if self.clean {
                    flags |= 0x02;
                }
                if self.will.is_some() {
                    flags |= 0x04 | 0x08 | 0x20; // QoS 1, retained
                }
                if self.password.is_some() {
                    flags |= 0x40;
                }
                if self.username.is_some() {
                    flags |= 0x80;
                }
                body.push(flags);
                body.extend_from_slice(&60u16.to_be_bytes());
                if self.level == 5 {
                    properties(&self.properties, &mut body);
                }
                string(&self.client_id, &mut body);
                if let Some(will) = &self.will {
                    if self.level == 5 {
                        properties(&will.properties, &mut body);
                    }
                    string(&will.topic, &mut body);
                    binary(&will.payload, &mut body);
                }
                if let Some(username) = &self.username {
                    string(username, &mut body);
                }
                if let Some(password) = &self.password {
                    binary(password, &mut body);
                }
                packet(0x10, &body)
            }
        }

        pub fn publish(level: u8, topic: &str, qos: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
            let mut body = Vec::new();
            string(topic, &mut body);
            if qos > 0 {
                body.extend_from_slice(&7u16.to_be_bytes());
            }
            if level == 5 {
                properties(props, &mut body);
            }
            body.extend_from_slice(payload);
            packet(0x30 | (qos << 1), &body)
        }

        pub fn subscribe(level: u8, filters: &[(&str, u8)]) -> Vec<u8> {
            let mut body = 9u16.to_be_bytes().to_vec();
            if level == 5 {
                properties(&[0x0b, 0x05], &mut body); // subscription identifier
            }
            for (filter, options) in filters {
                string(filter, &mut body);
                body.push(*options);
            }
            packet(0x82, &body)
        }

        pub fn unsubscribe(level: u8, filters: &[&str]) -> Vec<u8> {
            let mut body = 10u16.to_be_bytes().to_vec();
            if level == 5 {
                properties(&[], &mut body);
            }
            for filter in filters {
                string(filter, &mut body);
            }
            packet(0xa2, &body)
        }
    }

    use build::Connect as C;

    const DEV: &str = "dev-1";

    fn device() -> Identity {
        Identity::Device(DEV.to_owned())
    }

    /// A CONNECT with everything: v5 properties, will, username, password.
    fn full_connect(level: u8, client_id: &str, will_topic: Option<&str>) -> C {
        let mut c = C::new(level, client_id);
        if level == 5 {
            c.properties = build::sample_properties();
        }
        c.will = will_topic.map(|topic| build::Will {
            properties: if level == 5 {
                // Will delay, payload format, correlation data.
                vec![0x18, 0, 0, 0, 5, 0x01, 1, 0x09, 0, 3, 1, 2, 3]
            } else {
                Vec::new()
            },
            topic: topic.to_owned(),
            payload: b"offline".to_vec(),
        });
        c.username = Some("?SDK=C&Version=4".to_owned());
        c.password = Some(vec![0, 0xff, 0x10]);
        c
    }

    fn feed_all(guard: &mut Guard, bytes: &[u8]) -> Result<Vec<u8>, Refusal> {
        let mut forward = Vec::new();
        guard.feed(bytes, &mut forward).map(|()| forward)
    }

    fn check_publish(identity: Identity, level: u8, topic: &str) -> Result<(), Refusal> {
        let packet = build::publish(level, topic, 1, &[], b"{}");
        let forward = feed_all(&mut Guard::new(identity, level), &packet)?;
        assert_eq!(forward, packet);
        Ok(())
    }

    fn check_subscribe(identity: Identity, level: u8, filter: &str) -> Result<(), Refusal> {
        let packet = build::subscribe(level, &[(filter, 1)]);
        let forward = feed_all(&mut Guard::new(identity, level), &packet)?;
        assert_eq!(forward, packet);
        Ok(())
    }

    #[test]
    fn device_connect_passes_unchanged() {
        for level in [4, 5] {
            let packet = full_connect(level, DEV, Some("idgate/v1/devices/dev-1/status")).encode();
            assert_eq!(admit_connect(&device(), &packet), Ok(packet.clone()));
            let plain = C::new(level, DEV).encode();
            assert_eq!(admit_connect(&device(), &plain), Ok(plain.clone()));
        }
    }

    #[test]
    fn device_connect_refusals() {
        for level in [4, 5] {
            for id in ["dev-2", "", "dev-1 ", "_anon.dev-1"] {
                let packet = C::new(level, id).encode();
                assert_eq!(
                    admit_connect(&device(), &packet),
                    Err(Refusal::ClientIdMismatch),
                    "{id:?}"
                );
            }
            for topic in [
                "idgate/v1/devices/dev-2/x",
                "idgate/v1/crl",
                "idgate/v1/devices/dev-1",
            ] {
                let packet = full_connect(level, DEV, Some(topic)).encode();
                assert_eq!(
                    admit_connect(&device(), &packet),
                    Err(Refusal::WillNotAllowed)
                );
            }
            let packet = full_connect(level, DEV, Some("idgate/v1/devices/dev-1/#")).encode();
            assert_eq!(admit_connect(&device(), &packet), Err(Refusal::Malformed));
            // An identity that is not a device id matches no client id.
            let odd = Identity::Device("a/+".to_owned());
            let packet = C::new(level, "a/+").encode();
            assert_eq!(admit_connect(&odd, &packet), Err(Refusal::ClientIdMismatch));
        }
    }

    #[test]
    fn anonymous_client_id_is_prefixed() {
        for level in [4, 5] {
            let mut connect = full_connect(level, "dev-1", None);
            let packet = connect.encode();
            let admitted = admit_connect(&Identity::Anonymous, &packet).unwrap();
            connect.client_id = "_anon.dev-1".to_owned();
            if level == 5 {
                // The sample's Session Expiry Interval (first property) is cleared.
                assert_eq!(connect.properties[0], 0x11);
                connect.properties[1..5].fill(0);
            }
            assert_eq!(admitted, connect.encode());
            let parsed = parse_connect(&admitted).unwrap();
            assert_eq!(parsed.client_id, "_anon.dev-1");
            assert!(parsed.will_topic.is_none());
        }
    }

    #[test]
    fn anonymous_sessions_are_always_clean() {
        for level in [4, 5] {
            let mut connect = C::new(level, "dev-1");
            connect.clean = false;
            let admitted = admit_connect(&Identity::Anonymous, &connect.encode()).unwrap();
            let parsed = parse_connect(&admitted).unwrap();
            assert!(parsed.clean_start, "level {level}");
            connect.clean = true;
            connect.client_id = "_anon.dev-1".to_owned();
            assert_eq!(
                admitted,
                connect.encode(),
                "only the id and the flag changed"
            );
        }
        // An MQTT 5 session expiry is cleared too (Clean Start alone would
        // not end the session).
        let mut connect = C::new(5, "dev-1");
        connect.properties = vec![0x11, 0, 0, 0x0e, 0x10];
        let admitted = admit_connect(&Identity::Anonymous, &connect.encode()).unwrap();
        assert!(!session_terms(&admitted).unwrap().persistent);
        connect.properties = vec![0x11, 0, 0, 0, 0];
        connect.client_id = "_anon.dev-1".to_owned();
        assert_eq!(
            admitted,
            connect.encode(),
            "only the id and the interval changed"
        );
        // A device keeps the session it asked for.
        let mut connect = C::new(4, "dev-1");
        connect.clean = false;
        let device = Identity::Device("dev-1".to_owned());
        let admitted = admit_connect(&device, &connect.encode()).unwrap();
        assert!(!parse_connect(&admitted).unwrap().clean_start);
    }

    #[test]
    fn subscriptions_are_capped_per_connection() {
        let mut guard = Guard::new(Identity::Anonymous, 4).with_max_subscriptions(3);
        let reply = |i: usize| format!("idgate/v1/devices/d-{i}/enroll/cbor/+");
        let mut forward = Vec::new();
        for i in 0..3 {
            guard
                .feed(
                    &build::subscribe(4, &[(reply(i).as_str(), 1)]),
                    &mut forward,
                )
                .unwrap();
        }
        // The same filter again takes no more room; unsubscribing frees it.
        guard
            .feed(
                &build::subscribe(4, &[(reply(0).as_str(), 1)]),
                &mut forward,
            )
            .unwrap();
        guard
            .feed(&build::unsubscribe(4, &[reply(0).as_str()]), &mut forward)
            .unwrap();
        guard
            .feed(
                &build::subscribe(4, &[(reply(3).as_str(), 1)]),
                &mut forward,
            )
            .unwrap();
        let before = forward.len();
        assert_eq!(
            guard.feed(
                &build::subscribe(4, &[(reply(4).as_str(), 1)]),
                &mut forward
            ),
            Err(Refusal::TooManySubscriptions(3))
        );
        assert_eq!(forward.len(), before, "nothing of it passed");
        assert_eq!(
            disconnect_packet(5, &Refusal::TooManySubscriptions(3)),
            Some(vec![0xe0, 2, 0x97, 0])
        );
        assert_eq!(taken_over_packet(4), None);
        assert_eq!(taken_over_packet(5), Some(vec![0xe0, 2, 0x8e, 0]));
    }

    #[test]
    fn session_terms_tell_stateful_sessions_apart() {
        let device = Identity::Device("dev-1".to_owned());
        for level in [4, 5] {
            // An anonymous client's id is the one the broker sees.
            let admitted =
                admit_connect(&Identity::Anonymous, &C::new(level, "x").encode()).unwrap();
            let terms = session_terms(&admitted).unwrap();
            assert_eq!(terms.client_id, "_anon.x");
            assert!(!terms.stateful);
            assert_eq!(terms.keep_alive, 60);

            let mut connect = C::new(level, "dev-1");
            assert!(!session_terms(&connect.encode()).unwrap().stateful);
            connect.clean = false;
            let terms = session_terms(&connect.encode()).unwrap();
            assert!(terms.stateful && terms.persistent);
            connect.clean = true;
            if level == 5 {
                // Clean Start with a Session Expiry Interval: kept after all.
                connect.properties = vec![0x11, 0, 0, 0, 60];
                assert!(session_terms(&connect.encode()).unwrap().persistent);
                connect.properties = vec![0x11, 0, 0, 0, 0];
                assert!(!session_terms(&connect.encode()).unwrap().persistent);
                connect.properties.clear();
            }
            connect.will = Some(build::Will {
                properties: Vec::new(),
                topic: "idgate/v1/devices/dev-1/status".to_owned(),
                payload: b"gone".to_vec(),
            });
            let admitted = admit_connect(&device, &connect.encode()).unwrap();
            let terms = session_terms(&admitted).unwrap();
            assert!(terms.stateful && !terms.persistent, "a will");
        }
        assert_eq!(session_terms(&[0x10, 0]), Err(Refusal::Malformed));
    }

    #[test]
    fn session_terms_carry_the_maximum_packet_size() {
        let mut connect = C::new(5, "x");
        assert_eq!(
            session_terms(&connect.encode()).unwrap().max_packet_size,
            None
        );
        // Among other properties, and kept through the anonymous rewrite.
        connect.properties = build::sample_properties();
        connect
            .properties
            .extend_from_slice(&[0x27, 0, 0, 0x04, 0x00]);
        let admitted = admit_connect(&Identity::Anonymous, &connect.encode()).unwrap();
        assert_eq!(
            session_terms(&admitted).unwrap().max_packet_size,
            Some(1024)
        );
        // Zero, or the property twice: a protocol error (0x82), not a
        // malformed packet (0x81).
        for (properties, why) in [
            (vec![0x27, 0, 0, 0, 0], "Maximum Packet Size 0"),
            (
                vec![0x27, 0, 0, 0x04, 0x00, 0x27, 0, 0, 0x04, 0x00],
                "a property given twice",
            ),
        ] {
            connect.properties = properties;
            assert_eq!(
                admit_connect(&Identity::Anonymous, &connect.encode()),
                Err(Refusal::ProtocolError(why))
            );
        }
    }

    /// Every CONNECT property value MQTT 5 calls a Protocol Error, and the
    /// values beside it that are fine.
    #[test]
    fn connect_property_values_that_are_protocol_errors() {
        let data = {
            let mut p = vec![0x16];
            build::binary(b"x", &mut p);
            p
        };
        let cases: [(&[u8], Option<&str>); 14] = [
            // Receive Maximum (§3.1.2.11.3).
            (&[0x21, 0, 0], Some("Receive Maximum 0")),
            (&[0x21, 0, 1], None),
            (&[0x21, 0xff, 0xff], None),
            // Request Response Information (§3.1.2.11.6).
            (&[0x19, 2], Some("Request Response Information not 0 or 1")),
            (
                &[0x19, 0xff],
                Some("Request Response Information not 0 or 1"),
            ),
            (&[0x19, 0], None),
            (&[0x19, 1], None),
            // Request Problem Information (§3.1.2.11.7).
            (&[0x17, 2], Some("Request Problem Information not 0 or 1")),
            (&[0x17, 0], None),
            (&[0x17, 1], None),
            // Topic Alias Maximum: any value, once (§3.1.2.11.5).
            (&[0x22, 0, 0], None),
            (&[0x22, 0, 5, 0x22, 0, 5], Some("a property given twice")),
            // Authentication Data only with a method (§3.1.2.11.10).
            (
                &data,
                Some("Authentication Data without Authentication Method"),
            ),
            // Maximum Packet Size (§3.1.2.11.4).
            (&[0x27, 0, 0, 0, 0], Some("Maximum Packet Size 0")),
        ];
        for (properties, error) in cases {
            let mut connect = C::new(5, DEV);
            connect.properties = properties.to_vec();
            let admitted = admit_connect(&device(), &connect.encode());
            match error {
                Some(why) => assert_eq!(
                    admitted,
                    Err(Refusal::ProtocolError(why)),
                    "{properties:02x?}"
                ),
                None => assert!(admitted.is_ok(), "{properties:02x?}"),
            }
        }
    }

    /// Every property identifier against every property block a client
    /// sends, as the table of MQTT 5 §2.2.2.2 has it: one not valid in its
    /// packet is malformed; one that is valid passes or, with the values
    /// below, is refused for another reason (a Subscription Identifier in
    /// PUBLISH, Authentication Data without a method), never as malformed.
    #[test]
    fn properties_valid_in_their_packet_only() {
        use Block::*;
        let blocks = [
            Connect,
            Will,
            Publish,
            Subscribe,
            Unsubscribe,
            Acknowledgement,
            Disconnect,
            Auth,
        ];
        let string = |id: u8, text: &str| {
            let mut p = vec![id];
            build::string(text, &mut p);
            p
        };
        let binary = {
            let mut p = vec![0x09];
            build::binary(&[1, 2], &mut p);
            p
        };
        let authentication_data = {
            let mut p = vec![0x16];
            build::binary(&[1, 2], &mut p);
            p
        };
        let user_property = [string(0x26, "k"), string(0, "v")[1..].to_vec()].concat();
        let rows: [(Vec<u8>, &[Block]); 31] = [
            (vec![0x01, 1], &[Publish, Will]),
            (vec![0x02, 0, 0, 0, 5], &[Publish, Will]),
            (string(0x03, "text/plain"), &[Publish, Will]),
            (string(0x08, "a/b"), &[Publish, Will]),
            (binary, &[Publish, Will]),
            (vec![0x0b, 5], &[Publish, Subscribe]),
            (vec![0x11, 0, 0, 0, 0], &[Connect, Disconnect]),
            (string(0x12, "id"), &[]),
            (vec![0x13, 0, 5], &[]),
            (string(0x15, "none"), &[Connect, Auth]),
            (authentication_data, &[Connect, Auth]),
            (vec![0x17, 1], &[Connect]),
            (vec![0x18, 0, 0, 0, 5], &[Will]),
            (vec![0x19, 1], &[Connect]),
            (string(0x1a, "info"), &[]),
            (string(0x1c, "other"), &[Disconnect]),
            (string(0x1f, "why"), &[Acknowledgement, Disconnect, Auth]),
            (vec![0x21, 0, 5], &[Connect]),
            (vec![0x22, 0, 5], &[Connect]),
            (vec![0x23, 0, 1], &[Publish]),
            (vec![0x24, 1], &[]),
            (vec![0x25, 1], &[]),
            (user_property, &blocks),
            (vec![0x27, 0, 0, 0x10, 0], &[Connect]),
            (vec![0x28, 1], &[]),
            (vec![0x29, 1], &[]),
            (vec![0x2a, 1], &[]),
            // Identifiers MQTT 5 does not define.
            (vec![0x00, 1], &[]),
            (vec![0x04, 1], &[]),
            (vec![0x2b, 1], &[]),
            (vec![0x80, 0x01, 1], &[]),
        ];
        let guarded = |first: u8, body: Vec<u8>| {
            let packet = build::packet(first, &body);
            feed_all(&mut Guard::new(device(), 5), &packet).map(|_| ())
        };
        for (property, allowed) in rows {
            for block in blocks {
                let result = match block {
                    Connect | Will => {
                        let mut connect = C::new(5, DEV);
                        if block == Connect {
                            connect.properties = property.clone();
                        } else {
                            connect.will = Some(build::Will {
                                properties: property.clone(),
                                topic: "idgate/v1/devices/dev-1/w".to_owned(),
                                payload: b"gone".to_vec(),
                            });
                        }
                        admit_connect(&device(), &connect.encode()).map(|_| ())
                    }
                    Publish => {
                        let topic = "idgate/v1/devices/dev-1/a";
                        let packet = build::publish(5, topic, 1, &property, b"x");
                        feed_all(&mut Guard::new(device(), 5), &packet).map(|_| ())
                    }
                    Subscribe | Unsubscribe => {
                        let mut body = 9u16.to_be_bytes().to_vec();
                        build::properties(&property, &mut body);
                        build::string(CRL_TOPIC, &mut body);
                        if block == Subscribe {
                            body.push(1);
                            guarded(0x82, body)
                        } else {
                            guarded(0xa2, body)
                        }
                    }
                    Acknowledgement => [0x40, 0x50, 0x62, 0x70]
                        .into_iter()
                        .map(|first| {
                            let mut body = vec![0, 7, 0];
                            build::properties(&property, &mut body);
                            guarded(first, body)
                        })
                        .find(Result::is_err)
                        .unwrap_or(Ok(())),
                    Disconnect | Auth => {
                        let mut body = vec![if block == Auth { 0x18 } else { 0 }];
                        build::properties(&property, &mut body);
                        guarded(if block == Auth { 0xf0 } else { 0xe0 }, body)
                    }
                };
                if allowed.contains(&block) {
                    assert_ne!(result, Err(Refusal::Malformed), "{block:?} {property:02x?}");
                } else {
                    assert_eq!(result, Err(Refusal::Malformed), "{block:?} {property:02x?}");
                }
            }
        }
    }

    /// Any Authentication Method asks for enhanced authentication, which
    /// the gateway does not support (MQTT 5 §4.12): CONNACK 0x8C.
    #[test]
    fn an_authentication_method_is_refused() {
        let method = |name: &str| {
            let mut p = vec![0x15];
            build::string(name, &mut p);
            p
        };
        let data = {
            let mut p = vec![0x16];
            build::binary(&[1, 2, 3], &mut p);
            p
        };
        let user_property = {
            let mut p = vec![0x26];
            build::string("k", &mut p);
            build::string("v", &mut p);
            p
        };
        let bad = Err(Refusal::BadAuthenticationMethod);
        let cases: [(Vec<u8>, Result<(), Refusal>); 6] = [
            (method("SCRAM-SHA-256"), bad.clone()),
            (
                [method("SCRAM-SHA-256"), data.clone()].concat(),
                bad.clone(),
            ),
            ([data.clone(), method("x")].concat(), bad.clone()),
            (method(""), bad.clone()),
            // Without a method: data alone is a protocol error
            // (§3.1.2.11.10); nothing at all, or other properties, pass.
            (
                data,
                Err(Refusal::ProtocolError(
                    "Authentication Data without Authentication Method",
                )),
            ),
            (user_property, Ok(())),
        ];
        for identity in [device(), Identity::Anonymous] {
            for (properties, expected) in &cases {
                let mut connect = C::new(5, DEV);
                connect.properties = properties.clone();
                let admitted = admit_connect(&identity, &connect.encode()).map(|_| ());
                assert_eq!(&admitted, expected, "{identity:?} {properties:02x?}");
            }
        }
        assert_eq!(
            connack_refusal(5, &Refusal::BadAuthenticationMethod),
            Some(vec![0x20, 3, 0, 0x8c, 0])
        );
    }

    #[test]
    fn a_property_given_twice_is_a_protocol_error() {
        let twice = Err(Refusal::ProtocolError("a property given twice"));
        // Any property but User Property, in CONNECT and in later packets.
        let mut connect = C::new(5, "x");
        connect.properties = build::sample_properties();
        connect.properties.extend_from_slice(&[0x21, 0, 20]); // receive maximum again
        assert_eq!(
            admit_connect(&Identity::Anonymous, &connect.encode()),
            twice
        );
        let mut guard = Guard::new(Identity::Anonymous, 5);
        let topic = "idgate/v1/devices/d-1/enroll/cbor";
        let publish = build::publish(5, topic, 0, &[0x01, 0, 0x01, 1], b"p");
        assert_eq!(feed_all(&mut guard, &publish), twice);
        // User Property, as often as the client likes.
        let mut properties = Vec::new();
        for _ in 0..3 {
            properties.push(0x26);
            build::string("k", &mut properties);
            build::string("v", &mut properties);
        }
        connect.properties = properties.clone();
        assert!(admit_connect(&Identity::Anonymous, &connect.encode()).is_ok());
        let publish = build::publish(5, topic, 0, &properties, b"p");
        let mut guard = Guard::new(Identity::Anonymous, 5);
        assert_eq!(feed_all(&mut guard, &publish), Ok(publish));
    }

    #[test]
    fn anonymous_rewrite_grows_the_remaining_length() {
        // A body of 125 bytes: the rewrite takes it past 127, so the remaining
        // length needs a second byte.
        let mut connect = C::new(4, "");
        connect.client_id = "x".repeat(125 - connect.encode().len() + 2);
        let packet = connect.encode();
        assert_eq!(packet[1], 125);
        let admitted = admit_connect(&Identity::Anonymous, &packet).unwrap();
        assert_eq!(&admitted[1..3], &[0x80 | (131 & 0x7f), 1]);
        connect.client_id = format!("_anon.{}", connect.client_id);
        assert_eq!(admitted, connect.encode());
    }

    #[test]
    fn anonymous_rewrite_of_a_non_minimal_length() {
        let packet = C::new(5, "abc").encode();
        let mut stretched = vec![0x10, packet[1] | 0x80, 0x80, 0x00];
        stretched.extend_from_slice(&packet[2..]);
        let admitted = admit_connect(&Identity::Anonymous, &stretched).unwrap();
        assert_eq!(admitted, C::new(5, "_anon.abc").encode());
        // Passed through unchanged for a device.
        let own = C::new(5, DEV).encode();
        let mut stretched = vec![0x10, own[1] | 0x80, 0x00];
        stretched.extend_from_slice(&own[2..]);
        assert_eq!(admit_connect(&device(), &stretched), Ok(stretched.clone()));
    }

    #[test]
    fn anonymous_empty_client_id_gets_a_random_one() {
        for level in [4, 5] {
            let admitted =
                admit_connect(&Identity::Anonymous, &C::new(level, "").encode()).unwrap();
            let parsed = parse_connect(&admitted).unwrap();
            let random = parsed.client_id.strip_prefix("_anon.").unwrap();
            assert_eq!(random.len(), 16);
            assert!(random.bytes().all(|b| b.is_ascii_hexdigit()));
            let mut persistent = C::new(level, "");
            persistent.clean = false;
            assert_eq!(
                admit_connect(&Identity::Anonymous, &persistent.encode()),
                Err(Refusal::ClientIdInvalid)
            );
        }
    }

    #[test]
    fn anonymous_may_not_set_a_will() {
        for level in [4, 5] {
            let packet = full_connect(level, "x", Some("idgate/v1/devices/x/y")).encode();
            assert_eq!(
                admit_connect(&Identity::Anonymous, &packet),
                Err(Refusal::WillNotAllowed)
            );
        }
    }

    #[test]
    fn anonymous_client_id_too_long_once_prefixed() {
        let mut connect = C::new(4, "");
        connect.client_id = "x".repeat(65_533);
        let packet = connect.encode();
        assert!(packet.len() <= MAX_PACKET);
        assert_eq!(
            admit_connect(&Identity::Anonymous, &packet),
            Err(Refusal::ClientIdInvalid)
        );
    }

    #[test]
    fn malformed_connects() {
        let good = C::new(4, DEV).encode();
        let mut cases: Vec<Vec<u8>> = Vec::new();
        // Wrong type, trailing byte, reserved flag, bad name.
        let mut wrong = good.clone();
        wrong[0] = 0x11;
        cases.push(wrong);
        let mut trailing = good.clone();
        trailing.push(0);
        trailing[1] += 1;
        cases.push(trailing);
        let mut extra = good.clone();
        extra.push(0);
        cases.push(extra);
        let mut reserved = good.clone();
        reserved[9] |= 0x01;
        cases.push(reserved);
        let mut name = good.clone();
        name[5] = b'X';
        cases.push(name);
        // Will QoS without a will; password without username (3.1.1).
        let mut will_qos = good.clone();
        will_qos[9] |= 0x08;
        cases.push(will_qos);
        let mut password = good.clone();
        password[9] |= 0x40;
        cases.push(password);
        // Invalid UTF-8 and NUL in the client id.
        let mut utf8 = good.clone();
        let at = good.len() - 1;
        utf8[at] = 0xff;
        cases.push(utf8);
        cases.push(C::new(4, "a\0b").encode());
        // An unknown v5 property.
        let mut unknown = C::new(5, DEV);
        unknown.properties = vec![0x7f, 0];
        cases.push(unknown.encode());
        cases.push(Vec::new());
        for (i, case) in cases.iter().enumerate() {
            for identity in [device(), Identity::Anonymous] {
                assert_eq!(
                    admit_connect(&identity, case),
                    Err(Refusal::Malformed),
                    "{i}"
                );
            }
        }
    }

    #[test]
    fn an_unsupported_protocol_level_is_refused_as_such() {
        // MQTT 3.1.1 §3.1.2.2: return code 1 then the close, whatever the
        // level; MQTT 3.1's own protocol name is just not MQTT.
        for level in [0, 3, 6, 0xff] {
            let mut connect = C::new(4, DEV).encode();
            connect[8] = level;
            let refusal = admit_connect(&device(), &connect).unwrap_err();
            assert_eq!(refusal, Refusal::UnsupportedLevel(level));
            assert_eq!(connack_refusal(level, &refusal), Some(vec![0x20, 2, 0, 1]));
        }
        let mut mqtt31 = Vec::new();
        build::string("MQIsdp", &mut mqtt31);
        mqtt31.extend_from_slice(&[3, 0x02, 0, 60]);
        build::string(DEV, &mut mqtt31);
        let mqtt31 = build::packet(0x10, &mqtt31);
        assert_eq!(admit_connect(&device(), &mqtt31), Err(Refusal::Malformed));
    }

    #[test]
    fn every_truncated_connect_is_refused() {
        for level in [4, 5] {
            for (identity, packet) in [
                (
                    device(),
                    full_connect(level, DEV, Some("idgate/v1/devices/dev-1/w")).encode(),
                ),
                (
                    Identity::Anonymous,
                    full_connect(level, "anything", None).encode(),
                ),
            ] {
                assert!(admit_connect(&identity, &packet).is_ok());
                for cut in 0..packet.len() {
                    assert!(admit_connect(&identity, &packet[..cut]).is_err(), "{cut}");
                }
            }
        }
    }

    #[test]
    fn connack_and_disconnect_bytes() {
        assert_eq!(
            connack_refusal(4, &Refusal::ClientIdMismatch),
            Some(vec![0x20, 2, 0, 2])
        );
        assert_eq!(
            connack_refusal(4, &Refusal::WillNotAllowed),
            Some(vec![0x20, 2, 0, 5])
        );
        // A malformed CONNECT: 3.1.1 closes without a CONNACK (§3.1.4).
        assert_eq!(connack_refusal(4, &Refusal::Malformed), None);
        assert_eq!(
            connack_refusal(5, &Refusal::ClientIdMismatch),
            Some(vec![0x20, 3, 0, 0x85, 0])
        );
        assert_eq!(
            connack_refusal(5, &Refusal::ClientIdInvalid),
            Some(vec![0x20, 3, 0, 0x85, 0])
        );
        assert_eq!(
            connack_refusal(5, &Refusal::WillNotAllowed),
            Some(vec![0x20, 3, 0, 0x87, 0])
        );
        assert_eq!(
            connack_refusal(5, &Refusal::Malformed),
            Some(vec![0x20, 3, 0, 0x81, 0])
        );
        assert_eq!(
            connack_refusal(5, &Refusal::TooLarge),
            Some(vec![0x20, 3, 0, 0x95, 0])
        );
        // A protocol error: MQTT 5 says so; 3.1.1 just closes.
        let protocol = Refusal::ProtocolError("a property given twice");
        assert_eq!(
            connack_refusal(5, &protocol),
            Some(vec![0x20, 3, 0, 0x82, 0])
        );
        assert_eq!(connack_refusal(4, &protocol), None);
        assert_eq!(
            disconnect_packet(5, &protocol),
            Some(vec![0xe0, 2, 0x82, 0])
        );
        assert_eq!(disconnect_packet(4, &protocol), None);
        assert_eq!(disconnect_packet(4, &Refusal::Malformed), None);
        assert_eq!(
            disconnect_packet(5, &Refusal::TopicNotAllowed("a".into())),
            Some(vec![0xe0, 2, 0x87, 0])
        );
        assert_eq!(
            disconnect_packet(5, &Refusal::FilterNotAllowed("a".into())),
            Some(vec![0xe0, 2, 0x87, 0])
        );
        assert_eq!(
            disconnect_packet(5, &Refusal::Malformed),
            Some(vec![0xe0, 2, 0x81, 0])
        );
    }

    #[test]
    fn device_publish() {
        for level in [4, 5] {
            for topic in [
                "idgate/v1/devices/dev-1/renew/cbor",
                "idgate/v1/devices/dev-1/telemetry/x/y",
                "idgate/v1/devices/dev-1/",
            ] {
                assert_eq!(check_publish(device(), level, topic), Ok(()), "{topic}");
            }
            for topic in [
                "idgate/v1/devices/dev-2/renew/cbor",
                "idgate/v1/devices/dev-10/renew/cbor",
                "idgate/v1/devices/dev-1",
                "idgate/v1/crl",
                "$SYS/x",
                "other",
            ] {
                assert_eq!(
                    check_publish(device(), level, topic),
                    Err(Refusal::TopicNotAllowed(topic.to_owned()))
                );
            }
            for topic in ["idgate/v1/devices/dev-1/+", "idgate/v1/devices/dev-1/#", ""] {
                assert_eq!(
                    check_publish(device(), level, topic),
                    Err(Refusal::Malformed)
                );
            }
        }
    }

    fn station() -> Identity {
        Identity::Station("st-1".to_owned())
    }

    #[test]
    fn station_connect_is_renamed_apart_from_devices() {
        for level in [4, 5] {
            let admitted = admit_connect(&station(), &C::new(level, "st-1").encode()).unwrap();
            assert_eq!(admitted, C::new(level, "_station.st-1").encode());
            assert_eq!(
                admit_connect(&station(), &C::new(level, "st-2").encode()),
                Err(Refusal::ClientIdMismatch)
            );
            assert_eq!(
                admit_connect(
                    &station(),
                    &full_connect(level, "st-1", Some("idgate/v1/stations/st-1/x")).encode()
                ),
                Err(Refusal::WillNotAllowed)
            );
        }
    }

    #[test]
    fn station_publishes_its_own_enroll_requests_only() {
        for level in [4, 5] {
            for topic in [
                "idgate/v1/stations/st-1/devices/dev-1/enroll/cbor",
                "idgate/v1/stations/st-1/devices/X_9.a/enroll/json",
            ] {
                assert_eq!(check_publish(station(), level, topic), Ok(()), "{topic}");
            }
            for topic in [
                "idgate/v1/stations/st-2/devices/dev-1/enroll/cbor",
                "idgate/v1/stations/st-1/devices/dev-1/renew/cbor",
                "idgate/v1/stations/st-1/devices/dev-1/enroll/cbor/accepted",
                "idgate/v1/stations/st-1/devices/-x/enroll/cbor",
                "idgate/v1/devices/dev-1/enroll/cbor",
                "idgate/v1/crl",
            ] {
                assert_eq!(
                    check_publish(station(), level, topic),
                    Err(Refusal::TopicNotAllowed(topic.to_owned())),
                    "{topic}"
                );
            }
            for filter in [
                "idgate/v1/stations/st-1/devices/+/enroll/+/+",
                "idgate/v1/stations/st-1/#",
                "idgate/v1/crl",
            ] {
                assert_eq!(
                    check_subscribe(station(), level, filter),
                    Ok(()),
                    "{filter}"
                );
            }
            for filter in [
                "idgate/v1/stations/+/devices/+/enroll/+/+",
                "idgate/v1/stations/st-2/#",
                "idgate/v1/devices/+/enroll/cbor/+",
                "#",
            ] {
                assert_eq!(
                    check_subscribe(station(), level, filter),
                    Err(Refusal::FilterNotAllowed(filter.to_owned())),
                    "{filter}"
                );
            }
        }
    }

    #[test]
    fn anonymous_publish() {
        for level in [4, 5] {
            for topic in [
                "idgate/v1/devices/dev-1/enroll/json",
                "idgate/v1/devices/X_9.a/renew/cbor",
            ] {
                assert_eq!(check_publish(Identity::Anonymous, level, topic), Ok(()));
            }
            for topic in [
                "idgate/v1/devices/dev-1/enroll/json/accepted",
                "idgate/v1/devices/dev-1/enroll/xml",
                "idgate/v1/devices/dev-1/revoke/json",
                "idgate/v1/devices/-x/enroll/json",
                "idgate/v1/devices/dev-1/enroll/json/",
                "idgate/v1/crl",
                "_anon.x",
            ] {
                assert_eq!(
                    check_publish(Identity::Anonymous, level, topic),
                    Err(Refusal::TopicNotAllowed(topic.to_owned())),
                    "{topic}"
                );
            }
            assert_eq!(
                check_publish(
                    Identity::Anonymous,
                    level,
                    "idgate/v1/devices/+/enroll/json"
                ),
                Err(Refusal::Malformed)
            );
        }
    }

    #[test]
    fn topic_alias() {
        let alias = [0x23, 0, 1];
        let named = build::publish(5, "idgate/v1/devices/dev-1/a", 0, &alias, b"x");
        assert_eq!(
            feed_all(&mut Guard::new(device(), 5), &named),
            Ok(named.clone())
        );
        let by_alias = build::publish(5, "", 0, &alias, b"x");
        assert_eq!(
            feed_all(&mut Guard::new(device(), 5), &by_alias),
            Err(Refusal::TopicNotAllowed(String::new()))
        );
        let bare = build::publish(5, "", 0, &[], b"x");
        assert_eq!(
            feed_all(&mut Guard::new(device(), 5), &bare),
            Err(Refusal::Malformed)
        );
    }

    /// Every property value after CONNECT that MQTT 5 calls a Protocol
    /// Error, and the values beside it that are fine.
    #[test]
    fn packet_property_values_that_are_protocol_errors() {
        let publish =
            |properties: &[u8]| build::publish(5, "idgate/v1/devices/dev-1/a", 1, properties, b"x");
        let subscribe = |properties: &[u8]| {
            let mut body = 9u16.to_be_bytes().to_vec();
            build::properties(properties, &mut body);
            build::string(CRL_TOPIC, &mut body);
            body.push(1);
            build::packet(0x82, &body)
        };
        let in_publish = "Subscription Identifier in a PUBLISH from a client";
        let cases: [(Vec<u8>, Option<&str>); 11] = [
            // Topic Alias (§3.3.2.3.4).
            (publish(&[0x23, 0, 0]), Some("Topic Alias 0")),
            (publish(&[0x23, 0, 1]), None),
            (publish(&[0x23, 0xff, 0xff]), None),
            // Subscription Identifier in a PUBLISH from a client (§3.3.4).
            (publish(&[0x0b, 1]), Some(in_publish)),
            (publish(&[0x0b, 0xff, 0xff, 0xff, 0x7f]), Some(in_publish)),
            (publish(&[0x0b, 0]), Some(in_publish)),
            // Subscription Identifier in SUBSCRIBE (§3.8.2.1.2): 1 to
            // 268,435,455.
            (subscribe(&[0x0b, 0]), Some("Subscription Identifier 0")),
            (
                subscribe(&[0x0b, 0x80, 0]),
                Some("Subscription Identifier 0"),
            ),
            (subscribe(&[0x0b, 1]), None),
            (subscribe(&[0x0b, 0xff, 0xff, 0xff, 0x7f]), None),
            (subscribe(&[]), None),
        ];
        for (packet, error) in cases {
            let fed = feed_all(&mut Guard::new(device(), 5), &packet);
            match error {
                Some(why) => {
                    assert_eq!(fed, Err(Refusal::ProtocolError(why)), "{packet:02x?}");
                    let refusal = fed.unwrap_err();
                    assert_eq!(disconnect_packet(5, &refusal), Some(vec![0xe0, 2, 0x82, 0]));
                }
                None => assert_eq!(fed, Ok(packet.clone()), "{packet:02x?}"),
            }
        }
    }

    #[test]
    fn device_subscribe() {
        for level in [4, 5] {
            for filter in [
                "idgate/v1/devices/dev-1/renew/cbor/+",
                "idgate/v1/devices/dev-1/#",
                "idgate/v1/devices/dev-1/+/json/accepted",
                "idgate/v1/crl",
            ] {
                assert_eq!(check_subscribe(device(), level, filter), Ok(()), "{filter}");
            }
            for filter in [
                "idgate/v1/devices/dev-2/#",
                "idgate/v1/devices/dev-10/#",
                "idgate/v1/devices/+/renew/cbor/+",
                "idgate/v1/devices/#",
                "idgate/v1/#",
                "#",
                "$share/g/idgate/v1/devices/dev-1/#",
                "$SYS/#",
                "idgate/v1/crl/x",
            ] {
                assert_eq!(
                    check_subscribe(device(), level, filter),
                    Err(Refusal::FilterNotAllowed(filter.to_owned())),
                    "{filter}"
                );
            }
            for filter in [
                "idgate/v1/devices/dev-1/#/x",
                "idgate/v1/devices/dev-1/a+",
                "",
            ] {
                assert_eq!(
                    check_subscribe(device(), level, filter),
                    Err(Refusal::Malformed),
                    "{filter}"
                );
            }
        }
    }

    #[test]
    fn anonymous_subscribe() {
        for level in [4, 5] {
            for filter in [
                "idgate/v1/devices/dev-1/enroll/json/accepted",
                "idgate/v1/devices/dev-1/renew/cbor/rejected",
                "idgate/v1/devices/dev-1/enroll/cbor/+",
                "idgate/v1/crl",
            ] {
                assert_eq!(check_subscribe(Identity::Anonymous, level, filter), Ok(()));
            }
            for filter in [
                "idgate/v1/devices/+/enroll/json/accepted",
                "idgate/v1/devices/dev-1/enroll/json/#",
                "idgate/v1/devices/dev-1/enroll/+/accepted",
                "idgate/v1/devices/dev-1/+/json/accepted",
                "idgate/v1/devices/dev-1/enroll/json",
                "idgate/v1/devices/dev-1/enroll/json/accepted/x",
                "idgate/v1/devices/dev-1/#",
                "$share/g/idgate/v1/devices/dev-1/enroll/json/accepted",
                "$share/g/idgate/v1/crl",
            ] {
                assert_eq!(
                    check_subscribe(Identity::Anonymous, level, filter),
                    Err(Refusal::FilterNotAllowed(filter.to_owned())),
                    "{filter}"
                );
            }
        }
    }

    #[test]
    fn every_filter_of_a_subscribe_is_checked() {
        let packet = build::subscribe(4, &[("idgate/v1/crl", 0), ("idgate/v1/devices/dev-2/#", 0)]);
        assert_eq!(
            feed_all(&mut Guard::new(device(), 4), &packet),
            Err(Refusal::FilterNotAllowed(
                "idgate/v1/devices/dev-2/#".into()
            ))
        );
    }

    #[test]
    fn subscription_options() {
        let filter = "idgate/v1/crl";
        // v5: no-local, retain as published, retain handling 2, QoS 2.
        let v5 = build::subscribe(5, &[(filter, 0b0010_1110)]);
        assert!(feed_all(&mut Guard::new(device(), 5), &v5).is_ok());
        for options in [0b0000_0011, 0b0011_0000, 0b0100_0000] {
            let packet = build::subscribe(5, &[(filter, options)]);
            assert_eq!(
                feed_all(&mut Guard::new(device(), 5), &packet),
                Err(Refusal::Malformed)
            );
        }
        for options in [0b0000_0011, 0b0000_0100] {
            let packet = build::subscribe(4, &[(filter, options)]);
            assert_eq!(
                feed_all(&mut Guard::new(device(), 4), &packet),
                Err(Refusal::Malformed)
            );
        }
        let empty = build::subscribe(4, &[]);
        assert_eq!(
            feed_all(&mut Guard::new(device(), 4), &empty),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn an_invalid_device_identity_may_do_nothing() {
        let odd = Identity::Device("a/+".to_owned());
        assert!(check_publish(odd.clone(), 4, "idgate/v1/devices/a/x").is_err());
        assert!(check_subscribe(odd.clone(), 4, "idgate/v1/devices/a/+/x").is_err());
        assert!(check_subscribe(odd, 4, "idgate/v1/crl").is_err());
    }

    #[test]
    fn control_packets() {
        for level in [4, 5] {
            let mut guard = Guard::new(device(), level);
            let mut stream = Vec::new();
            stream.extend_from_slice(&[0xc0, 0]); // PINGREQ
            stream.extend_from_slice(&[0x40, 2, 0, 7]); // PUBACK
            stream.extend_from_slice(&[0x50, 2, 0, 7]); // PUBREC
            stream.extend_from_slice(&[0x62, 2, 0, 7]); // PUBREL
            stream.extend_from_slice(&[0x70, 2, 0, 7]); // PUBCOMP
            stream.extend(build::unsubscribe(level, &["anything/#", "$SYS/x"]));
            stream.extend_from_slice(&[0xe0, 0]); // DISCONNECT
            assert_eq!(feed_all(&mut guard, &stream), Ok(stream.clone()));
        }
        // v5 acknowledgements with a reason and properties; AUTH.
        let mut stream = Vec::new();
        stream.extend_from_slice(&[0x40, 3, 0, 7, 0x10]);
        let mut puback = vec![0, 7, 0x10];
        build::properties(&[0x1f, 0, 2, b'n', b'o'], &mut puback);
        stream.extend(build::packet(0x40, &puback));
        stream.extend_from_slice(&[0xf0, 0]);
        stream.extend_from_slice(&[0xe0, 2, 0x04, 0]);
        assert_eq!(
            feed_all(&mut Guard::new(device(), 5), &stream),
            Ok(stream.clone())
        );
        // Refused: CONNECT again, server packets, reserved types, AUTH in
        // 3.1.1, wrong fixed flags, a 3.1.1 PUBACK with a reason code.
        let refused: [(u8, Vec<u8>); 14] = [
            (4, C::new(4, DEV).encode()),
            (5, vec![0x20, 2, 0, 0]),
            (4, vec![0x90, 3, 0, 1, 0]),
            (4, vec![0xb0, 2, 0, 1]),
            (4, vec![0xd0, 0]),
            (4, vec![0x00, 0]),
            (4, vec![0xf0, 0]),
            (4, vec![0xc1, 0]),
            (4, vec![0x60, 2, 0, 7]),
            (4, vec![0x80, 6, 0, 1, 0, 1, b'#', 0]),
            (4, vec![0x36, 4, 0, 1, b'a', 0]),
            (4, vec![0x40, 3, 0, 7, 0]),
            (4, vec![0xc0, 1, 0]),
            (4, vec![0x82, 6, 0, 0, 0, 1, b'#', 0]), // packet id 0
        ];
        for (level, packet) in refused {
            assert_eq!(
                feed_all(&mut Guard::new(device(), level), &packet),
                Err(Refusal::Malformed),
                "{packet:02x?}"
            );
        }
    }

    /// A stream of allowed packets of every kind, one of them large.
    fn allowed_stream(level: u8) -> Vec<u8> {
        let mut stream = Vec::new();
        stream.extend(build::subscribe(level, &[("idgate/v1/devices/dev-1/#", 1)]));
        stream.extend(build::publish(
            level,
            "idgate/v1/devices/dev-1/renew/cbor",
            1,
            &[],
            &[7; 300],
        ));
        stream.extend_from_slice(&[0xc0, 0]);
        stream.extend(build::publish(
            level,
            "idgate/v1/devices/dev-1/big",
            0,
            &[0x01, 1],
            &vec![0xa5; 40_000],
        ));
        stream.extend_from_slice(&[0x40, 2, 0, 7]);
        stream.extend(build::unsubscribe(level, &["idgate/v1/devices/dev-1/#"]));
        stream.extend(build::publish(
            level,
            "idgate/v1/devices/dev-1/x",
            0,
            &[],
            b"",
        ));
        stream
    }

    #[test]
    fn framing_is_independent_of_split_points() {
        let mut rng = StdRng::seed_from_u64(0x1d6a7e);
        for level in [4, 5] {
            let stream = allowed_stream(level);
            assert_eq!(
                feed_all(&mut Guard::new(device(), level), &stream),
                Ok(stream.clone())
            );

            let mut guard = Guard::new(device(), level);
            let mut forward = Vec::new();
            for byte in &stream {
                guard
                    .feed(std::slice::from_ref(byte), &mut forward)
                    .unwrap();
            }
            assert_eq!(forward, stream);
            assert!(guard.pending.is_empty());

            for _ in 0..50 {
                let mut guard = Guard::new(device(), level);
                let mut forward = Vec::new();
                let mut rest = stream.as_slice();
                while !rest.is_empty() {
                    let n = rng.gen_range(0..=rest.len().min(3000));
                    let (chunk, tail) = rest.split_at(n);
                    guard.feed(chunk, &mut forward).unwrap();
                    rest = tail;
                }
                assert_eq!(forward, stream);
            }
        }
    }

    #[test]
    fn partial_packets_are_held_back() {
        let packet = build::publish(4, "idgate/v1/devices/dev-1/x", 0, &[], b"payload");
        let mut guard = Guard::new(device(), 4);
        let mut forward = Vec::new();
        guard
            .feed(&packet[..packet.len() - 1], &mut forward)
            .unwrap();
        assert!(forward.is_empty());
        guard
            .feed(&packet[packet.len() - 1..], &mut forward)
            .unwrap();
        assert_eq!(forward, packet);
    }

    #[test]
    fn a_refusal_is_final() {
        let allowed = build::publish(4, "idgate/v1/devices/dev-1/x", 0, &[], b"a");
        let refused = build::publish(4, "idgate/v1/devices/dev-2/x", 0, &[], b"b");
        let mut stream = allowed.clone();
        stream.extend(&refused);
        stream.extend(&allowed);
        let mut guard = Guard::new(device(), 4);
        let mut forward = Vec::new();
        let refusal = Refusal::TopicNotAllowed("idgate/v1/devices/dev-2/x".into());
        assert_eq!(guard.feed(&stream, &mut forward), Err(refusal.clone()));
        assert_eq!(forward, allowed);
        assert_eq!(guard.feed(&allowed, &mut forward), Err(refusal));
        assert_eq!(forward, allowed);
    }

    #[test]
    fn oversized_packets() {
        // Refused as soon as the fixed header announces too much.
        let mut header = vec![0x30];
        build::varint(MAX_PACKET, &mut header);
        assert_eq!(
            feed_all(&mut Guard::new(device(), 4), &header),
            Err(Refusal::TooLarge)
        );
        // The largest packet passes, one byte more does not.
        let topic = "idgate/v1/devices/dev-1/big";
        // The remaining length takes 3 bytes instead of 1.
        let overhead = build::publish(4, topic, 0, &[], b"").len() + 2;
        let largest = build::publish(4, topic, 0, &[], &vec![0; MAX_PACKET - overhead]);
        assert_eq!(largest.len(), MAX_PACKET);
        assert_eq!(
            feed_all(&mut Guard::new(device(), 4), &largest),
            Ok(largest.clone())
        );
        let larger = build::publish(4, topic, 0, &[], &vec![0; MAX_PACKET - overhead + 1]);
        assert_eq!(
            feed_all(&mut Guard::new(device(), 4), &larger[..10]),
            Err(Refusal::TooLarge)
        );
        let connect = vec![0x10; MAX_PACKET + 1];
        assert_eq!(admit_connect(&device(), &connect), Err(Refusal::TooLarge));
    }

    #[test]
    fn remaining_length_encodings() {
        // Non-minimal: tolerated. Five bytes: malformed.
        let stretched = [0xc0, 0x80, 0x80, 0x00];
        assert_eq!(
            feed_all(&mut Guard::new(device(), 4), &stretched),
            Ok(stretched.to_vec())
        );
        let five = [0xc0, 0x80, 0x80, 0x80, 0x80, 0x00];
        assert_eq!(
            feed_all(&mut Guard::new(device(), 4), &five),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn long_topics_are_quoted_short() {
        let topic = format!("é{}", "x".repeat(500));
        let Err(Refusal::TopicNotAllowed(quote)) = check_publish(device(), 4, &topic) else {
            panic!("not refused");
        };
        assert!(quote.len() <= MAX_QUOTED + '…'.len_utf8());
        assert!(quote.starts_with('é') && quote.ends_with('…'));
    }

    /// Valid packets of every kind, for truncation and mutation.
    fn corpus() -> Vec<Vec<u8>> {
        let mut corpus = Vec::new();
        for level in [4, 5] {
            corpus.push(full_connect(level, DEV, Some("idgate/v1/devices/dev-1/w")).encode());
            corpus.push(full_connect(level, "x", None).encode());
            corpus.push(build::publish(
                level,
                "idgate/v1/devices/dev-1/a",
                2,
                &[0x23, 0, 1],
                b"p",
            ));
            corpus.push(build::publish(
                level,
                "idgate/v1/devices/x/enroll/json",
                1,
                &[0x26, 0, 1, b'k', 0, 1, b'v'],
                b"{}",
            ));
            corpus.push(build::subscribe(
                level,
                &[
                    ("idgate/v1/crl", 1),
                    ("idgate/v1/devices/x/enroll/json/+", 0),
                ],
            ));
            corpus.push(build::unsubscribe(level, &["a", "b"]));
        }
        corpus
    }

    /// Runs untrusted bytes through every entry point; only panics matter.
    fn exercise(bytes: &[u8]) {
        for identity in [device(), Identity::Anonymous, station()] {
            if let Ok(admitted) = admit_connect(&identity, bytes) {
                assert!(parse_connect(&admitted).is_ok());
            }
            for level in [4, 5] {
                let mut guard = Guard::new(identity.clone(), level);
                let mut forward = Vec::new();
                let _ = guard.feed(bytes, &mut forward);
                assert!(bytes.starts_with(&forward));
            }
        }
    }

    #[test]
    fn untrusted_bytes_never_panic() {
        let corpus = corpus();
        for packet in &corpus {
            for cut in 0..=packet.len() {
                exercise(&packet[..cut]);
                exercise(&packet[cut..]);
            }
        }
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..5_000 {
            let len = rng.gen_range(0..80);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            // Mostly plausible first bytes, so parsing gets past the header.
            if let Some(first) = bytes.first_mut() {
                *first = [0x10, 0x30, 0x32, 0x82, 0xa2, 0x40, 0xe0, *first][rng.gen_range(0..8)];
            }
            exercise(&bytes);
        }
        for _ in 0..5_000 {
            let mut bytes = corpus[rng.gen_range(0..corpus.len())].clone();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.r#gen();
            }
            exercise(&bytes);
        }
    }
}
