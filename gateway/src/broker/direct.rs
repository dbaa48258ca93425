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

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use idgate_pki::protocol::Topic;
use tokio::sync::mpsc;
use tracing::debug;

/// Packets waiting for one connection (SUBACKs, replies); beyond this a
/// reply to a connection that does not read is dropped, as QoS 0 allows.
pub const QUEUE: usize = 64;

/// A connection waiting for replies.
#[derive(Debug)]
struct Route {
    connection: u64,
    level: u8,
    sender: mpsc::Sender<Vec<u8>>,
}

/// The reply filters of every connection, by filter.
#[derive(Debug, Default)]
pub struct DirectRoutes {
    routes: Mutex<HashMap<String, Vec<Route>>>,
    next_connection: AtomicU64,
}

impl DirectRoutes {
    /// Hands a reply to every connection subscribed to `topic` directly;
    /// returns how many took it.
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
                match route.sender.try_send(packet) {
                    Ok(()) => delivered += 1,
                    Err(e) => debug!(connection = route.connection, error = %e, "reply dropped"),
                }
            }
        }
        delivered
    }

    fn add(&self, filter: &str, connection: u64, level: u8, sender: &mpsc::Sender<Vec<u8>>) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let list = routes.entry(filter.to_owned()).or_default();
        if !list.iter().any(|r| r.connection == connection) {
            list.push(Route {
                connection,
                level,
                sender: sender.clone(),
            });
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
}

/// Whether `filter` names replies only: a reply topic, or a request topic
/// followed by `/+`.
fn is_reply_filter(filter: &str) -> bool {
    if let Some(prefix) = filter.strip_suffix("/+") {
        return Topic::parse(prefix).is_some_and(|t| t.reply.is_none());
    }
    Topic::parse(filter).is_some_and(|t| t.reply.is_some())
}

/// One connection's direct subscriptions; dropping it removes them.
#[derive(Debug)]
pub struct Subscriptions<'a> {
    routes: &'a DirectRoutes,
    connection: u64,
    level: u8,
    sender: mpsc::Sender<Vec<u8>>,
    filters: HashSet<String>,
}

impl<'a> Subscriptions<'a> {
    /// A connection speaking MQTT protocol `level` (4: 3.1.1, 5), whose
    /// direct packets go to `sender`.
    pub fn new(
        routes: &'a DirectRoutes,
        level: u8,
        sender: mpsc::Sender<Vec<u8>>,
    ) -> Subscriptions<'a> {
        Subscriptions {
            routes,
            connection: routes.next_connection.fetch_add(1, Ordering::Relaxed),
            level,
            sender,
            filters: HashSet::new(),
        }
    }

    /// Takes the complete packets the guard let through (`packets`): a
    /// SUBSCRIBE or UNSUBSCRIBE of reply filters only is answered here (the
    /// answer appended to `answers`), everything else is appended to
    /// `to_broker` unchanged and in order.
    pub fn route(&mut self, packets: &[u8], to_broker: &mut Vec<u8>, answers: &mut Vec<Vec<u8>>) {
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
            let answer = match packet[0] {
                0x82 => self.subscribe(&packet[header..]),
                0xa2 => self.unsubscribe(&packet[header..]),
                _ => None,
            };
            match answer {
                Some(answer) => answers.push(answer),
                None => to_broker.extend_from_slice(packet),
            }
        }
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
            self.routes
                .add(filter, self.connection, self.level, &self.sender);
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

impl Drop for Subscriptions<'_> {
    fn drop(&mut self) {
        for filter in &self.filters {
            self.routes.remove(filter, self.connection);
        }
    }
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

/// Follows the packet boundaries of the broker → client byte stream, so that
/// a direct packet is only ever written between two of rumqttd's packets.
#[derive(Debug, Default)]
pub struct Boundaries {
    /// Body bytes of the current packet still to come.
    body: usize,
    /// Fixed header bytes seen so far of the next packet (0: at a boundary).
    header: usize,
    length: usize,
    /// A header that is not MQTT: from then on nothing is interleaved.
    lost: bool,
}

impl Boundaries {
    /// Takes the next bytes of the stream.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.body > 0 {
                let n = self.body.min(bytes.len());
                self.body -= n;
                bytes = &bytes[n..];
                continue;
            }
            let byte = bytes[0];
            bytes = &bytes[1..];
            if self.header == 0 {
                self.header = 1;
                self.length = 0;
                continue;
            }
            if self.header == 5 {
                self.lost = true;
                return;
            }
            self.length |= usize::from(byte & 0x7f) << (7 * (self.header - 1));
            self.header += 1;
            if byte & 0x80 == 0 {
                self.header = 0;
                self.body = self.length;
            }
        }
    }

    /// Whether the stream is between two packets.
    pub fn at_boundary(&self) -> bool {
        self.body == 0 && self.header == 0 && !self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut subs = Subscriptions::new(&routes, 4, tx);
        let publish = [0x30, 0x03, 0x00, 0x01, b'x'];
        let mut input = subscribe(4, 7, &[&format!("{TOPIC}/+")]);
        input.extend_from_slice(&publish);
        let (mut to_broker, mut answers) = (Vec::new(), Vec::new());
        subs.route(&input, &mut to_broker, &mut answers);
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
    fn other_subscriptions_go_to_the_broker() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let mut subs = Subscriptions::new(&routes, 5, tx);
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
            subs.route(&input, &mut to_broker, &mut answers);
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
        subs.route(&unsubscribe, &mut to_broker, &mut answers);
        assert_eq!(answers, vec![vec![0xb0, 4, 0, 10, 0, 0]]);
        assert_eq!(routes.filters(), 1);
        // Unsubscribing what rumqttd holds goes to rumqttd.
        answers.clear();
        subs.route(&unsubscribe, &mut to_broker, &mut answers);
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
            b.advance(std::slice::from_ref(byte));
            if b.at_boundary() {
                ends.push(i + 1);
            }
        }
        assert_eq!(ends, vec![4, stream.len()]);
        b.advance(&[0x30, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(!b.at_boundary(), "an impossible length stops interleaving");
    }

    #[test]
    fn malformed_input_never_panics() {
        let routes = DirectRoutes::default();
        let (tx, _rx) = mpsc::channel(QUEUE);
        let mut subs = Subscriptions::new(&routes, 4, tx);
        for input in [
            &[0x82][..],
            &[0x82, 0x05, 0, 1, 0, 9, b'a'],
            &[0x82, 0x02, 0, 1],
            &[0xa2, 0x01, 0],
            &[0x82, 0xff, 0xff, 0xff, 0xff],
        ] {
            let (mut to_broker, mut answers) = (Vec::new(), Vec::new());
            subs.route(input, &mut to_broker, &mut answers);
            assert!(answers.is_empty());
            assert_eq!(to_broker, input);
        }
    }
}
