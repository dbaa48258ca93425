//! `idgate station …` and `idgate line` as a line operator runs them, against
//! a running gateway: a station registered for a batch enrolls a simulated
//! device (the real agent, over TCP standing in for its serial port) and
//! exits 0; a silent unit makes it exit 1 with the reason; once revoked, the
//! station cannot connect.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use idgate_gateway::datadir::DataDir;
use idgate_gateway::gateway::{Gateway, Settings};
use idgate_sim::{Behaviour, LineDeviceOptions, run_line_device};

fn idgate(data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idgate"));
    command.arg("--data").arg(data).env("IDGATE_LOG", "warn");
    command
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("run idgate"))
        .await
        .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fixture with one simulated device behaving as `behaviour`; its address.
async fn fixture(root_pem: Vec<u8>, behaviour: Behaviour) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    tokio::spawn(async move {
        let (line, _) = listener.accept().await.expect("accept");
        let mut options = LineDeviceOptions::new(root_pem);
        options.behaviour = behaviour;
        options.timeout = Duration::from_secs(60);
        let _ = run_line_device(line, &options).await;
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn station_commands_and_exit_status() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data_path = dir.path().join("data");
    let data = DataDir::new(&data_path);
    let mut settings = Settings::new(data.clone());
    settings.mqtt_listen = "127.0.0.1:0".parse().expect("address");
    settings.http_listen = "127.0.0.1:0".parse().expect("address");
    settings.admin.listen = "127.0.0.1:0".parse().expect("address");
    let gateway = Gateway::start(settings).await.expect("gateway starts");
    let broker = format!("127.0.0.1:{}", gateway.mqtt_address().port());
    let root_pem = std::fs::read(data.root_certificate()).expect("root");

    let csv = dir.path().join("b1.csv");
    std::fs::write(&csv, "id\ncli-1\ncli-2\ncli-3\n").expect("csv");
    let mut import = idgate(&data_path);
    import.args(["batch", "import"]).arg(&csv).args([
        "--owner",
        "line@example.com",
        "--site",
        "plant-1",
        "--batch",
        "b1",
    ]);
    let imported = run(import).await;
    assert!(imported.status.success(), "{}", text(&imported.stderr));

    // A station for a batch that does not exist is refused.
    let station_dir = dir.path().join("station-fx");
    let mut bad = idgate(&data_path);
    bad.args(["station", "add", "fx", "--batch", "nope", "--out"])
        .arg(&station_dir);
    let refused = run(bad).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("no batch `nope`"),
        "{}",
        text(&refused.stderr)
    );

    let mut add = idgate(&data_path);
    add.args(["station", "add", "fx", "--batch", "b1", "--out"])
        .arg(&station_dir);
    let added = run(add).await;
    assert!(added.status.success(), "{}", text(&added.stderr));
    let mode = std::fs::metadata(station_dir.join("station.key"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let line_with = |address: &str, timeout: &str, files: &Path| {
        let mut command = idgate(&data_path);
        command
            .args([
                "line",
                "--broker",
                &broker,
                "--station",
                "fx",
                "--station-dir",
            ])
            .arg(files)
            .arg("--tokens")
            .arg(dir.path().join("b1.tokens.csv"))
            .args(["--tcp", address, "--units", "1", "--unit-timeout", timeout]);
        command
    };
    let line = |address: &str, timeout: &str| line_with(address, timeout, &station_dir);

    // One good unit: exit 0, the summary on stdout, the unit on stderr.
    let good = fixture(root_pem.clone(), Behaviour::Normal).await;
    let passed = run(line(&good, "20")).await;
    let (out, err) = (text(&passed.stdout), text(&passed.stderr));
    assert!(passed.status.success(), "{out}\n{err}");
    assert!(out.contains("1 unit(s): 1 passed, 0 failed"), "{out}");
    assert!(err.contains("PASS cli-1"), "{err}");

    let mut show = idgate(&data_path);
    show.args(["device", "show", "cli-1"]);
    let shown = run(show).await;
    assert!(
        text(&shown.stdout).contains("enrolled by line station fx"),
        "{}",
        text(&shown.stdout)
    );

    // A silent unit: exit 1, the reason reported.
    let silent = fixture(root_pem.clone(), Behaviour::Silent).await;
    let failed = run(line(&silent, "2")).await;
    let (out, err) = (text(&failed.stdout), text(&failed.stderr));
    assert_eq!(failed.status.code(), Some(1), "{out}\n{err}");
    assert!(out.contains("1 unit(s): 0 passed, 1 failed"), "{out}");
    assert!(err.contains("no hello_ack within 2s"), "{err}");

    // A renewed certificate works as well, and revoking the station covers
    // every certificate it holds.
    let renewed_dir = dir.path().join("station-fx-renewed");
    let mut renew = idgate(&data_path);
    renew
        .args(["station", "renew", "fx", "--out"])
        .arg(&renewed_dir);
    let renewed = run(renew).await;
    assert!(renewed.status.success(), "{}", text(&renewed.stderr));
    assert!(text(&renewed.stdout).contains("new certificate"));
    // It enrolls the next unit (the silent one never answered, so it was
    // never given an id: cli-2 is still free).
    let spare = fixture(root_pem.clone(), Behaviour::Normal).await;
    let with_renewed = run(line_with(&spare, "20", &renewed_dir)).await;
    let err = text(&with_renewed.stderr);
    assert!(err.contains("station fx connected"), "{err}");
    assert!(err.contains("PASS cli-2"), "{err}");
    assert!(with_renewed.status.success(), "{err}");

    // Renewing with --revoke-old (after a key compromise): both earlier
    // certificates go on the CRL at once, the old files are refused at the
    // handshake, the new ones work.
    let before = gateway
        .registry()
        .station_certificates("fx")
        .await
        .expect("certificates");
    assert_eq!(before.len(), 2);
    let third_dir = dir.path().join("station-fx-third");
    let mut renew = idgate(&data_path);
    renew
        .args([
            "station",
            "renew",
            "fx",
            "--revoke-old",
            "--reason",
            "compromised",
            "--out",
        ])
        .arg(&third_dir);
    let renewed = run(renew).await;
    let out = text(&renewed.stdout);
    assert!(renewed.status.success(), "{}", text(&renewed.stderr));
    assert!(out.contains("Revoked 2 earlier certificate(s)"), "{out}");
    let after = gateway
        .registry()
        .station_certificates("fx")
        .await
        .expect("certificates");
    assert_eq!(after.len(), 3);
    let old: Vec<&str> = before.iter().map(|c| c.serial.as_str()).collect();
    for certificate in &after {
        let was_old = old.contains(&certificate.serial.as_str());
        assert_eq!(certificate.revoked_at.is_some(), was_old, "{certificate:?}");
        let revoked_line = out
            .lines()
            .find(|l| l.starts_with("Revoked"))
            .expect("revoked");
        assert_eq!(revoked_line.contains(&certificate.serial), was_old, "{out}");
    }
    let target = gateway.registry().revocation_epoch().await.expect("epoch");
    let mut applied = gateway.revocation();
    let state = tokio::time::timeout(
        Duration::from_secs(10),
        applied.wait_for(|s| s.epoch >= target),
    )
    .await
    .expect("revocation applied in time")
    .expect("gateway running")
    .clone();
    // The signed CRL lists exactly the two old serials, as keyCompromise.
    let (_, crl) = x509_parser::parse_x509_crl(&state.crl).expect("the CRL parses");
    let mut listed: Vec<(String, String)> = crl
        .iter_revoked_certificates()
        .map(|r| {
            let reason = r
                .reason_code()
                .map(|(_, code)| code.to_string())
                .unwrap_or_default();
            (r.raw_serial_as_string().replace(':', ""), reason)
        })
        .collect();
    listed.sort();
    let mut expected: Vec<(String, String)> = old
        .iter()
        .map(|s| (s.to_string(), "KeyCompromise".to_owned()))
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    let unused = fixture(root_pem.clone(), Behaviour::Normal).await;
    let refused = run(line_with(&unused, "20", &renewed_dir)).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("connecting to the gateway"),
        "{}",
        text(&refused.stderr)
    );
    let spare = fixture(root_pem.clone(), Behaviour::Normal).await;
    let with_third = run(line_with(&spare, "20", &third_dir)).await;
    let err = text(&with_third.stderr);
    assert!(err.contains("PASS cli-3"), "{err}");

    // Revoked: the station is refused at the handshake.
    let mut revoke = idgate(&data_path);
    revoke.args(["station", "revoke", "fx", "--reason", "compromised"]);
    let revoked = run(revoke).await;
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let target = gateway.registry().revocation_epoch().await.expect("epoch");
    let mut applied = gateway.revocation();
    tokio::time::timeout(
        Duration::from_secs(10),
        applied.wait_for(|s| s.epoch >= target),
    )
    .await
    .expect("revocation applied in time")
    .expect("gateway running");
    for station_files in [&station_dir, &renewed_dir, &third_dir] {
        let unused = fixture(root_pem.clone(), Behaviour::Normal).await;
        let refused = run(line_with(&unused, "20", station_files)).await;
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            text(&refused.stderr).contains("connecting to the gateway"),
            "{}",
            text(&refused.stderr)
        );
    }
    gateway.shutdown().await;
}

/// The serial path for real: a pseudo-terminal pair stands in for the
/// fixture's cable; the station opens the slave by its path as it would
/// `/dev/ttyUSB0`, the simulated device talks on the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_enrolls_over_a_serial_port() {
    use idgate_gateway::line::admin::add_station;
    use idgate_gateway::line::relay::{Relay, RelayOptions};
    use idgate_gateway::line::station::{Fixtures, Station, UnitOutcome, UnitReport, run};
    use idgate_gateway::line::tokens::TokenPool;
    use idgate_gateway::registry::{NewBatch, NewDevice, now};
    use serialport::SerialPort as _;

    let dir = tempfile::tempdir().expect("temporary directory");
    let data = DataDir::new(dir.path().join("data"));
    let mut settings = Settings::new(data.clone());
    settings.mqtt_listen = "127.0.0.1:0".parse().expect("address");
    settings.http_listen = "127.0.0.1:0".parse().expect("address");
    settings.admin.listen = "127.0.0.1:0".parse().expect("address");
    let gateway = Gateway::start(settings).await.expect("gateway starts");
    let registry = gateway.registry().clone();
    let new = data.tokens().expect("seal key").generate("tty-1");
    registry
        .import_batch(
            &NewBatch {
                id: "tty".into(),
                owner: "line@example.com".into(),
                site: "plant-1".into(),
                model: None,
                created_by: "test".into(),
            },
            &[(
                NewDevice {
                    id: "tty-1".into(),
                    owner: "line@example.com".into(),
                    site: "plant-1".into(),
                    model: None,
                    label: None,
                    created_by: "test".into(),
                },
                new.sealed,
            )],
            now(),
            &|_| {},
        )
        .await
        .expect("import");
    let credentials = add_station(
        &data,
        &registry,
        "tty-station",
        &["tty".to_owned()],
        Duration::from_secs(86_400),
        "test",
        now(),
    )
    .await
    .expect("station");
    let tokens = dir.path().join("tty.tokens.csv");
    std::fs::write(&tokens, format!("id,token\ntty-1,{}\n", new.token)).expect("tokens");
    let relay = Relay::connect(
        &RelayOptions {
            broker: format!("127.0.0.1:{}", gateway.mqtt_address().port()),
            station_id: credentials.id.clone(),
            root_pem: credentials.root_pem.clone().into_bytes(),
            certificate_pem: credentials.certificate_pem.clone().into_bytes(),
            key_pem: credentials.key_pem.clone().into_bytes(),
        },
        Duration::from_secs(10),
    )
    .await
    .expect("relay");
    let station = std::sync::Arc::new(Station {
        relay,
        pool: TokenPool::open(&tokens, None).expect("pool"),
        unit_timeout: Duration::from_secs(20),
        hello_interval: Duration::from_millis(250),
        reply_timeout: Duration::from_secs(10),
    });

    let (mut master, slave) = serialport::TTYPort::pair().expect("pseudo-terminal pair");
    let path = slave.name().expect("the slave has a path");
    master
        .set_timeout(Duration::from_millis(100))
        .expect("timeout");
    let device_end =
        idgate_gateway::line::serial::bridge(Box::new(master), "pty master").expect("bridge");
    let station_end = idgate_gateway::line::serial::open(&path, 115_200).expect("open the slave");
    let root_pem = std::fs::read(data.root_certificate()).expect("root");
    let device = tokio::spawn(async move {
        run_line_device(device_end, &LineDeviceOptions::new(root_pem)).await
    });
    let reports = std::sync::Mutex::new(Vec::<UnitReport>::new());
    let record = |unit: &UnitReport| reports.lock().expect("lock").push(unit.clone());
    let summary = run(
        station.clone(),
        Fixtures::Streams(vec![(format!("serial {path}"), station_end)]),
        1,
        &record,
    )
    .await;
    let enrolled = device.await.expect("join").expect("the device enrolled");
    assert_eq!(summary.passed, 1, "{:?}", reports.lock().expect("lock"));
    let reports = reports.into_inner().expect("lock");
    assert_eq!(reports[0].device_id.as_deref(), Some("tty-1"));
    assert_eq!(
        reports[0].outcome,
        UnitOutcome::Passed {
            serial: enrolled.serial.clone()
        }
    );
    let by = registry.enrolled_by("tty-1").await.expect("enrolled_by");
    assert_eq!(by[0].station_id, "tty-station");
    drop(slave);
    gateway.shutdown().await;
}
