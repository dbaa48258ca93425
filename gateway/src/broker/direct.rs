//! Direct delivery of the service's replies to the device connections that
//! wait for them, without a subscription in rumqttd.
//!
//! rumqttd matches the topic of every publish it has not seen before against
//! **every** topic filter it holds, one by one (and keeps the filters after
//! the subscribers are gone). Each enrolling device subscribes to reply
//! topics of its own, so with rumqttd routing the replies, every enrollment
//! cost time proportional to the number of devices that ever subscribed: at
//! 3,000 devices that matching was 60 % of the gateway's CPU, at 12,000 94 %
//! (docs/performance.md).
//!
//! So the front answers a SUBSCRIBE whose filters are all reply topics
//! (`…/{op}/{format}/accepted`, `…/rejected`, or `…/{op}/{format}/+`) itself,
//! and records the filters here; the service's replies are handed to those
//! connections directly, as QoS 0 publishes (which is what rumqttd delivered
//! them as, the service publishing at QoS 0), and still published to rumqttd
//! for anyone subscribed there. Everything else — other filters, mixed
//! SUBSCRIBE packets, MQTT 5 subscriptions with properties — goes to rumqttd
//! as before. Only routing changes: the guard has already allowed the packet.
//!
//! Requests take the same short cut the other way: a PUBLISH on a topic the
//! service subscribes to ([`super::REQUEST_FILTERS`]) is handed to the
//! service here, and a QoS 1 one acknowledged here, instead of crossing the
//! loopback link, rumqttd's connection task and its router thread. rumqttd
//! still gets the requests and replies some client subscribed to *through it*
//! (a device subscribed to `idgate/v1/devices/{id}/#` sees its own traffic
//! as before): every filter sent to rumqttd that could match a device's or a
//! station's topics is recorded by the prefix it names ([`DirectRoutes::
//! broker_wants`]), and those topics keep going through rumqttd.
//!
//! With both short cuts, a connection that only enrolls or renews never needs
//! rumqttd at all; the front then opens its rumqttd link only when the client
//! sends something else (see `front`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use idgate_pki::protocol::Topic;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Message, REQUEST_FILTERS};

/// Packets waiting for one connection (SUBACKs, replies); beyond this a
/// reply to a connection that does not read is dropped, as QoS 0 allows.
pub const QUEUE: usize = 64;

/// A request the service takes directly, and the PUBACK owed for it (QoS
/// 1). The PUBACK tells the client that the gateway has the request, so it
/// is sent only once the service has it (see `front`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request.
    pub message: Message,
    /// The PUBACK to send once the service has the request.
    pub puback: Option<Vec<u8>>,
}

/// A connection waiting for replies.
#[derive(Debug)]
struct Route {
    connection: u64,
    level: u8,
    /// The client's MQTT 5 Maximum Packet Size, if it set one.
    max_packet_size: Option<u32>,
    sender: mpsc::Sender<Vec<u8>>,
}

/// The reply filters of every connection, by filter, and what rumqttd has
/// been asked to route.
#[derive(Debug, Default)]
pub struct DirectRoutes {
    routes: Mutex<HashMap<String, Vec<Route>>>,
    next_connection: AtomicU64,
    /// Topic prefixes (`idgate/v1/devices/{id}/`, `idgate/v1/stations/{id}/`)
    /// under which a connection holds (or held) a subscription in rumqttd,
    /// with how many connections; the empty prefix stands for a filter that
    /// spans devices.
    broker_interest: Mutex<HashMap<String, usize>>,
    /// Client ids whose last session rumqttd may still keep (Clean Session
    /// 0, or an MQTT 5 session expiry).
    persistent_clients: Mutex<HashSet<String>>,
    /// Replies not sent because they exceed the Maximum Packet Size of the
    /// connection waiting for them.
    oversize_replies: AtomicU64,
}

impl DirectRoutes {
    /// Hands a reply to every connection subscribed to `topic` directly;
    /// returns how many took it.
    ///
    /// A reply larger than a connection's Maximum Packet Size is not sent to
    /// it: the server "MUST discard it without sending it and then behave as
    /// if it had completed sending that Application Message" (MQTT 5
    /// §3.1.2.11.4). It is counted ([`DirectRoutes::oversize_replies`]) and
    /// logged, since the device will never see its answer.
    pub fn deliver(&self, topic: &str, payload: &[u8]) -> usize {
        let Some(parsed) = Topic::parse(topic).filter(|t| t.reply.is_some()) else {
            return 0;
        };
        let wildcard = format!(
            "{}/+",
            Topic {
                reply: None,
                ..parsed
            }
        );
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut delivered = 0;
        for filter in [topic, wildcard.as_str()] {
            for route in routes.get(filter).into_iter().flatten() {
                let packet = publish_packet(route.level, topic, payload);
                if let Some(limit) = route.max_packet_size
                    && packet.len() > usize::try_from(limit).unwrap_or(usize::MAX)
                {
                    self.oversize_replies.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        device_id = parsed.device_id,
                        connection = route.connection,
                        size = packet.len(),
                        max_packet_size = limit,
                        "reply dropped: larger than the client's Maximum Packet Size"
                    );
                    continue;
                }
                match route.sender.try_send(packet) {
                    Ok(()) => delivered += 1,
                    Err(e) => debug!(connection = route.connection, error = %e, "reply dropped"),
                }
            }
        }
        delivered
    }

    fn add(&self, filter: &str, route: Route) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let list = routes.entry(filter.to_owned()).or_default();
        if !list.iter().any(|r| r.connection == route.connection) {
            list.push(route);
        }
    }

    fn remove(&self, filter: &str, connection: u64) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = routes.get_mut(filter) {
            list.retain(|r| r.connection != connection);
            if list.is_empty() {
                routes.remove(filter);
            }
        }
    }

    /// Filters held, all connections together.
    pub fn filters(&self) -> usize {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Replies dropped so far because they exceed the Maximum Packet Size
    /// of a connection waiting for them.
    pub fn oversize_replies(&self) -> u64 {
        self.oversize_replies.load(Ordering::Relaxed)
    }

    /// Whether a subscription held in rumqttd could match `topic`: then a
    /// request on it goes through rumqttd, and a reply on it is published
    /// there too.
    pub fn broker_wants(&self, topic: &str) -> bool {
        let interest = self
            .broker_interest
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if interest.is_empty() {
            return false;
        }
        interest.contains_key("") || topic_prefix(topic).is_some_and(|p| interest.contains_key(p))
    }

    /// Notes how `client_id` connects; returns whether rumqttd may still
    /// hold a persistent session of it from an earlier connection (which a
    /// clean connection must then reach rumqttd to discard, MQTT 3.1.2-6).
    pub fn note_session(&self, client_id: &str, persistent: bool) -> bool {
        let mut clients = self
            .persistent_clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if persistent {
            !clients.insert(client_id.to_owned())
        } else {
            clients.remove(client_id)
        }
    }

    fn add_interest(&self, prefix: &str) {
        let mut interest = self
            .broker_interest
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *interest.entry(prefix.to_owned()).or_default() += 1;
    }

    fn remove_interest(&self, prefix: &str) {
        let mut interest = self
            .broker_interest
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = interest.get_mut(prefix) {
            *count -= 1;
            if *count == 0 {
                interest.remove(prefix);
            }
        }
    }
}

/// The device or station prefix of a topic under `idgate/v1/`
/// (`idgate/v1/devices/{id}/`), if it has one.
fn topic_prefix(topic: &str) -> Option<&str> {
    const ROOT: &str = "idgate/v1/";
    let rest = topic.strip_prefix(ROOT)?;
    let (kind, after) = rest.split_once('/')?;
    if !matches!(kind, "devices" | "stations") {
        return None;
    }
    let (id, _) = after.split_once('/')?;
    topic.get(..ROOT.len() + kind.len() + 1 + id.len() + 1)
}

/// What a filter sent to rumqttd may match among device and station topics:
/// nothing (`None`), the topics under one prefix, or (the empty prefix) any.
fn filter_interest(filter: &str) -> Option<String> {
    let levels: Vec<&str> = filter.splitn(5, '/').collect();
    let wildcard = |level: &str| level == "+" || level == "#";
    for (i, expected) in ["idgate", "v1"].into_iter().enumerate() {
        match levels.get(i) {
            Some(&level) if level == expected => {}
            Some(&level) if wildcard(level) => return Some(String::new()),
            _ => return None,
        }
    }
    match levels.get(2) {
        Some(&("devices" | "stations")) => {}
        Some(&level) if wildcard(level) => return Some(String::new()),
        _ => return None,
    }
    match (levels.get(3), levels.get(4)) {
        (Some(&id), _) if wildcard(id) => Some(String::new()),
        // `idgate/v1/devices/{id}` alone names no request or reply topic.
        (Some(&id), Some(_)) => Some(format!("idgate/v1/{}/{id}/", levels[2])),
        _ => None,
    }
}

/// Whether the service subscribes to `topic` (one of [`REQUEST_FILTERS`]).
fn is_service_topic(topic: &str) -> bool {
    REQUEST_FILTERS
        .iter()
        .any(|filter| matches_filter(filter, topic))
}

/// MQTT topic matching for filters whose wildcards are whole levels.
fn matches_filter(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether `filter` names replies only: a reply topic, or a request topic
/// followed by `/+`.
fn is_reply_filter(filter: &str) -> bool {
    if let Some(prefix) = filter.strip_suffix("/+") {
        return Topic::parse(prefix).is_some_and(|t| t.reply.is_none());
    }
    Topic::parse(filter).is_some_and(|t| t.reply.is_some())
}

/// One connection's direct routing: its reply subscriptions and what it
/// has sent to rumqttd. Dropping it removes its routes.
#[derive(Debug)]
pub struct ConnectionRoutes<'a> {
    routes: &'a DirectRoutes,
    connection: u64,
    level: u8,
    max_packet_size: Option<u32>,
    sender: mpsc::Sender<Vec<u8>>,
    filters: HashSet<String>,
    /// Prefixes this connection added to [`DirectRoutes::broker_interest`].
    interest: HashSet<String>,
    /// QoS 1 PUBLISHes sent to rumqttd that it has not acknowledged yet.
    broker_acks: Arc<AtomicUsize>,
    /// A QoS 2 PUBLISH went to rumqttd: its flow is rumqttd's from then on.
    qos2_to_broker: bool,
    /// A session rumqttd keeps beyond the connection: everything goes to
    /// rumqttd (it must hold the subscriptions and queue what arrives while
    /// the client is away), and the interest stays after the connection.
    persistent: bool,
}

impl<'a> ConnectionRoutes<'a> {
    /// A connection speaking MQTT protocol `level` (4: 3.1.1, 5), whose
    /// direct packets go to `sender`; `persistent` if rumqttd keeps its
    /// session beyond the connection.
    pub fn new(
        routes: &'a DirectRoutes,
        level: u8,
        sender: mpsc::Sender<Vec<u8>>,
        persistent: bool,
    ) -> ConnectionRoutes<'a> {
        ConnectionRoutes {
            routes,
            connection: routes.next_connection.fetch_add(1, Ordering::Relaxed),
            level,
            max_packet_size: None,
            sender,
            filters: HashSet::new(),
            interest: HashSet::new(),
            broker_acks: Arc::default(),
            qos2_to_broker: false,
            persistent,
        }
    }

    /// Replies larger than `limit` bytes (the client's MQTT 5 Maximum
    /// Packet Size, if it set one) are not sent to this connection.
    pub fn with_max_packet_size(mut self, limit: Option<u32>) -> ConnectionRoutes<'a> {
        self.max_packet_size = limit;
        self
    }

    /// The count of QoS 1 PUBLISHes waiting for rumqttd's PUBACK; the
    /// broker → client side takes one off for every PUBACK it relays
    /// ([`Boundaries::advance`] counts them).
    pub fn broker_acks(&self) -> Arc<AtomicUsize> {
        self.broker_acks.clone()
    }

    /// Takes the complete packets the guard let through (`packets`): a
    /// SUBSCRIBE or UNSUBSCRIBE of reply filters only is answered here, the
    /// answers appended to `answers`; a request the service subscribes to
    /// is appended to `requests`, with its PUBACK if it is QoS 1 (in the
    /// order of the PUBLISHes); everything else is appended to `to_broker`
    /// unchanged and in order.
    pub fn route(
        &mut self,
        packets: &[u8],
        to_broker: &mut Vec<u8>,
        answers: &mut Vec<Vec<u8>>,
        requests: &mut Vec<Request>,
    ) {
        let mut rest = packets;
        while !rest.is_empty() {
            let Some((header, length)) = fixed_header(rest) else {
                // Not a whole packet: the guard never does this; pass it on.
                to_broker.extend_from_slice(rest);
                return;
            };
            let end = header + length;
            let (packet, tail) = rest.split_at(end);
            rest = tail;
            if packet[0] >> 4 == 14 {
                // DISCONNECT: the client sends nothing after it (MQTT
                // 3.14.4); whatever followed in the same read is dropped.
                to_broker.extend_from_slice(packet);
                return;
            }
            let body = &packet[header..];
            let answer = match packet[0] {
                _ if self.persistent => None,
                0x82 => self.subscribe(body),
                0xa2 => self.unsubscribe(body),
                first if first >> 4 == 3 => match self.request(first, body) {
                    Some(request) => {
                        requests.push(request);
                        continue;
                    }
                    None => None,
                },
                _ => None,
            };
            match answer {
                Some(answer) => answers.push(answer),
                None => {
                    self.note_to_broker(packet[0], body);
                    to_broker.extend_from_slice(packet);
                }
            }
        }
    }

    /// Notes what a packet going to rumqttd commits the connection to:
    /// an acknowledgement to wait for, or subscriptions it must route.
    fn note_to_broker(&mut self, first: u8, body: &[u8]) {
        match first >> 4 {
            3 => match (first >> 1) & 3 {
                1 => {
                    self.broker_acks.fetch_add(1, Ordering::AcqRel);
                }
                2 => self.qos2_to_broker = true,
                _ => {}
            },
            8 => {
                // Filters we cannot read (the guard checked them, so this
                // does not happen) count as matching everything.
                let interest = match subscribe_filters(self.level, body) {
                    Some(filters) => filters.into_iter().filter_map(filter_interest).collect(),
                    None => vec![String::new()],
                };
                for prefix in interest {
                    if self.interest.insert(prefix.clone()) {
                        self.routes.add_interest(&prefix);
                    }
                }
            }
            _ => {}
        }
    }

    /// A PUBLISH the service takes directly: QoS 0 or 1, not retained, on a
    /// request topic nobody subscribed to through rumqttd; with the PUBACK
    /// of a QoS 1 one. A QoS 1 request waits its turn in rumqttd while
    /// rumqttd owes the client an acknowledgement, so that PUBACKs still
    /// come in the order of the PUBLISHes (MQTT 3.1.1 §4.6).
    fn request(&self, first: u8, body: &[u8]) -> Option<Request> {
        let qos = (first >> 1) & 3;
        if first & 1 != 0 || qos > 1 {
            return None;
        }
        if qos == 1 && (self.qos2_to_broker || self.broker_acks.load(Ordering::Acquire) > 0) {
            return None;
        }
        let (topic, mut rest) = string(body)?;
        let mut id = None;
        if qos == 1 {
            let (packet_id, tail) = rest.split_first_chunk::<2>()?;
            id = Some(*packet_id);
            rest = tail;
        }
        if self.level == 5 {
            let (length, tail) = variable_integer(rest)?;
            rest = tail.get(length..)?;
        }
        if !is_service_topic(topic) || self.routes.broker_wants(topic) {
            return None;
        }
        let message = Message {
            topic: topic.to_owned(),
            payload: rest.to_vec(),
            retain: false,
        };
        // PUBACK, success; MQTT 5 allows leaving out the reason code.
        let puback = id.map(|id| vec![0x40, 0x02, id[0], id[1]]);
        Some(Request { message, puback })
    }

    /// The SUBACK for a SUBSCRIBE body of reply filters only; `None` leaves
    /// the packet to rumqttd.
    fn subscribe(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let (id, mut r) = self.start(body)?;
        let mut filters = Vec::new();
        while !r.is_empty() {
            let (filter, tail) = string(r)?;
            let (&options, tail) = tail.split_first()?;
            r = tail;
            if !is_reply_filter(filter) {
                return None;
            }
            filters.push((filter, options & 3));
        }
        if filters.is_empty() {
            return None;
        }
        for (filter, _) in &filters {
            let route = Route {
                connection: self.connection,
                level: self.level,
                max_packet_size: self.max_packet_size,
                sender: self.sender.clone(),
            };
            self.routes.add(filter, route);
            self.filters.insert((*filter).to_owned());
        }
        // Replies are published at QoS 0; the granted QoS is what was asked,
        // as rumqttd grants it.
        let codes: Vec<u8> = filters.iter().map(|(_, qos)| *qos).collect();
        Some(self.ack(0x90, id, &codes))
    }

    /// The UNSUBACK for an UNSUBSCRIBE of direct filters only.
    fn unsubscribe(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let (id, mut r) = self.start(body)?;
        let mut filters = Vec::new();
        while !r.is_empty() {
            let (filter, tail) = string(r)?;
            r = tail;
            if !self.filters.contains(filter) {
                return None;
            }
            filters.push(filter);
        }
        if filters.is_empty() {
            return None;
        }
        for filter in &filters {
            self.routes.remove(filter, self.connection);
            self.filters.remove(*filter);
        }
        let codes = vec![0u8; filters.len()];
        Some(self.ack(0xb0, id, if self.level == 5 { &codes } else { &[] }))
    }

    /// The packet id and the rest of a (UN)SUBSCRIBE body; MQTT 5 packets
    /// with properties are left to rumqttd (a subscription identifier would
    /// have to be sent back with every reply).
    fn start<'b>(&self, body: &'b [u8]) -> Option<([u8; 2], &'b [u8])> {
        let (id, rest) = body.split_first_chunk::<2>()?;
        if self.level == 5 {
            let (&properties, rest) = rest.split_first()?;
            return (properties == 0).then_some((*id, rest));
        }
        Some((*id, rest))
    }

    fn ack(&self, kind: u8, id: [u8; 2], codes: &[u8]) -> Vec<u8> {
        let properties = usize::from(self.level == 5);
        let mut packet = vec![kind];
        remaining_length(2 + properties + codes.len(), &mut packet);
        packet.extend_from_slice(&id);
        if properties == 1 {
            packet.push(0);
        }
        packet.extend_from_slice(codes);
        packet
    }
}

impl Drop for ConnectionRoutes<'_> {
    fn drop(&mut self) {
        for filter in &self.filters {
            self.routes.remove(filter, self.connection);
        }
        // rumqttd keeps a persistent session's subscriptions: so does the
        // interest (an over-estimate once the session ends: some replies
        // are then published to rumqttd for nobody).
        if !self.persistent {
            for prefix in &self.interest {
                self.routes.remove_interest(prefix);
            }
        }
    }
}

/// The filters of a SUBSCRIBE body at protocol `level`.
fn subscribe_filters(level: u8, body: &[u8]) -> Option<Vec<&str>> {
    let (_, mut rest) = body.split_first_chunk::<2>()?;
    if level == 5 {
        let (length, tail) = variable_integer(rest)?;
        rest = tail.get(length..)?;
    }
    let mut filters = Vec::new();
    while !rest.is_empty() {
        let (filter, tail) = string(rest)?;
        rest = tail.get(1..)?;
        filters.push(filter);
    }
    Some(filters)
}

/// An MQTT variable byte integer and what follows it.
fn variable_integer(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

/// A QoS 0 PUBLISH of `payload` on `topic` for protocol `level`.
fn publish_packet(level: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let properties = usize::from(level == 5);
    let length = 2 + topic.len() + properties + payload.len();
    let mut packet = Vec::with_capacity(5 + length);
    packet.push(0x30);
    remaining_length(length, &mut packet);
    // Topics here are parsed reply topics, far below 64 KiB.
    packet.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_be_bytes());
    packet.extend_from_slice(topic.as_bytes());
    if properties == 1 {
        packet.push(0);
    }
    packet.extend_from_slice(payload);
    packet
}

/// Appends `length` as an MQTT "remaining length" (7 bits a byte, low
/// first, high bit set on all but the last).
pub(crate) fn remaining_length(mut length: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            return;
        }
    }
}

/// The header length and remaining length of the packet at the start of
/// `bytes`, if it is all there.
fn fixed_header(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut length = 0usize;
    for i in 1..5 {
        let byte = *bytes.get(i)?;
        length |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return (bytes.len() >= i + 1 + length).then_some((i + 1, length));
        }
    }
    None
}

/// An MQTT string (2-byte length, UTF-8) and what follows it.
fn string(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (length, rest) = bytes.split_first_chunk::<2>()?;
    let length = usize::from(u16::from_be_bytes(*length));
    if rest.len() < length {
        return None;
    }
    let (text, rest) = rest.split_at(length);
    Some((std::str::from_utf8(text).ok()?, rest))
}

/// What a connection without a rumqttd link does with packets that would go
/// to rumqttd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// Only PINGREQs: answered (PINGRESPs appended to the answers).
    Answered,
    /// The client said DISCONNECT (after PINGREQs, answered).
    Disconnect,
    /// Something only rumqttd can serve.
    NeedsBroker,
}

/// Serves `packets` (whole packets the guard let through, meant for
/// rumqttd) without rumqttd where that is possible.
pub fn answer_locally(packets: &[u8], answers: &mut Vec<Vec<u8>>) -> Local {
    let mut kinds = Vec::new();
    let mut rest = packets;
    while !rest.is_empty() {
        let Some((header, length)) = fixed_header(rest) else {
            return Local::NeedsBroker;
        };
        match rest[0] >> 4 {
            12 | 14 => kinds.push(rest[0] >> 4),
            _ => return Local::NeedsBroker,
        }
        rest = &rest[header + length..];
    }
    for kind in kinds {
        if kind == 14 {
            return Local::Disconnect;
        }
        answers.push(vec![0xd0, 0x00]);
    }
    Local::Answered
}

/// Follows the packet boundaries of the broker → client byte stream, so that
/// a direct packet is only ever written between two of rumqttd's, and never
/// before rumqttd's CONNACK.
#[derive(Debug, Default)]
pub struct Boundaries {
    /// Body bytes of the current packet still to come.
    body: usize,
    /// Fixed header bytes seen so far of the next packet (0: at a boundary).
    header: usize,
    length: usize,
    /// A header that is not MQTT: from then on nothing is interleaved.
    lost: bool,
    /// rumqttd's first packet (its CONNACK) has not been through yet.
    before_connack: bool,
}

impl Boundaries {
    /// The stream of a connection whose CONNACK comes from rumqttd: nothing
    /// is interleaved before it (MQTT-3.2.0-1).
    pub fn before_connack() -> Boundaries {
        Boundaries {
            before_connack: true,
            ..Boundaries::default()
        }
    }

    /// Takes the next bytes of the stream up to the end of the first packet
    /// that ends in them (all of them if none does); returns how many bytes
    /// it took and how many PUBACKs start in those.
    pub fn advance_to_boundary(&mut self, bytes: &[u8]) -> (usize, usize) {
        let mut used = 0;
        let mut pubacks = 0;
        while used < bytes.len() && !self.lost {
            if self.body > 0 {
                let n = self.body.min(bytes.len() - used);
                self.body -= n;
                used += n;
                if self.body == 0 {
                    self.before_connack = false;
                    return (used, pubacks);
                }
                continue;
            }
            let byte = bytes[used];
            used += 1;
            if self.header == 0 {
                self.header = 1;
                self.length = 0;
                pubacks += usize::from(byte >> 4 == 4);
                continue;
            }
            if self.header == 5 {
                self.lost = true;
                break;
            }
            self.length |= usize::from(byte & 0x7f) << (7 * (self.header - 1));
            self.header += 1;
            if byte & 0x80 == 0 {
                self.header = 0;
                self.body = self.length;
                if self.body == 0 {
                    self.before_connack = false;
                    return (used, pubacks);
                }
            }
        }
        (bytes.len(), pubacks)
    }

    /// Whether the stream is between two packets, after rumqttd's CONNACK.
    pub fn at_boundary(&self) -> bool {
        self.body == 0 && self.header == 0 && !self.lost && !self.before_connack
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes all of `bytes`, as the front does packet by packet; returns how
    /// many PUBACKs start in them.
    fn advance(b: &mut Boundaries, mut bytes: &[u8]) -> usize {
        let mut pubacks = 0;
        while !bytes.is_empty() {
            let (used, found) = b.advance_to_boundary(bytes);
            pubacks += found;
            bytes = &bytes[used..];
        }
        pubacks
    }

    const TOPIC: &str = "idgate/v1/devices/d-1/enroll/cbor";

    fn subscribe(level: u8, id: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        if level == 5 {
            body.push(0);
        }
        for filter in filters {
            body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
            body.extend_from_slice(filter.as_bytes());
            body.push(1);
        }
        let mut packet = vec![0x82];
        remaining_length(body.len(), &mut packet);
        packet.extend_from_slice(&body);
        packet
    }

    #[test]
    fn reply_subscriptions_are_answered_and_replies_delivered() {
        let routes = DirectRoutes::default();
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let mut subs = ConnectionRoutes::new(&routes, 4, tx, false);
        let publish = [0x30, 0x03, 0x00, 0x01, b'x'];
        let mut input = subscribe(4, 7, &[&format!("{TOPIC}/+")]);
        input.extend_from_slice(&publish);
        let (mut to_broker, mut answers) = (Vec::new(), Vec::new());
        subs.route(&input, &mut to_broker, &mut answers, &mut Vec::new());
        assert_eq!(to_broker, publish, "only the PUBLISH goes on");
        assert_eq!(answers, vec![vec![0x90, 3, 0, 7, 1]]);

        let reply = format!("{TOPIC}/accepted");
        assert_eq!(routes.deliver(&reply, b"cert"), 1);
        let packet = rx.try_recv().unwrap();
        assert_eq!(packet[0], 0x30);
        assert_eq!(usize::from(packet[1]), packet.len() - 2);
        assert!(packet.ends_with(b"cert"));
        assert_eq!(
            routes.deliver("idgate/v1/devices/d-2/enroll/cbor/accepted", b"x"),
            0
        );

        drop(subs);
        assert_eq!(routes.filters(), 0, "a closed connection leaves no route");
        assert_eq!(routes.deliver(&reply, b"cert"), 0);
    }

    #[test]
    fn replies_above_a_clients_maximum_packet_size_are_dropped() {
        let routes = DirectRoutes::default();
        let reply = format!("{TOPIC}/accepted");
        let size = publish_packet(5, &reply, b"cert").len();
        let limit = u32::try_from(size).unwrap();
        let mut receivers = Vec::new();
        let mut connections = Vec::new();
        // No limit, a limit the reply just fits, one byte short.
        for max_packet_size in [None, Some(limit), Some(limit - 1)] {
            let (tx, rx) = mpsc::channel(QUEUE);
            let mut conn =
                ConnectionRoutes::new(&routes, 5, tx, false).with_max_packet_size(max_packet_size);
            let (to_broker, answers, _) = route_all(&mut conn, &subscribe(5, 1, &[&reply]));
            assert!(to_broker.is_empty() && answers.len() == 1);
            receivers.push(rx);
            connections.push(conn);
        }
        assert_eq!(routes.deliver(&reply, b"cert"), 2);
        assert_eq!(routes.oversize_replies(), 1);
        assert_eq!(receivers[0].try_recv().unwrap().len(), size);
        assert_eq!(receivers[1].try_recv().unwrap().len(), size);
        assert!(receivers[2].try_recv().is_err(), "dropped, not queued");
        // A smaller reply still reaches it.
        assert_eq!(routes.deliver(&reply, b"cer"), 3);
        assert_eq!(receivers[2].try_recv().unwrap().len(), size - 1);
        assert_eq!(routes.oversize_replies(), 1);
    }

    #[test]
    fn other_subscriptions_go_to_the_broker() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let mut subs = ConnectionRoutes::new(&routes, 5, tx, false);
        for filters in [
            vec!["idgate/v1/crl"],
            vec![
                "idgate/v1/crl",
                "idgate/v1/devices/d-1/enroll/cbor/accepted",
            ],
            vec!["idgate/v1/devices/+/enroll/cbor/+"],
            vec!["idgate/v1/devices/d-1/#"],
        ] {
            let input = subscribe(5, 1, &filters);
            let (mut to_broker, mut answers) = (Vec::new(), Vec::new());
            subs.route(&input, &mut to_broker, &mut answers, &mut Vec::new());
            assert_eq!(to_broker, input, "{filters:?}");
            assert!(answers.is_empty());
        }
        assert_eq!(routes.filters(), 0);

        // Exact reply topics, MQTT 5: SUBACK with an empty property block;
        // UNSUBSCRIBE of them is answered here too.
        let accepted = format!("{TOPIC}/accepted");
        let rejected = format!("{TOPIC}/rejected");
        let (mut to_broker, mut answers) = (Vec::new(), Vec::new());
        subs.route(
            &subscribe(5, 9, &[&accepted, &rejected]),
            &mut to_broker,
            &mut answers,
            &mut Vec::new(),
        );
        assert!(to_broker.is_empty());
        assert_eq!(answers, vec![vec![0x90, 5, 0, 9, 0, 1, 1]]);
        let mut unsubscribe = vec![0xa2, 0];
        let mut body = vec![0, 10, 0];
        body.extend_from_slice(&(accepted.len() as u16).to_be_bytes());
        body.extend_from_slice(accepted.as_bytes());
        unsubscribe[1] = body.len() as u8;
        unsubscribe.extend_from_slice(&body);
        answers.clear();
        subs.route(&unsubscribe, &mut to_broker, &mut answers, &mut Vec::new());
        assert_eq!(answers, vec![vec![0xb0, 4, 0, 10, 0, 0]]);
        assert_eq!(routes.filters(), 1);
        // Unsubscribing what rumqttd holds goes to rumqttd.
        answers.clear();
        subs.route(&unsubscribe, &mut to_broker, &mut answers, &mut Vec::new());
        assert!(answers.is_empty());
        assert_eq!(to_broker, unsubscribe);
    }

    #[test]
    fn boundaries_follow_split_packets() {
        let mut b = Boundaries::default();
        assert!(b.at_boundary());
        // PUBACK, then a PUBLISH with a two-byte remaining length, in pieces.
        let mut stream = vec![0x40, 0x02, 0x00, 0x01];
        let mut publish = vec![0x30, 0x80, 0x01];
        publish.extend(std::iter::repeat_n(7u8, 128));
        stream.extend_from_slice(&publish);
        let mut ends = Vec::new();
        for (i, byte) in stream.iter().enumerate() {
            advance(&mut b, std::slice::from_ref(byte));
            if b.at_boundary() {
                ends.push(i + 1);
            }
        }
        assert_eq!(ends, vec![4, stream.len()]);
        advance(&mut b, &[0x30, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(!b.at_boundary(), "an impossible length stops interleaving");
    }

    /// A PUBLISH on `topic` at `qos` (packet id 5) for protocol `level`,
    /// MQTT 5 with one property (payload format indicator).
    fn publish(level: u8, first: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if (first >> 1) & 3 > 0 {
            body.extend_from_slice(&[0, 5]);
        }
        if level == 5 {
            body.extend_from_slice(&[2, 0x01, 0x00]);
        }
        body.extend_from_slice(payload);
        let mut packet = vec![first];
        remaining_length(body.len(), &mut packet);
        packet.extend_from_slice(&body);
        packet
    }

    /// Routes `input`; returns (to rumqttd, answers, requests).
    fn route_all(
        routes: &mut ConnectionRoutes<'_>,
        input: &[u8],
    ) -> (Vec<u8>, Vec<Vec<u8>>, Vec<Request>) {
        let (mut to_broker, mut answers, mut requests) = (Vec::new(), Vec::new(), Vec::new());
        routes.route(input, &mut to_broker, &mut answers, &mut requests);
        (to_broker, answers, requests)
    }

    #[test]
    fn requests_go_to_the_service_directly() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        for level in [4, 5] {
            let mut conn = ConnectionRoutes::new(&routes, level, tx.clone(), false);
            // QoS 0: taken, nothing to answer.
            let (to_broker, answers, requests) =
                route_all(&mut conn, &publish(level, 0x30, TOPIC, b"req"));
            assert!(to_broker.is_empty() && answers.is_empty(), "level {level}");
            assert_eq!(
                requests,
                vec![Request {
                    message: Message {
                        topic: TOPIC.into(),
                        payload: b"req".to_vec(),
                        retain: false
                    },
                    puback: None,
                }]
            );
            // QoS 1: taken, with the PUBACK to send once the service has it.
            let (to_broker, answers, requests) =
                route_all(&mut conn, &publish(level, 0x32, TOPIC, b"req"));
            assert!(to_broker.is_empty() && answers.is_empty());
            assert_eq!(requests[0].message.payload, b"req");
            assert_eq!(requests[0].puback, Some(vec![0x40, 2, 0, 5]));
            // Station requests too.
            let station = "idgate/v1/stations/st-1/devices/d-1/enroll/cbor";
            let (_, _, requests) = route_all(&mut conn, &publish(level, 0x30, station, b"s"));
            assert_eq!(requests.len(), 1);
            // Retained, QoS 2, replies, other operations and other topics
            // stay rumqttd's.
            for (first, topic) in [
                (0x31, TOPIC),
                (0x34, TOPIC),
                (0x30, "idgate/v1/devices/d-1/enroll/cbor/accepted"),
                (0x30, "idgate/v1/devices/d-1/telemetry"),
                (0x30, "idgate/v1/devices/d-1/status/cbor"),
            ] {
                let packet = publish(level, first, topic, b"x");
                let (to_broker, answers, requests) = route_all(&mut conn, &packet);
                assert_eq!(to_broker, packet, "{first:#x} {topic}");
                assert!(answers.is_empty() && requests.is_empty());
            }
        }
    }

    #[test]
    fn a_qos1_request_waits_behind_acknowledgements_rumqttd_owes() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let mut conn = ConnectionRoutes::new(&routes, 4, tx, false);
        let acks = conn.broker_acks();
        let telemetry = publish(4, 0x32, "idgate/v1/devices/d-1/telemetry", b"t");
        let request = publish(4, 0x32, TOPIC, b"req");
        let mut input = telemetry.clone();
        input.extend_from_slice(&request);
        let (to_broker, answers, requests) = route_all(&mut conn, &input);
        assert_eq!(to_broker, input, "the request follows the telemetry");
        assert!(answers.is_empty() && requests.is_empty());
        assert_eq!(acks.load(Ordering::Acquire), 2);
        // A QoS 0 request needs no PUBACK, so it need not wait.
        assert_eq!(
            route_all(&mut conn, &publish(4, 0x30, TOPIC, b"q")).2.len(),
            1
        );
        // rumqttd's two PUBACKs, as the broker → client side counts them.
        let mut boundaries = Boundaries::default();
        assert_eq!(advance(&mut boundaries, &[0x40, 2, 0, 5, 0x40, 2, 0, 5]), 2);
        acks.fetch_sub(2, Ordering::AcqRel);
        let (to_broker, _, requests) = route_all(&mut conn, &request);
        assert!(to_broker.is_empty());
        assert!(requests[0].puback.is_some());
        // After a QoS 2 PUBLISH, QoS 1 requests stay with rumqttd.
        route_all(
            &mut conn,
            &publish(4, 0x34, "idgate/v1/devices/d-1/t", b"t"),
        );
        assert_eq!(route_all(&mut conn, &request).0, request);
    }

    #[test]
    fn subscriptions_held_by_rumqttd_keep_their_topics_there() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let reply = format!("{TOPIC}/accepted");
        let request = publish(4, 0x30, TOPIC, b"req");
        {
            let mut watcher = ConnectionRoutes::new(&routes, 4, tx.clone(), false);
            // The CRL names no device: it changes nothing.
            route_all(&mut watcher, &subscribe(4, 1, &["idgate/v1/crl"]));
            assert!(!routes.broker_wants(&reply));
            let everything = subscribe(4, 2, &["idgate/v1/devices/d-1/#"]);
            assert_eq!(route_all(&mut watcher, &everything).0, everything);
            assert!(routes.broker_wants(&reply));
            assert!(routes.broker_wants(TOPIC));
            assert!(!routes.broker_wants("idgate/v1/devices/d-2/enroll/cbor/accepted"));
            let mut other = ConnectionRoutes::new(&routes, 4, tx.clone(), false);
            assert_eq!(route_all(&mut other, &request).0, request, "rumqttd's now");
            let d2 = publish(4, 0x30, "idgate/v1/devices/d-2/enroll/cbor", b"r");
            assert_eq!(route_all(&mut other, &d2).2.len(), 1);
        }
        assert!(!routes.broker_wants(&reply), "gone with the connection");
        let mut conn = ConnectionRoutes::new(&routes, 4, tx, false);
        assert_eq!(route_all(&mut conn, &request).2.len(), 1);
    }

    #[test]
    fn persistent_sessions_are_left_to_rumqttd() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let reply = format!("{TOPIC}/accepted");
        {
            let mut kept = ConnectionRoutes::new(&routes, 4, tx.clone(), true);
            // Its reply subscription and its requests go to rumqttd, which
            // keeps the subscription for the next connection.
            let subscription = subscribe(4, 1, &[&format!("{TOPIC}/+")]);
            assert_eq!(route_all(&mut kept, &subscription).0, subscription);
            let request = publish(4, 0x32, TOPIC, b"r");
            assert_eq!(route_all(&mut kept, &request).0, request);
        }
        assert!(routes.broker_wants(&reply), "kept after the connection");
        assert_eq!(routes.filters(), 0);
        // rumqttd may hold the session until the client id connects clean.
        assert!(!routes.note_session("dev-1", true));
        assert!(routes.note_session("dev-1", true));
        assert!(
            routes.note_session("dev-1", false),
            "this one must reach rumqttd"
        );
        assert!(!routes.note_session("dev-1", false));
    }

    #[test]
    fn filter_interest_names_the_prefix_a_filter_can_reach() {
        for (filter, interest) in [
            ("idgate/v1/devices/d-1/#", Some("idgate/v1/devices/d-1/")),
            (
                "idgate/v1/devices/d-1/+/cbor",
                Some("idgate/v1/devices/d-1/"),
            ),
            (
                "idgate/v1/stations/s/devices/d/#",
                Some("idgate/v1/stations/s/"),
            ),
            ("idgate/v1/devices/+/enroll/cbor", Some("")),
            ("idgate/v1/devices/#", Some("")),
            ("idgate/v1/+/d-1/#", Some("")),
            ("idgate/#", Some("")),
            ("#", Some("")),
            ("+/v1/devices/d-1/#", Some("")),
            ("idgate/v1/crl", None),
            ("idgate/v1/devices/d-1", None),
            ("idgate/v2/devices/d-1/#", None),
            ("other/topic", None),
        ] {
            assert_eq!(filter_interest(filter).as_deref(), interest, "{filter}");
        }
        assert_eq!(topic_prefix(TOPIC), Some("idgate/v1/devices/d-1/"));
        assert_eq!(topic_prefix("idgate/v1/crl"), None);
        assert_eq!(topic_prefix("idgate/v1/devices/d-1"), None);
        assert!(matches_filter("a/+/c", "a/b/c"));
        assert!(matches_filter("a/#", "a/b/c"));
        assert!(!matches_filter("a/+", "a/b/c"));
        assert!(!matches_filter("a/+/c/d", "a/b/c"));
    }

    #[test]
    fn nothing_after_disconnect_is_routed() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let mut conn = ConnectionRoutes::new(&routes, 4, tx, false);
        let mut input = vec![0xe0, 0];
        input.extend_from_slice(&publish(4, 0x32, TOPIC, b"late"));
        let (to_broker, answers, requests) = route_all(&mut conn, &input);
        assert_eq!(to_broker, [0xe0, 0]);
        assert!(answers.is_empty() && requests.is_empty());
    }

    #[test]
    fn pings_and_disconnects_are_answered_without_rumqttd() {
        let mut answers = Vec::new();
        assert_eq!(
            answer_locally(&[0xc0, 0, 0xc0, 0], &mut answers),
            Local::Answered
        );
        assert_eq!(answers, vec![vec![0xd0, 0], vec![0xd0, 0]]);
        answers.clear();
        assert_eq!(
            answer_locally(&[0xc0, 0, 0xe0, 0], &mut answers),
            Local::Disconnect
        );
        assert_eq!(answers.len(), 1);
        answers.clear();
        let crl = subscribe(4, 1, &["idgate/v1/crl"]);
        let mut input = vec![0xc0, 0];
        input.extend_from_slice(&crl);
        assert_eq!(answer_locally(&input, &mut answers), Local::NeedsBroker);
        assert!(answers.is_empty(), "rumqttd answers the ping then");
        assert_eq!(answer_locally(&[0xc0], &mut answers), Local::NeedsBroker);
    }

    #[test]
    fn nothing_goes_before_connack_or_inside_a_packet() {
        let mut b = Boundaries::before_connack();
        assert!(!b.at_boundary());
        // CONNACK, then PUBLISH (2-byte body) and PUBACK in one read: taken
        // one packet at a time.
        let stream = [0x20, 2, 0, 0, 0x30, 2, 0, 0, 0x40, 2, 0, 1];
        assert_eq!(b.advance_to_boundary(&stream), (4, 0));
        assert!(b.at_boundary());
        assert_eq!(b.advance_to_boundary(&stream[4..]), (4, 0));
        assert_eq!(b.advance_to_boundary(&stream[8..]), (4, 1));
        assert!(b.at_boundary());
        // A packet split across reads: no boundary until its end.
        assert_eq!(b.advance_to_boundary(&[0x30, 3, 0]), (3, 0));
        assert!(!b.at_boundary());
        assert_eq!(b.advance_to_boundary(&[1, b'x', 0xd0, 0]), (2, 0));
        assert!(b.at_boundary());
        // PINGRESP: an empty body ends the packet at its length byte.
        assert_eq!(b.advance_to_boundary(&[0xd0, 0, 0x40]), (2, 0));
        assert!(Boundaries::default().at_boundary());
    }

    #[test]
    fn malformed_input_never_panics() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let mut subs = ConnectionRoutes::new(&routes, 4, tx, false);
        for input in [
            &[0x82][..],
            &[0x82, 0x05, 0, 1, 0, 9, b'a'],
            &[0x82, 0x02, 0, 1],
            &[0xa2, 0x01, 0],
            &[0x82, 0xff, 0xff, 0xff, 0xff],
        ] {
            let (mut to_broker, mut answers) = (Vec::new(), Vec::new());
            subs.route(input, &mut to_broker, &mut answers, &mut Vec::new());
            assert!(answers.is_empty());
            assert_eq!(to_broker, input);
        }
    }
}
