//! The firmware image on an emulated MCU: QEMU's `lm3s6965evb` (Cortex-M3,
//! the gating board) and `mps2-an386` (Cortex-M4F) boot the real agent image
//! (`hardware/boards/<board>`, release, `--locked`),
//! its UART0 bridged to a TCP socket; the line station (`idgate line`'s
//! library, with its station certificate) relays the line link
//! (`idgate_pki::link`) to a real gateway over MQTT/TLS. The device generates
//! its key from its DRBG, sends its CSR, checks the chain against the root
//! pinned in its factory page, stores the credential in its A/B store and
//! reports `Done`. The certificate must be in the registry and verify to the
//! CA.
//!
//! Needs `qemu-system-arm` (Debian package of that name) and the
//! `thumbv7m-none-eabi` and `thumbv7em-none-eabihf` targets: `.ci/run` installs them. Without them the test
//! fails and says so.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idgate_board::factory::{FACTORY_PAGE, write_factory_page};
use idgate_gateway::line::relay::Relay;
use idgate_gateway::line::station::{Station, UnitOutcome, run_unit};
use idgate_gateway::line::tokens::TokenPool;
use idgate_gateway::registry::DeviceStatus;
use idgate_gateway::testing::TestDatabase;
use idgate_pki::ca::pem_certificates;
use idgate_tests::Harness;
use tokio::net::TcpListener;

/// Where the programming station writes the factory page (both boards' memory.x).
const FACTORY_ADDRESS: u32 = 0x0003_F000;
/// The whole session, from QEMU's start to its exit, must end within this.
const SESSION: Duration = Duration::from_secs(120);

/// A QEMU board and the image built for it.
struct BoardImage {
    /// The folder under `hardware/boards/`, also QEMU's machine name.
    board: &'static str,
    /// The Rust target the image is built for.
    target: &'static str,
    /// The device id the station enrolls it as.
    device_id: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lm3s6965_image_enrolls_through_its_uart() {
    board_enrolls_through_its_uart(BoardImage {
        board: "lm3s6965evb",
        target: "thumbv7m-none-eabi",
        device_id: "qemu-lm3s-0001",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mps2_an386_image_enrolls_through_its_uart() {
    board_enrolls_through_its_uart(BoardImage {
        board: "mps2-an386",
        target: "thumbv7em-none-eabihf",
        device_id: "qemu-mps2-0001",
    })
    .await;
}

async fn board_enrolls_through_its_uart(board: BoardImage) {
    let qemu = which("qemu-system-arm").unwrap_or_else(|| {
        panic!(
            "qemu-system-arm is not installed: the firmware test boots the board image in it \
             (Debian: apt-get install qemu-system-arm; .ci/run does this)"
        )
    });
    let (name, target) = (board.board, board.target);
    let image = tokio::task::spawn_blocking(move || build_image(name, target))
        .await
        .unwrap();

    let harness = Harness::start(TestDatabase::Sqlite).await.unwrap();
    let device_id = board.device_id;
    let tokens = crate::line::import(&harness, "qemu-batch", &[device_id.to_owned()]).await;
    let credentials = crate::line::station(&harness, "qemu-station", &["qemu-batch"]).await;
    let root_pem = std::fs::read_to_string(harness.root_ca()).unwrap();
    let root_der = pem_certificates(&root_pem).unwrap().remove(0);

    // The programming station's part: a random seed and the pinned root.
    let dir = tempfile::tempdir().unwrap();
    let mut seed = [0u8; 32];
    rand_bytes(&mut seed);
    let mut page = Box::new([0u8; FACTORY_PAGE]);
    let len = write_factory_page(&seed, &[&root_der], &mut page).unwrap();
    let factory = dir.path().join("factory.bin");
    std::fs::write(&factory, &page[..len]).unwrap();

    // QEMU connects its UART to our listener.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut qemu = Qemu::start(&qemu, board.board, &image, &factory, port);
    let (line, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .unwrap_or_else(|_| panic!("QEMU did not connect its serial port: {}", qemu.output()))
        .unwrap();

    let deadline = Instant::now() + SESSION;
    let relay = Relay::connect(
        &crate::line::relay_options(&harness, &credentials),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let station = Station {
        relay,
        pool: TokenPool::open(&crate::line::tokens_file(dir.path(), &tokens), None).unwrap(),
        unit_timeout: SESSION,
        hello_interval: Duration::from_secs(2),
        reply_timeout: Duration::from_secs(30),
    };
    let unit = run_unit(&station, line, "qemu uart0", false, None).await;
    let exit = tokio::task::spawn_blocking(move || {
        let status = qemu.wait_until(deadline);
        (status, qemu.output())
    })
    .await
    .unwrap();
    let (status, output) = exit;
    let serial = match &unit.outcome {
        UnitOutcome::Passed { serial } => serial.clone(),
        other => panic!("station: {other:?}\nQEMU output:\n{output}"),
    };
    assert_eq!(unit.device_id.as_deref(), Some(device_id));
    // The image reports through semihosting and exits 0 once enrolled.
    println!("device report:\n{output}");
    assert_eq!(status, Some(0), "QEMU exit status; output:\n{output}");
    assert!(output.contains("outcome: Enrolled"), "{output}");
    assert!(output.contains("footprint: stack peak"), "{output}");

    // The registry holds exactly the certificate the device reported.
    let device = harness.registry().device(device_id).await.unwrap().unwrap();
    assert_eq!(device.status, DeviceStatus::Active);
    let recorded = harness.registry().certificates(device_id).await.unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].serial, serial);
    let certificate = recorded[0].der.clone();
    // The creation chain names the station.
    let by = harness.registry().enrolled_by(device_id).await.unwrap();
    assert_eq!(by.len(), 1);
    assert_eq!(by[0].station_id, "qemu-station");
    let (_, chain) = harness.data.load_issuing_ca().unwrap();

    // It verifies to the CA (webpki, for client authentication) and names the device.
    let end_entity = rustls::pki_types::CertificateDer::from(certificate.as_slice());
    let anchor = webpki::anchor_from_trusted_cert(&rustls::pki_types::CertificateDer::from(
        root_der.as_slice(),
    ))
    .unwrap()
    .to_owned();
    let intermediates: Vec<_> = chain
        .iter()
        .map(|c| rustls::pki_types::CertificateDer::from(c.as_slice()))
        .collect();
    webpki::EndEntityCert::try_from(&end_entity)
        .unwrap()
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &intermediates,
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap_or_else(|e| panic!("webpki refuses the device's chain: {e}"));
    let (_, x509) = x509_parser::prelude::FromDer::from_der(certificate.as_slice()).unwrap();
    let x509: x509_parser::certificate::X509Certificate<'_> = x509;
    let cn = x509.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), device_id);
    // Without loss on the line, the first request got through.
    assert_eq!(unit.requests, 1);
    station.relay.close().await;
}

/// A QEMU process, killed when dropped; its stdout/stderr collected.
struct Qemu {
    child: Child,
    output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Qemu {
    fn start(qemu: &Path, machine: &str, image: &Path, factory: &Path, port: u16) -> Qemu {
        let address: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut child = Command::new(qemu)
            .args(["-M", machine, "-nographic", "-monitor", "none"])
            .args(["-semihosting-config", "enable=on,target=native"])
            .arg("-serial")
            .arg(format!("tcp:{address}"))
            .arg("-device")
            .arg(format!(
                "loader,file={},addr={FACTORY_ADDRESS:#x}",
                factory.display()
            ))
            .arg("-kernel")
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Qemu { child, output }
    }

    /// Waits for QEMU to exit until `deadline`; `None` if it had to be killed.
    fn wait_until(&mut self, deadline: Instant) -> Option<i32> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a board image (release, `--locked`) and returns the ELF's path.
fn build_image(board: &str, target: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let board_dir = root.join("hardware/boards").join(board);
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("boards");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--locked", "--bin", "agent"])
        .current_dir(&board_dir)
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "building the {board} image failed (is the {target} target installed? \
         rustup target add {target}):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    target_dir.join(target).join("release/agent")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

fn rand_bytes(out: &mut [u8]) {
    use rand::RngCore;
    rand::rngs::OsRng.fill_bytes(out);
}
