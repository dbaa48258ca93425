//! `idgate bench enroll --keep-connected`: every simulated device opens a
//! connection of its own — TCP, a full TLS 1.3 handshake, MQTT CONNECT and
//! SUBSCRIBE — enrolls over it, and then **stays connected**, as a fleet does.
//! What scales with the fleet is the number of connections the gateway
//! holds, so this mode reports the gateway's memory and open files and the
//! latency of a fresh device's enrollment with N devices connected. The
//! devices run in the load generator's child processes (`fleet`).
//!
//! The devices speak MQTT 3.1.1 through a minimal client of their own (a few
//! packet types over `tokio-rustls`): a full MQTT client library per device
//! would weigh more than what is measured. Connections are spread over
//! several loopback source addresses (127.0.0.1–127.0.0.16) so that the
//! ephemeral port range (about 28,000 ports per source address towards one
//! listener) is not the limit.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idgate_pki::protocol::{Format, Op as ProtocolOp, Topic};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{BenchError, Job, setup};
use crate::broker::direct::remaining_length;

/// Loopback source addresses the devices' connections are spread over.
pub const SOURCE_ADDRESSES: u8 = 16;
/// Longest a device waits for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// MQTT keep-alive the devices announce. rumqttd refuses 0 ("never"); a
/// long one keeps the idle fleet silent, so that the memory and idle CPU
/// measured are those of holding connections, not of answering pings.
const KEEP_ALIVE_SECONDS: u16 = u16::MAX;

/// What one device's connection and enrollment took.
pub struct Enrolled {
    /// TCP connect, TLS handshake, CONNECT → CONNACK, SUBSCRIBE → SUBACK.
    pub connect: Duration,
    /// PUBLISH of the request → the reply.
    pub enroll: Duration,
    /// Whether the reply was `accepted`.
    pub accepted: bool,
    /// The open connection, held (never read) until the measurement ends.
    #[allow(dead_code)]
    pub stream: TlsStream<tokio::net::TcpStream>,
}

/// Where and how the devices connect.
#[derive(Clone)]
pub struct Dialer {
    /// The gateway's MQTT/TLS address.
    pub gateway: SocketAddr,
    /// TLS client configuration trusting the gateway's root.
    pub tls: Arc<rustls::ClientConfig>,
}

/// Connects and enrolls every job's device, at most `concurrency` at once;
/// the connections are returned open, in the jobs' order.
pub async fn enroll_all(
    dialer: &Dialer,
    device_ids: &[String],
    jobs: Vec<Job>,
    concurrency: usize,
) -> Result<Vec<Enrolled>, BenchError> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut done: Vec<Option<Enrolled>> = Vec::with_capacity(jobs.len());
    done.resize_with(jobs.len(), || None);
    let mut collect = |joined: Result<(usize, Result<Enrolled, BenchError>), _>| {
        let (index, result) =
            joined.map_err(|e: tokio::task::JoinError| BenchError::Run(e.to_string()))?;
        done[index] = Some(result?);
        Ok::<_, BenchError>(())
    };
    for (index, job) in jobs.into_iter().enumerate() {
        let permit = permits.clone().acquire_owned().await.map_err(setup)?;
        let dialer = dialer.clone();
        let client_id = device_ids[job.device].clone();
        tasks.spawn(async move {
            let source = source_address(index);
            let result = connect_and_enroll(&dialer, source, &client_id, job).await;
            drop(permit);
            (index, result)
        });
        // Stop at the first failure rather than after every device has tried.
        while let Some(joined) = tasks.try_join_next() {
            collect(joined)?;
        }
    }
    while let Some(joined) = tasks.join_next().await {
        collect(joined)?;
    }
    Ok(done.into_iter().flatten().collect())
}

/// The loopback source address of the `index`th connection.
pub fn source_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (index % usize::from(SOURCE_ADDRESSES)) as u8)
}

/// One device: connect from `source`, subscribe to its reply topics,
/// publish its request and wait for the answer.
async fn connect_and_enroll(
    dialer: &Dialer,
    source: Ipv4Addr,
    client_id: &str,
    job: Job,
) -> Result<Enrolled, BenchError> {
    let started = Instant::now();
    let run = |e: &dyn std::fmt::Display| BenchError::Run(format!("device {client_id}: {e}"));
    let socket = TcpSocket::new_v4().map_err(|e| run(&e))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| run(&format!("bind {source}: {e}")))?;
    let tcp = step(socket.connect(dialer.gateway))
        .await?
        .map_err(|e| run(&format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(dialer.gateway.ip().into());
    let mut stream = step(TlsConnector::from(dialer.tls.clone()).connect(name, tcp))
        .await?
        .map_err(|e| run(&format!("TLS: {e}")))?;

    let mut out = Vec::with_capacity(job.payload.len() + 256);
    connect_packet(client_id, &mut out);
    stream.write_all(&out).await.map_err(|e| run(&e))?;
    let mut body = Vec::new();
    match step(read_packet(&mut stream, &mut body))
        .await?
        .map_err(|e| run(&e))?
    {
        0x20 if body.get(1) == Some(&0) => {}
        first => return Err(run(&format!("CONNACK refused (0x{first:02x}, {body:?})"))),
    }
    let filter = format!(
        "{}/+",
        Topic::request(
            &Topic::parse(&job.topic)
                .map(|t| t.device_id.to_owned())
                .unwrap_or_default(),
            ProtocolOp::Enroll,
            Format::Cbor
        )
    );
    out.clear();
    subscribe_packet(1, &filter, &mut out);
    stream.write_all(&out).await.map_err(|e| run(&e))?;
    match step(read_packet(&mut stream, &mut body))
        .await?
        .map_err(|e| run(&e))?
    {
        0x90 if body.get(2).is_some_and(|&code| code < 0x80) => {}
        first => return Err(run(&format!("SUBACK refused (0x{first:02x})"))),
    }
    let connected = Instant::now();

    out.clear();
    publish_packet(2, &job.topic, &job.payload, &mut out);
    stream.write_all(&out).await.map_err(|e| run(&e))?;
    let accepted = loop {
        let first = step(read_packet(&mut stream, &mut body))
            .await?
            .map_err(|e| run(&e))?;
        if first >> 4 != 3 {
            continue; // the PUBACK of the request
        }
        let qos = (first >> 1) & 3;
        let topic_len = body
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(|| run(&"short PUBLISH"))?;
        let topic = body
            .get(2..2 + topic_len)
            .and_then(|t| std::str::from_utf8(t).ok())
            .ok_or_else(|| run(&"bad PUBLISH topic"))?
            .to_owned();
        if qos > 0 {
            let id = body
                .get(2 + topic_len..4 + topic_len)
                .ok_or_else(|| run(&"short PUBLISH"))?;
            stream
                .write_all(&[0x40, 0x02, id[0], id[1]])
                .await
                .map_err(|e| run(&e))?;
        }
        if let Some(parsed) = Topic::parse(&topic).filter(|t| t.reply.is_some()) {
            break parsed.reply == Some(idgate_pki::protocol::Reply::Accepted);
        }
    };
    let done = Instant::now();
    Ok(Enrolled {
        connect: connected - started,
        enroll: done - connected,
        accepted,
        stream,
    })
}

async fn step<T>(future: impl Future<Output = T>) -> Result<T, BenchError> {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .map_err(|_| BenchError::Run(format!("no answer within {} s", STEP_TIMEOUT.as_secs())))
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// MQTT 3.1.1 CONNECT, clean session, no credentials.
fn connect_packet(client_id: &str, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(16 + client_id.len());
    string(b"MQTT", &mut body);
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&KEEP_ALIVE_SECONDS.to_be_bytes());
    string(client_id.as_bytes(), &mut body);
    out.push(0x10);
    remaining_length(body.len(), out);
    out.extend_from_slice(&body);
}

fn subscribe_packet(id: u16, filter: &str, out: &mut Vec<u8>) {
    out.push(0x82);
    remaining_length(2 + 2 + filter.len() + 1, out);
    out.extend_from_slice(&id.to_be_bytes());
    string(filter.as_bytes(), out);
    out.push(1); // QoS 1
}

fn publish_packet(id: u16, topic: &str, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x32); // QoS 1
    remaining_length(2 + topic.len() + 2 + payload.len(), out);
    string(topic.as_bytes(), out);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads one MQTT packet: returns its first byte, its body in `body`.
async fn read_packet(
    stream: &mut (impl AsyncRead + Unpin),
    body: &mut Vec<u8>,
) -> std::io::Result<u8> {
    let first = stream.read_u8().await?;
    let mut length = 0usize;
    for shift in 0..4 {
        let byte = stream.read_u8().await?;
        length |= usize::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            break;
        }
        if shift == 3 {
            return Err(std::io::Error::other("malformed remaining length"));
        }
    }
    body.resize(length, 0);
    stream.read_exact(body).await?;
    Ok(first)
}
