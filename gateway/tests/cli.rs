//! The `idgate` binary as a user runs it: `serve` on a fresh machine (no data
//! directory), `device add`, an enrollment, `device show/list`, `ca show`,
//! `openssl verify` on the result, and a graceful stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use idgate_pki::ca::to_pem;
use idgate_sim::{EnrollOptions, enroll};

fn idgate(data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idgate"));
    command
        .arg("--data")
        .arg(data)
        .env_remove("IDGATE_DATABASE");
    command
}

fn run_ok(command: &mut Command) -> String {
    let output = command.output().expect("run idgate");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Starts `idgate serve` and returns it with the port it printed.
fn serve(data: &Path) -> (Child, u16, mpsc::Receiver<String>) {
    let mut child = idgate(data)
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start idgate serve");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let port = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("idgate serve prints where devices connect");
        if let Some(address) = line.split("mqtts://").nth(1) {
            let address = address.split_whitespace().next().expect("address");
            break address
                .rsplit(':')
                .next()
                .expect("port")
                .parse()
                .expect("port number");
        }
    };
    (child, port, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_machine_serve_register_enroll_verify_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("idgate-data");

    // Before anything exists, registry commands say what to do.
    let output = idgate(&data).args(["device", "list"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no data directory"));

    let (mut gateway, port, lines) = serve(&data);
    let mut printed: Vec<String> = Vec::new();
    while !printed.iter().any(|l| l.contains("OCSP responder")) {
        printed.push(
            lines
                .recv_timeout(Duration::from_secs(30))
                .expect("serve prints its endpoints"),
        );
    }
    assert!(printed.iter().any(|l| l.contains("/crl")), "{printed:?}");
    assert!(
        data.join("ca/root.pem").exists(),
        "serve initialised the data directory"
    );

    let added = run_ok(idgate(&data).args([
        "device",
        "add",
        "sensor-1",
        "--owner",
        "fm@example.com",
        "--site",
        "berlin",
        "--label",
        "B7-F2-014",
        "--json",
    ]));
    let added: serde_json::Value = serde_json::from_str(&added).unwrap();
    let token = added["token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 26, "≥ 128 bits in base32");
    let registry = std::fs::read(data.join("registry.db")).unwrap();
    assert!(
        !registry.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token is not stored in clear"
    );

    let root_pem = std::fs::read(data.join("ca/root.pem")).unwrap();
    let enrolled = enroll(&EnrollOptions::new(
        format!("127.0.0.1:{port}"),
        root_pem,
        "sensor-1",
        token.clone(),
    ))
    .await
    .unwrap();

    // What the README tells users to run.
    let out = dir.path().join("device");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("cert.pem"), to_pem(&[&enrolled.certificate])).unwrap();
    let chain: Vec<&[u8]> = enrolled.chain.iter().map(Vec::as_slice).collect();
    std::fs::write(out.join("chain.pem"), to_pem(&chain)).unwrap();
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(data.join("ca/root.pem"))
        .arg("-untrusted")
        .arg(out.join("chain.pem"))
        .arg(out.join("cert.pem"))
        .output()
        .expect("openssl is installed");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("cert.pem: OK"));

    let shown = run_ok(idgate(&data).args(["device", "show", "sensor-1"]));
    assert!(shown.contains("status      active"), "{shown}");
    assert!(shown.contains("label       B7-F2-014"), "{shown}");
    assert!(shown.contains(&enrolled.serial), "{shown}");
    assert!(
        shown.contains("device.add") && shown.contains("enroll"),
        "{shown}"
    );

    let listed = run_ok(idgate(&data).args([
        "device", "list", "--site", "berlin", "--status", "active", "--json",
    ]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], "sensor-1");
    let none = run_ok(idgate(&data).args(["device", "list", "--site", "paris", "--json"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&none).unwrap(),
        serde_json::json!([])
    );

    let ca = run_ok(idgate(&data).args(["ca", "show"]));
    assert!(
        ca.contains("Root CA") && ca.contains("Issuing CA") && ca.contains("path length 0"),
        "{ca}"
    );
    let again = idgate(&data).args(["ca", "init"]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let duplicate = idgate(&data)
        .args([
            "device",
            "add",
            "sensor-1",
            "--owner",
            "fm@example.com",
            "--site",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already exists"));
    let bad = idgate(&data)
        .args([
            "device",
            "add",
            "a/b",
            "--owner",
            "fm@example.com",
            "--site",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // Suspend, resume, revoke: as facilities staff would type them.
    let out = run_ok(idgate(&data).args(["device", "suspend", "sensor-1"]));
    assert!(
        out.contains("Suspended device sensor-1; 1 certificate(s) on hold"),
        "{out}"
    );
    let out = run_ok(idgate(&data).args(["device", "resume", "sensor-1"]));
    assert!(out.contains("Resumed device sensor-1"), "{out}");
    let bogus = idgate(&data)
        .args(["device", "revoke", "sensor-1", "--reason", "misplaced"])
        .output()
        .unwrap();
    assert!(!bogus.status.success());
    assert!(
        String::from_utf8_lossy(&bogus.stderr)
            .contains("lost, stolen, compromised, retired, superseded")
    );
    let out = run_ok(idgate(&data).args(["device", "revoke", "sensor-1", "--reason", "stolen"]));
    assert!(
        out.contains("Revoked device sensor-1 (stolen); 1 certificate(s) revoked"),
        "{out}"
    );
    let twice = idgate(&data)
        .args(["device", "revoke", "sensor-1", "--reason", "stolen"])
        .output()
        .unwrap();
    assert!(!twice.status.success());
    assert!(
        String::from_utf8_lossy(&twice.stderr)
            .contains("cannot revoke device `sensor-1`: it is revoked")
    );
    let unknown = idgate(&data)
        .args(["device", "suspend", "ghost"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no device `ghost` is registered"));
    let shown = run_ok(idgate(&data).args(["device", "show", "sensor-1"]));
    assert!(
        shown.contains("status      revoked") && shown.contains("reason=stolen"),
        "{shown}"
    );

    // SIGTERM: a clean stop with exit status 0.
    let pid = gateway.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || gateway.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    drop(printed);
}
