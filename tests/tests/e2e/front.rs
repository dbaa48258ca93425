//! The MQTT front door: devices confined to their own topics, clients without
//! a certificate to enrollment and renewal, silent connections that cannot
//! block anyone, and a connection storm answered with "busy" instead of
//! falling over.

use std::time::{Duration, Instant};

use idgate_gateway::testing::TestDatabase;
use idgate_pki::protocol::{Format, Reply};
use idgate_sim::{EnrollOptions, enroll};
use idgate_tests::{Harness, RawClient};
use rumqttc::{ConnectReturnCode, ConnectionError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_confined_to_their_own_topics() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let a = h.identity_for("dev-a");

    // B's topics: the connection is closed. (Each check on a connection of
    // its own; they share A's client id, so each one replaces the last.)
    let mut spy = h.client_as("dev-a", &a).await.unwrap();
    assert!(spy.subscribe("idgate/v1/devices/dev-b/#").await.is_err());
    let mut spy = h.client_as("dev-a", &a).await.unwrap();
    assert!(
        spy.subscribe("idgate/v1/devices/+/renew/cbor/accepted")
            .await
            .is_err()
    );
    let mut forger = h.client_as("dev-a", &a).await.unwrap();
    assert!(
        forger
            .publish_and_ping("idgate/v1/devices/dev-b/renew/cbor", b"x".to_vec())
            .await
            .is_err()
    );

    // Its own topics: fine.
    let mut own = h.client_as("dev-a", &a).await.unwrap();
    own.subscribe("idgate/v1/devices/dev-a/#").await.unwrap();
    own.publish_and_ping("idgate/v1/devices/dev-a/telemetry", b"21.5".to_vec())
        .await
        .unwrap();
    own.subscribe("idgate/v1/crl").await.unwrap();

    // Connecting as B with A's certificate: refused at CONNECT.
    match h.client_as("dev-b", &a).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::BadClientId)
        }
        Err(other) => panic!("expected a CONNACK refusal, got {other}"),
        Ok(_) => panic!("connected as another device"),
    }

    // Without a certificate: enrollment and renewal topics only.
    let mut anonymous = h.client("dev-a").await;
    anonymous
        .subscribe("idgate/v1/devices/dev-a/enroll/cbor/+")
        .await
        .unwrap();
    let mut anonymous = h.client("x").await;
    assert!(
        anonymous
            .subscribe("idgate/v1/devices/+/enroll/cbor/accepted")
            .await
            .is_err()
    );
    let mut anonymous = h.client("x").await;
    assert!(
        anonymous
            .publish_and_ping("idgate/v1/devices/dev-a/telemetry", b"1".to_vec())
            .await
            .is_err()
    );

    // An anonymous client using A's id did not take over A's session.
    own.subscribe("idgate/v1/devices/dev-a/still-here")
        .await
        .unwrap();
    assert_eq!(h.gateway.sessions().device_sessions("dev-a"), 1);
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_block_devices() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(
            tokio::net::TcpStream::connect(h.gateway.mqtt_address())
                .await
                .unwrap(),
        );
    }
    let token = h.add_device("late-1", "hall").await;
    let root = std::fs::read(h.root_ca()).unwrap();
    let started = Instant::now();
    let mut options = EnrollOptions::new(h.broker(), root, "late-1", token);
    // Well inside the 10 s the silent clients may hold their sockets.
    options.timeout = Duration::from_secs(8);
    let enrolled = enroll(&options).await.unwrap();
    println!(
        "with 200 silent connections open, a device enrolled in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(h.registry().certificate_count("late-1").await.unwrap(), 1);
    assert!(!enrolled.serial.is_empty());
    drop(silent);
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_mtls_connects_gets_in_or_gets_busy() {
    // Sized so that the storm overflows the limit yet fits in the time the
    // front gives a handshake even when the other e2e tests share the two
    // cores: this checks admission control, not handshake speed (that is in
    // `idgate bench enroll --keep-connected`).
    const CLIENTS: usize = 400;
    const LIMIT: usize = 250;
    let h = Harness::start_with(TestDatabase::Sqlite, |s| {
        s.limits.max_connections = LIMIT;
        s.limits.handshake_timeout = Duration::from_secs(120);
    })
    .await
    .unwrap();
    let identities: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let id = format!("storm-{i:04}");
            let identity = h.identity_for(&id);
            (id, identity)
        })
        .collect();
    let root = h.root_ca();
    let port = h.gateway.mqtt_address().port();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (id, identity) in identities {
        let root = root.clone();
        tasks.spawn(async move { RawClient::try_connect(&root, port, &id, Some(&identity)).await });
    }
    let (mut connected, mut busy, mut other) = (Vec::new(), 0usize, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            Ok(client) => connected.push(client),
            Err(ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable)) => {
                busy += 1
            }
            Err(e) => other.push(e.to_string()),
        }
    }
    println!(
        "storm of {CLIENTS} mTLS connects (limit {LIMIT}): {} connected, {busy} told busy, {} failed otherwise, in {} ms",
        connected.len(),
        other.len(),
        started.elapsed().as_millis()
    );
    assert!(
        other.is_empty(),
        "every client gets in or gets busy: {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(connected.len() + busy, CLIENTS);
    assert!(connected.len() <= LIMIT);
    assert!(busy >= CLIENTS - LIMIT);
    drop(connected);
    h.gateway.shutdown().await;
}

/// An MQTT 5 string: 2-byte length, then the bytes.
fn mqtt_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut out = vec![first, body.len() as u8];
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_violations_get_a_disconnect_before_the_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let a = h.identity_for("dev-a");
    let tls = idgate_tests::tls_with_identity(&h.root_ca(), &a);
    let mut stream = tls_to(h.gateway.mqtt_address(), &tls).await;

    let mut connect = mqtt_string("MQTT");
    connect.extend_from_slice(&[5, 0x02, 0, 60, 0]); // level 5, clean start, keep alive, no properties
    connect.extend_from_slice(&mqtt_string("dev-a"));
    stream.write_all(&packet(0x10, &connect)).await.unwrap();
    let mut connack = [0u8; 5];
    stream.read_exact(&mut connack[..2]).await.unwrap();
    assert_eq!(connack[0], 0x20, "CONNACK");
    let rest = usize::from(connack[1]);
    let mut body = vec![0u8; rest];
    stream.read_exact(&mut body).await.unwrap();
    assert_eq!(body[1], 0x00, "accepted");

    let mut subscribe = vec![0, 1, 0]; // packet id 1, no properties
    subscribe.extend_from_slice(&mqtt_string("idgate/v1/devices/dev-b/#"));
    subscribe.push(0x01);
    stream.write_all(&packet(0x82, &subscribe)).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
    assert!(reply.len() >= 3, "{reply:?}");
    assert_eq!(reply[0], 0xe0, "DISCONNECT, not SUBACK: {reply:?}");
    assert_eq!(reply[2], 0x87, "reason: not authorized");
    h.gateway.shutdown().await;
}

/// Requests, replies, PINGREQ and DISCONNECT are the front's business; the
/// loopback link to rumqttd is opened when a client first asks for something
/// only rumqttd serves, and a subscription held in rumqttd keeps its topics
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_is_linked_only_when_a_client_needs_it() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let sessions = h.gateway.sessions().clone();

    // An enrolling device: request, reply and a QoS 1 PUBACK, no rumqttd.
    let mut device = h.client("lazy-1").await;
    let (reply, _) = device
        .enroll("lazy-1", Format::Cbor, b"not cbor".to_vec())
        .await;
    assert_eq!(reply, Reply::Rejected, "the service answered");
    device
        .publish_and_ping("idgate/v1/devices/lazy-1/enroll/cbor", b"x".to_vec())
        .await
        .unwrap();
    let (topic, _) = device.next_publish().await;
    assert_eq!(topic, "idgate/v1/devices/lazy-1/enroll/cbor/rejected");
    assert_eq!(sessions.connections(), 1);
    assert_eq!(sessions.broker_links(), 0, "no rumqttd link yet");

    // The retained CRL is rumqttd's: the link opens, and the client sees
    // rumqttd's answer, not a second CONNACK.
    let crl = device.first_message("idgate/v1/crl").await;
    assert!(!crl.is_empty());
    assert_eq!(sessions.broker_links(), 1);
    // Requests still work with the link open.
    let (reply, _) = device
        .enroll("lazy-1", Format::Cbor, b"not cbor".to_vec())
        .await;
    assert_eq!(reply, Reply::Rejected);

    // A device watching all of its topics through rumqttd sees its own
    // requests and replies there, as before.
    let a = h.identity_for("dev-a");
    let mut own = h.client_as("dev-a", &a).await.unwrap();
    own.subscribe("idgate/v1/devices/dev-a/#").await.unwrap();
    assert_eq!(sessions.broker_links(), 2);
    own.send("idgate/v1/devices/dev-a/renew/cbor", b"y".to_vec())
        .await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (topic, _) = own.next_publish().await;
        seen.push(topic);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "idgate/v1/devices/dev-a/renew/cbor",
            "idgate/v1/devices/dev-a/renew/cbor/rejected"
        ]
    );

    // The same client id again: the older connection is closed, whether or
    // not rumqttd ever saw it.
    let mut first = h.client("twin").await;
    let _second = h.client("twin").await;
    first.closed().await;
    drop(device);
    drop(own);
    h.gateway.shutdown().await;
}

/// Without rumqttd, the front answers PINGREQ and enforces the keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_keeps_the_keep_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let tls = idgate_tests::tls_trusting(&h.root_ca());
    let mut connect = mqtt_string("MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 1]); // 3.1.1, clean session, keep-alive 1 s
    connect.extend_from_slice(&mqtt_string("pinger"));
    let connect = packet(0x10, &connect);
    let mut stream = tls_to(h.gateway.mqtt_address(), &tls).await;
    stream.write_all(&connect).await.unwrap();
    let mut answer = [0u8; 4];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, [0x20, 2, 0, 0], "CONNACK, accepted, no session");
    for _ in 0..3 {
        stream.write_all(&[0xc0, 0]).await.unwrap();
        let mut pong = [0u8; 2];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0xd0, 0], "PINGRESP");
    }
    assert_eq!(h.gateway.sessions().broker_links(), 0);
    // Then silence: closed after 1.5 s, not left open.
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open after 20 s of silence");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // DISCONNECT ends the connection at once.
    let mut stream = tls_to(h.gateway.mqtt_address(), &tls).await;
    stream.write_all(&connect).await.unwrap();
    stream.read_exact(&mut answer).await.unwrap();
    stream.write_all(&[0xe0, 0]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok_and(|r| r.is_ok()));
    h.gateway.shutdown().await;
}

/// A persistent session is rumqttd's: its subscriptions outlive the
/// connection, and what they match keeps going through rumqttd after the
/// device comes back without subscribing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_subscriptions() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let identity = h.identity_for("dev-p");
    let port = h.gateway.mqtt_address().port();
    let persistent = |o: &mut rumqttc::MqttOptions| {
        o.set_clean_session(false);
    };
    let mut first =
        RawClient::try_connect_with(&h.root_ca(), port, "dev-p", Some(&identity), persistent)
            .await
            .unwrap();
    first
        .subscribe("idgate/v1/devices/dev-p/renew/cbor/+")
        .await
        .unwrap();
    drop(first);
    // Back, with the same session and no SUBSCRIBE: the reply still comes.
    let mut again =
        RawClient::try_connect_with(&h.root_ca(), port, "dev-p", Some(&identity), persistent)
            .await
            .unwrap();
    again
        .send("idgate/v1/devices/dev-p/renew/cbor", b"not cbor".to_vec())
        .await;
    let (topic, _) = again.next_publish().await;
    assert_eq!(topic, "idgate/v1/devices/dev-p/renew/cbor/rejected");
    drop(again);
    // A clean connection ends the session, in rumqttd too: nothing comes
    // without a subscription now.
    let mut clean = h.client_as("dev-p", &identity).await.unwrap();
    clean
        .publish_and_ping("idgate/v1/devices/dev-p/renew/cbor", b"x".to_vec())
        .await
        .unwrap();
    clean.subscribe("idgate/v1/crl").await.unwrap();
    let (topic, _) = clean.next_publish().await;
    assert_eq!(topic, "idgate/v1/crl", "no reply from the old session");
    h.gateway.shutdown().await;
}

/// While the service is behind (here: its registry writes wait for a lock),
/// a device whose request is queued still gets its PINGREQs answered, so a
/// stall does not drop the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_while_the_service_is_behind() {
    use sqlx::Connection;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    // Every refusal is audited, and the audit waits for this write lock
    // (busy_timeout 10 s), so the service's workers all wait.
    let mut lock = sqlx::SqliteConnection::connect(&h.database_url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .unwrap();

    let tls = idgate_tests::tls_trusting(&h.root_ca());
    let open = |id: &'static str| {
        let tls = tls.clone();
        let address = h.gateway.mqtt_address();
        async move {
            let mut stream = tls_to(address, &tls).await;
            let mut connect = mqtt_string("MQTT");
            connect.extend_from_slice(&[4, 0x02, 0, 60]);
            connect.extend_from_slice(&mqtt_string(id));
            stream.write_all(&packet(0x10, &connect)).await.unwrap();
            let mut connack = [0u8; 4];
            stream.read_exact(&mut connack).await.unwrap();
            assert_eq!(connack, [0x20, 2, 0, 0]);
            stream
        }
    };
    let request = |device: &str| {
        let mut body = mqtt_string(&format!("idgate/v1/devices/{device}/enroll/cbor"));
        body.extend_from_slice(b"not cbor");
        packet(0x30, &body)
    };

    // Fill the service's queue from one connection.
    let mut flood = open("flood").await;
    let garbage: Vec<u8> = (0..6_000).flat_map(|_| request("flood-1")).collect();
    let flooding = tokio::spawn(async move {
        let _ = flood.write_all(&garbage).await;
        flood
    });
    let gateway = &h.gateway;
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway.waiting_requests() < 4096 {
        assert!(Instant::now() < deadline, "the queue never filled");
        tokio::task::yield_now().await;
    }

    // Another device: its request finds the queue full; its ping is still
    // answered.
    let mut device = open("patient").await;
    device.write_all(&request("patient-1")).await.unwrap();
    device.write_all(&[0xc0, 0]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), device.read_exact(&mut pong))
        .await
        .expect("no PINGRESP while the service is behind")
        .unwrap();
    assert_eq!(pong, [0xd0, 0]);
    assert!(gateway.waiting_requests() >= 4096, "still behind");

    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    drop(flooding);
    h.gateway.shutdown().await;
}

/// A TLS connection to the gateway's MQTT listener at `address`, the client
/// configured by `tls`; nothing sent on it yet.
async fn tls_to(
    address: std::net::SocketAddr,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .unwrap()
}

/// A raw MQTT 5 connection over TLS, after an accepting CONNACK: client id
/// `client_id`, Clean Start, CONNECT properties `properties` (encoded, as
/// they go in the block).
async fn open_v5(
    h: &Harness,
    client_id: &str,
    properties: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let tls = idgate_tests::tls_trusting(&h.root_ca());
    let mut stream = tls_to(h.gateway.mqtt_address(), &tls).await;
    let mut connect = mqtt_string("MQTT");
    connect.extend_from_slice(&[5, 0x02, 0, 60]); // level 5, clean start, keep-alive
    connect.push(u8::try_from(properties.len()).unwrap());
    connect.extend_from_slice(properties);
    connect.extend_from_slice(&mqtt_string(client_id));
    stream.write_all(&packet(0x10, &connect)).await.unwrap();
    let connack = read_packet(&mut stream).await;
    assert_eq!(connack[0], 0x20, "CONNACK: {connack:?}");
    assert_eq!(connack[3], 0x00, "accepted: {connack:?}");
    stream
}

/// The next whole MQTT packet, fixed header included (within 20 s).
async fn read_packet(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut packet = vec![stream.read_u8().await?];
        let mut remaining = 0usize;
        for shift in 0..4 {
            let byte = stream.read_u8().await?;
            packet.push(byte);
            remaining |= usize::from(byte & 0x7f) << (7 * shift);
            if byte & 0x80 == 0 {
                break;
            }
        }
        let start = packet.len();
        packet.resize(start + remaining, 0);
        stream.read_exact(&mut packet[start..]).await?;
        Ok::<_, std::io::Error>(packet)
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("no packet within 20 s")
        .expect("connection closed")
}

/// A reply larger than an MQTT 5 client's Maximum Packet Size is not
/// written into its connection (MQTT 5 §3.1.2.11.4); another connection
/// waiting for the same reply still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_respect_the_clients_maximum_packet_size() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let request = "idgate/v1/devices/mps-1/enroll/cbor";
    let mut subscribe = vec![0, 1, 0]; // packet id 1, no properties
    subscribe.extend_from_slice(&mqtt_string(&format!("{request}/+")));
    subscribe.push(0x00);
    // The small one subscribes first, so the front comes to it first when
    // the reply is handed out: once the other has the reply, its fate is
    // settled.
    let mut small = open_v5(&h, "small", &[0x27, 0, 0, 0, 64]).await;
    let mut roomy = open_v5(&h, "roomy", &[]).await;
    for stream in [&mut small, &mut roomy] {
        stream.write_all(&packet(0x82, &subscribe)).await.unwrap();
        let suback = read_packet(stream).await;
        assert_eq!(suback[0], 0x90, "SUBACK: {suback:?}");
    }

    let mut publish = mqtt_string(request);
    publish.push(0); // no properties
    publish.extend_from_slice(b"not cbor");
    roomy.write_all(&packet(0x30, &publish)).await.unwrap();
    let reply = read_packet(&mut roomy).await;
    assert_eq!(reply[0], 0x30, "the rejection, as a PUBLISH: {reply:?}");
    assert!(reply.len() > 64, "{} bytes", reply.len());
    assert_eq!(h.gateway.oversize_replies(), 1);

    // The small one's next packet is the answer to its ping: no reply was
    // written before it.
    small.write_all(&[0xc0, 0]).await.unwrap();
    assert_eq!(read_packet(&mut small).await, [0xd0, 0], "PINGRESP");
    h.gateway.shutdown().await;
}

/// A newer connection with the same client id takes over: the older one
/// gets DISCONNECT "session taken over" (0x8E) before the close if it
/// speaks MQTT 5 (§3.1.4-3), and is just closed if it speaks 3.1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_mqtt5_client_is_told_why() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let mut first = open_v5(&h, "twin-5", &[]).await;
    let mut second = open_v5(&h, "twin-5", &[]).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), first.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the older connection stayed open");
    assert_eq!(rest, [0xe0, 2, 0x8e, 0], "DISCONNECT, session taken over");
    // The newer connection is served.
    second.write_all(&[0xc0, 0]).await.unwrap();
    assert_eq!(read_packet(&mut second).await, [0xd0, 0], "PINGRESP");

    let tls = idgate_tests::tls_trusting(&h.root_ca());
    let mut connect = mqtt_string("MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60]);
    connect.extend_from_slice(&mqtt_string("twin-4"));
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut stream = tls_to(h.gateway.mqtt_address(), &tls).await;
        stream.write_all(&packet(0x10, &connect)).await.unwrap();
        assert_eq!(read_packet(&mut stream).await, [0x20, 2, 0, 0]);
        streams.push(stream);
    }
    let mut rest = Vec::new();
    let ended =
        tokio::time::timeout(Duration::from_secs(20), streams[0].read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the older connection stayed open");
    assert!(
        rest.is_empty(),
        "MQTT 3.1.1 has no server DISCONNECT: {rest:?}"
    );
    h.gateway.shutdown().await;
}
