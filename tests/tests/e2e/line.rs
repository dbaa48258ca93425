//! The manufacturing line: a station (`idgate line`'s library) drives
//! simulated devices, which run the real agent, over TCP standing in for
//! their serial ports, and relays their enrollments over MQTT/TLS with its
//! own station certificate. A device answering garbage and a silent one are
//! failed by timeout while the others pass; a station is refused devices
//! outside its batches; a revoked station certificate is refused at the
//! handshake.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idgate_gateway::line::admin::{StationCredentials, add_station, renew_station};
use idgate_gateway::line::relay::{Relay, RelayError, RelayOptions};
use idgate_gateway::line::station::{Fixtures, Station, UnitOutcome, UnitReport, run, run_unit};
use idgate_gateway::line::tokens::TokenPool;
use idgate_gateway::registry::{DeviceStatus, NewBatch, NewDevice, now};
use idgate_gateway::testing::TestDatabase;
use idgate_pki::link::{self, Frame};
use idgate_pki::protocol::{EnrollRequest, Format, Issued, Op, Reply, enrollment_proof};
use idgate_pki::wire::{decode_rejected, encode_enroll, encode_issued};
use idgate_sim::{Behaviour, LineDeviceOptions, SimError, run_line_device};
use idgate_tests::Harness;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

crate::on_both_backends!(a_station_enrolls_a_batch_and_fails_bad_units);

const GOOD: usize = 20;

/// Registers batch `id` with `devices` ids; returns `(id, token)` pairs.
pub(crate) async fn import(h: &Harness, id: &str, devices: &[String]) -> Vec<(String, String)> {
    let tokens = h.data.tokens().unwrap();
    let mut rows = Vec::new();
    let mut clear = Vec::new();
    for device in devices {
        let new = tokens.generate(device);
        rows.push((
            NewDevice {
                id: device.clone(),
                owner: "line@example.com".into(),
                site: "plant-1".into(),
                model: Some("th-2".into()),
                label: None,
                created_by: "test".into(),
            },
            new.sealed,
        ));
        clear.push((device.clone(), new.token));
    }
    h.registry()
        .import_batch(
            &NewBatch {
                id: id.into(),
                owner: "line@example.com".into(),
                site: "plant-1".into(),
                model: Some("th-2".into()),
                created_by: "test".into(),
            },
            &rows,
            now(),
            &|_| {},
        )
        .await
        .unwrap();
    clear
}

pub(crate) fn relay_options(h: &Harness, credentials: &StationCredentials) -> RelayOptions {
    RelayOptions {
        broker: h.broker(),
        station_id: credentials.id.clone(),
        root_pem: credentials.root_pem.clone().into_bytes(),
        certificate_pem: credentials.certificate_pem.clone().into_bytes(),
        key_pem: credentials.key_pem.clone().into_bytes(),
    }
}

pub(crate) async fn station(h: &Harness, id: &str, batches: &[&str]) -> StationCredentials {
    let batches: Vec<String> = batches.iter().map(|b| (*b).to_owned()).collect();
    add_station(
        &h.data,
        h.registry(),
        id,
        &batches,
        Duration::from_secs(86_400),
        "cli:test",
        now(),
    )
    .await
    .unwrap()
}

pub(crate) fn tokens_file(
    dir: &std::path::Path,
    tokens: &[(String, String)],
) -> std::path::PathBuf {
    let path = dir.join("batch.tokens.csv");
    let mut text = String::from("id,token\n");
    for (id, token) in tokens {
        text.push_str(&format!("{id},{token}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

async fn a_station_enrolls_a_batch_and_fails_bad_units(db: TestDatabase) {
    let Some(h) = Harness::start(db).await else {
        return;
    };
    let ids: Vec<String> = (0..GOOD + 2).map(|i| format!("unit-{i:03}")).collect();
    let tokens = import(&h, "line-a", &ids).await;
    let credentials = station(&h, "st-1", &["line-a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let pool = TokenPool::open(&tokens_file(dir.path(), &tokens), None).unwrap();
    let relay = Relay::connect(&relay_options(&h, &credentials), Duration::from_secs(10))
        .await
        .unwrap();
    let station = Arc::new(Station {
        relay,
        pool,
        unit_timeout: Duration::from_secs(8),
        hello_interval: Duration::from_millis(250),
        reply_timeout: Duration::from_secs(8),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fixture = listener.local_addr().unwrap();
    let reports = Arc::new(Mutex::new(Vec::<UnitReport>::new()));
    let line = {
        let station = station.clone();
        let reports = reports.clone();
        tokio::spawn(async move {
            let record = |unit: &UnitReport| reports.lock().unwrap().push(unit.clone());
            run(
                station,
                Fixtures::Listen {
                    listener,
                    parallel: 6,
                },
                GOOD + 2,
                &record,
            )
            .await
        })
    };

    let root_pem = std::fs::read(h.root_ca()).unwrap();
    let mut devices = tokio::task::JoinSet::new();
    for i in 0..GOOD + 2 {
        let mut options = LineDeviceOptions::new(root_pem.clone());
        options.timeout = Duration::from_secs(60);
        options.behaviour = match i {
            3 => Behaviour::Garbage,
            11 => Behaviour::Silent,
            _ => Behaviour::Normal,
        };
        devices.spawn(async move {
            let line = tokio::net::TcpStream::connect(fixture).await.unwrap();
            (options.behaviour, run_line_device(line, &options).await)
        });
    }
    let mut enrolled = Vec::new();
    while let Some(joined) = devices.join_next().await {
        match joined.unwrap() {
            (Behaviour::Normal, result) => enrolled.push(result.unwrap()),
            (_, result) => assert!(
                matches!(result, Err(SimError::Internal(_))),
                "a misbehaving device ends when the station drops it: {result:?}"
            ),
        }
    }
    let summary = line.await.unwrap();
    assert_eq!(summary.passed, GOOD, "{summary}");
    assert_eq!(summary.failed, 2, "{summary}");

    // The two bad units are reported with what went wrong.
    let reports = reports.lock().unwrap().clone();
    let failures: Vec<String> = reports
        .iter()
        .filter_map(|r| match &r.outcome {
            UnitOutcome::Failed { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 2);
    assert!(
        failures.iter().all(|f| f.contains("no hello_ack")),
        "{failures:?}"
    );
    assert!(
        failures.iter().any(|f| f.contains("undecodable frame")),
        "the garbage is named: {failures:?}"
    );

    // Every enrolled device: the registry holds exactly its certificate, the
    // device is active, and the station is recorded as its enroller.
    assert_eq!(enrolled.len(), GOOD);
    for result in &enrolled {
        let record = h
            .registry()
            .certificate(&result.serial)
            .await
            .unwrap()
            .expect("the certificate is recorded");
        assert_eq!(record.der, result.certificate);
        let device = h
            .registry()
            .device(&record.device_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(device.status, DeviceStatus::Active);
        let by = h.registry().enrolled_by(&record.device_id).await.unwrap();
        assert_eq!(by.len(), 1);
        assert_eq!(by[0].station_id, "st-1");
        assert_eq!(by[0].serial, result.serial);
        let trail = h.registry().audit_trail(&record.device_id).await.unwrap();
        assert!(
            trail
                .iter()
                .any(|a| a.action == "enroll" && a.outcome == "ok" && a.actor == "station:st-1"),
            "{trail:?}"
        );
        let passed = reports
            .iter()
            .find(|r| r.device_id.as_deref() == Some(record.device_id.as_str()))
            .unwrap();
        assert_eq!(
            passed.outcome,
            UnitOutcome::Passed {
                serial: result.serial.clone()
            }
        );
    }
    // A real enrollment reply fits a link frame in either encoding, with room
    // to spare (docs/protocol.md section 12.1 quotes these sizes).
    let sample = &enrolled[0];
    let mut chain = heapless::Vec::<&[u8], { idgate_pki::protocol::MAX_CHAIN }>::new();
    for certificate in &sample.chain {
        chain.push(certificate).unwrap();
    }
    let issued = Issued {
        rid: &sample.rid,
        certificate: &sample.certificate,
        chain,
        serial: &sample.serial,
        not_before: sample.not_before,
        not_after: sample.not_after,
        time: sample.gateway_time,
        renew_after: sample.renew_after,
        renew_before: sample.renew_before,
    };
    for format in [Format::Cbor, Format::Json] {
        let payload = encode_issued(format, &issued);
        let frame = Frame::Reply {
            op: Op::Enroll,
            format,
            outcome: Reply::Accepted,
            payload: &payload,
        };
        eprintln!(
            "enroll reply, {}: payload {} bytes, link body {} of {} bytes",
            format.as_str(),
            payload.len(),
            frame.body_len(),
            link::MAX_BODY
        );
        assert!(frame.body_len() <= link::MAX_BODY / 2);
    }
    let station_row = h.registry().station("st-1").await.unwrap().unwrap();
    assert_eq!(station_row.enrolled, GOOD as i64);
    // The ids the bad units were given stay pending (their tokens unused).
    let batch = h.registry().batch("line-a").await.unwrap().unwrap();
    assert_eq!(batch.enrolled, GOOD as i64);

    // Renewed with the old certificate revoked (on either backend): the old
    // serial is revoked as superseded, the new one is not, and the CRL
    // counter moved so that gateways rebuild their CRL.
    let epoch = h.registry().revocation_epoch().await.unwrap();
    let renewed = renew_station(
        &h.data,
        h.registry(),
        "st-1",
        Duration::from_secs(86_400),
        Some("superseded"),
        "cli:test",
        now(),
    )
    .await
    .unwrap();
    assert_eq!(renewed.revoked, vec![credentials.serial.clone()]);
    assert!(h.registry().revocation_epoch().await.unwrap() > epoch);
    let old = h
        .registry()
        .station_certificate_record(&credentials.serial)
        .await
        .unwrap()
        .unwrap();
    assert!(old.revoked_at.is_some());
    assert_eq!(old.revocation_reason.as_deref(), Some("superseded"));
    let new = h
        .registry()
        .station_certificate_record(&renewed.credentials.serial)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.revoked_at, None);
    if let Ok(station) = Arc::try_unwrap(station) {
        station.relay.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_is_refused_devices_outside_its_batches_and_once_revoked() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    import(&h, "mine", &["mine-1".to_owned()]).await;
    let theirs = import(&h, "theirs", &["theirs-1".to_owned()]).await;
    let credentials = station(&h, "st-2", &["mine"]).await;
    let options = relay_options(&h, &credentials);
    let relay = Relay::connect(&options, Duration::from_secs(10))
        .await
        .unwrap();

    // A well-formed request with the right token, for a device of another
    // batch: refused like an unknown device, and nothing is issued.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let (id, token) = &theirs[0];
    let proof = enrollment_proof(token.as_bytes(), &csr);
    let payload = encode_enroll(
        Format::Cbor,
        &EnrollRequest {
            rid: "0123456789abcdef",
            csr: &csr,
            proof: &proof,
        },
    );
    let (reply, answer) = relay
        .enroll(id, Format::Cbor, &payload, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reply, Reply::Rejected);
    let rejected = decode_rejected(Format::Cbor, &answer).unwrap();
    assert_eq!(rejected.code, "unknown_device");
    assert_eq!(h.registry().certificate_count(id).await.unwrap(), 0);
    let device = h.registry().device(id).await.unwrap().unwrap();
    assert_eq!(device.status, DeviceStatus::Pending);

    // Revoked: the CRL lists it and a new handshake is refused.
    let serials = h
        .registry()
        .revoke_station("st-2", "keyCompromise", "cli:test", now())
        .await
        .unwrap();
    assert_eq!(serials, vec![credentials.serial.clone()]);
    let target = h.registry().revocation_epoch().await.unwrap();
    let mut applied = h.gateway.revocation();
    tokio::time::timeout(
        Duration::from_secs(10),
        applied.wait_for(|s| s.epoch >= target),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        h.gateway
            .revocation()
            .borrow()
            .revoked
            .contains(&credentials.serial)
    );
    // The OCSP responder knows station certificates too (openssl asks it).
    let dir = tempfile::tempdir().unwrap();
    let station_pem = credentials
        .certificate_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    std::fs::write(dir.path().join("station.pem"), station_pem).unwrap();
    std::fs::copy(h.data.issuing_certificate(), dir.path().join("issuing.pem")).unwrap();
    std::fs::copy(h.root_ca(), dir.path().join("root.pem")).unwrap();
    let url = format!("http://{}/ocsp", h.gateway.http_address());
    let output = std::process::Command::new("openssl")
        .args([
            "ocsp",
            "-issuer",
            "issuing.pem",
            "-cert",
            "station.pem",
            "-url",
            &url,
        ])
        .args(["-CAfile", "root.pem", "-verify_other", "issuing.pem"])
        .current_dir(dir.path())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        out.contains("Response verify OK") && out.contains("station.pem: revoked"),
        "{out}"
    );
    assert!(out.contains("keyCompromise"), "{out}");
    match Relay::connect(&options, Duration::from_secs(10)).await {
        Err(RelayError::Connect(reason)) => {
            assert!(!reason.is_empty());
        }
        other => panic!("a revoked station must be refused: {other:?}"),
    }
    let row = h.registry().station("st-2").await.unwrap().unwrap();
    assert_eq!(row.status.as_str(), "revoked");
    relay.close().await;
}

/// A unit whose earlier attempt failed after it was given its id comes back
/// `provisioned`: it gets its own token again, while a blank unit gets the
/// next id the journal says no device has had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_unit_keeps_its_id_and_the_journal_skips_it() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let ids = ["ret-1".to_owned(), "ret-2".to_owned(), "ret-3".to_owned()];
    let tokens = import(&h, "ret", &ids).await;
    let credentials = station(&h, "st-3", &["ret"]).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens_path = tokens_file(dir.path(), &tokens);
    // A previous run gave ret-1 to a unit that failed.
    let mut journal = tokens_path.as_os_str().to_owned();
    journal.push(".journal");
    std::fs::write(&journal, "assigned,ret-1\nfail,ret-1,timed out\n").unwrap();
    let pool = TokenPool::open(&tokens_path, None).unwrap();
    assert_eq!(pool.remaining(), 2);
    let relay = Relay::connect(&relay_options(&h, &credentials), Duration::from_secs(10))
        .await
        .unwrap();
    let station = Station {
        relay,
        pool,
        unit_timeout: Duration::from_secs(20),
        hello_interval: Duration::from_millis(250),
        reply_timeout: Duration::from_secs(10),
    };
    let root_pem = std::fs::read(h.root_ca()).unwrap();
    for provisioned in [Some(tokens[0].clone()), None] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut options = LineDeviceOptions::new(root_pem.clone());
        options.provisioned = provisioned.clone();
        let device = tokio::spawn(async move {
            let line = tokio::net::TcpStream::connect(address).await.unwrap();
            run_line_device(line, &options).await
        });
        let (line, _) = listener.accept().await.unwrap();
        let unit = run_unit(&station, line, "test", false, None).await;
        let enrolled = device.await.unwrap().unwrap();
        let expected = if provisioned.is_some() {
            "ret-1"
        } else {
            "ret-2"
        };
        assert_eq!(unit.device_id.as_deref(), Some(expected));
        assert_eq!(
            unit.outcome,
            UnitOutcome::Passed {
                serial: enrolled.serial.clone()
            }
        );
        let record = h
            .registry()
            .certificate(&enrolled.serial)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.device_id, expected);
    }
    assert_eq!(station.pool.remaining(), 1);
    let journal = std::fs::read_to_string(&journal).unwrap();
    assert!(journal.contains("assigned,ret-2\n"), "{journal}");
    assert!(journal.contains("pass,ret-1,"), "{journal}");
    station.relay.close().await;
}

/// The gateway refuses a unit (here: the tokens file has a wrong token for
/// it): the device reports the gateway's code, the station fails the unit
/// with it, and the refusal is audited with the station as actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_unit_is_failed_with_the_gateway_code() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    import(&h, "bad", &["bad-1".to_owned()]).await;
    let credentials = station(&h, "st-4", &["bad"]).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = vec![(
        "bad-1".to_owned(),
        "abcdefghijklmnopqrstuvwxyz234567".to_owned(),
    )];
    let station = Station {
        relay: Relay::connect(&relay_options(&h, &credentials), Duration::from_secs(10))
            .await
            .unwrap(),
        pool: TokenPool::open(&tokens_file(dir.path(), &wrong), None).unwrap(),
        unit_timeout: Duration::from_secs(20),
        hello_interval: Duration::from_millis(250),
        reply_timeout: Duration::from_secs(10),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let options = LineDeviceOptions::new(std::fs::read(h.root_ca()).unwrap());
    let device = tokio::spawn(async move {
        let line = tokio::net::TcpStream::connect(address).await.unwrap();
        run_line_device(line, &options).await
    });
    let (line, _) = listener.accept().await.unwrap();
    let unit = run_unit(&station, line, "test", false, None).await;
    match &unit.outcome {
        UnitOutcome::Failed { reason } => {
            assert!(reason.contains("the device failed: bad_proof"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        device.await.unwrap(),
        Err(SimError::Rejected { code, .. }) if code == "bad_proof"
    ));
    assert_eq!(h.registry().certificate_count("bad-1").await.unwrap(), 0);
    let trail = h.registry().audit_trail("bad-1").await.unwrap();
    assert!(
        trail
            .iter()
            .any(|a| a.actor == "station:st-4" && a.outcome == "bad_proof"),
        "{trail:?}"
    );
    station.relay.close().await;
}

/// A board on the fixture that claims to hold an id it was never given, or
/// the id of a unit that passed, does not get that id's token: its unit
/// fails with the reason and the station goes on with the next unit, which
/// enrolls as usual. Nothing is journaled as assigned for the claimed ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_claiming_an_id_it_was_not_given_gets_no_token() {
    let h = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let ids = ["own-1".to_owned(), "own-2".to_owned(), "own-3".to_owned()];
    let tokens = import(&h, "own", &ids).await;
    let credentials = station(&h, "st-5", &["own"]).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens_path = tokens_file(dir.path(), &tokens);
    let station = Arc::new(Station {
        relay: Relay::connect(&relay_options(&h, &credentials), Duration::from_secs(10))
            .await
            .unwrap(),
        pool: TokenPool::open(&tokens_path, None).unwrap(),
        unit_timeout: Duration::from_secs(20),
        hello_interval: Duration::from_millis(250),
        reply_timeout: Duration::from_secs(10),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fixture = listener.local_addr().unwrap();
    let (sent, mut reports) = tokio::sync::mpsc::unbounded_channel::<UnitReport>();
    let line = {
        let station = station.clone();
        tokio::spawn(async move {
            let record = |unit: &UnitReport| sent.send(unit.clone()).unwrap();
            run(
                station,
                Fixtures::Listen {
                    listener,
                    parallel: 1,
                },
                4,
                &record,
            )
            .await
        })
    };
    let root_pem = std::fs::read(h.root_ca()).unwrap();
    // One unit at a time, each with the report of the one before in hand.
    let mut unit = async |claim: Option<&str>| {
        let mut options = LineDeviceOptions::new(root_pem.clone());
        options.provisioned = claim.map(|id| (id.to_owned(), "not-the-token".to_owned()));
        let line = tokio::net::TcpStream::connect(fixture).await.unwrap();
        let device = run_line_device(line, &options).await;
        (device, reports.recv().await.unwrap())
    };
    let failed_with = |report: &UnitReport, expected: &str| match &report.outcome {
        UnitOutcome::Failed { reason } => assert!(reason.contains(expected), "{reason}"),
        other => panic!("{other:?}"),
    };

    // 1. own-3 was never given to a unit: refused, and the device, which
    // would enroll with the token if it got one, is left with nothing.
    let (device, report) = unit(Some("own-3")).await;
    assert!(matches!(device, Err(SimError::Internal(_))), "{device:?}");
    assert_eq!(report.device_id.as_deref(), Some("own-3"));
    failed_with(&report, "never assigned to a unit");
    // 2. A blank unit gets the first id and passes.
    let (device, report) = unit(None).await;
    let enrolled = device.unwrap();
    assert_eq!(report.device_id.as_deref(), Some("own-1"));
    assert_eq!(
        report.outcome,
        UnitOutcome::Passed {
            serial: enrolled.serial.clone()
        }
    );
    // 3. A board claiming the id that just passed: refused.
    let (device, report) = unit(Some("own-1")).await;
    assert!(matches!(device, Err(SimError::Internal(_))), "{device:?}");
    failed_with(&report, "has passed already");
    // 4. An id from no tokens file at all.
    let (device, report) = unit(Some("elsewhere-7")).await;
    assert!(matches!(device, Err(SimError::Internal(_))), "{device:?}");
    failed_with(&report, "not in this station's tokens file");
    let summary = line.await.unwrap();
    assert_eq!((summary.passed, summary.failed), (1, 3), "{summary}");

    // No token left the station for own-3 (it can still enroll, exactly
    // once, with its token), own-1 holds exactly its one certificate.
    assert_eq!(h.registry().certificate_count("own-3").await.unwrap(), 0);
    assert_eq!(h.registry().certificate_count("own-1").await.unwrap(), 1);
    assert_eq!(
        h.registry().device("own-3").await.unwrap().unwrap().status,
        DeviceStatus::Pending
    );
    assert_eq!(station.pool.remaining(), 2);
    let mut journal = tokens_path.as_os_str().to_owned();
    journal.push(".journal");
    let journal = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(
        journal
            .lines()
            .filter(|l| l.starts_with("assigned,"))
            .collect::<Vec<_>>(),
        ["assigned,own-1"],
        "{journal}"
    );
    assert!(journal.contains("fail,own-3,"), "{journal}");
    if let Ok(station) = Arc::try_unwrap(station) {
        station.relay.close().await;
    }
}
