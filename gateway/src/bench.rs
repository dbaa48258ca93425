//! `idgate bench`: enrollment and renewal throughput of a whole gateway —
//! embedded broker, TLS front, service, authority and a durable SQLite
//! registry — driven over real MQTT/TLS from this process (the
//! `--keep-connected` devices from child processes, see `fleet`), next to
//! the crypto ceiling of the same machine measured in the same run.
//!
//! Everything the simulated devices need (keys, CSRs, proofs, renewal
//! signatures, encoded payloads) is made before the timed phase, and the MQTT
//! connections are up and subscribed before it too, so the timed phase spends
//! the load generator's CPU only on MQTT framing and TLS records. The load
//! generator still shares the machine with the gateway: the figures are a
//! lower bound for a gateway with the machine to itself.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idgate_pki::protocol::{
    EnrollRequest, Format, Issued, Op as ProtocolOp, RenewRequest, Reply, SIG_LEN, Topic,
    enrollment_proof, renew_message,
};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;

mod connected;
mod fleet;

pub use fleet::serve as serve_devices;

use crate::datadir::DataDir;
use crate::gateway::{Gateway, Settings, StartError};
use crate::registry::{ContextReads, GroupCommits, NewBatch, NewDevice, now};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// First enrollments.
    Enroll,
    /// Renewals (after an untimed enrollment of every device).
    Renew,
}

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// What to time.
    pub op: Op,
    /// Simulated devices.
    pub devices: usize,
    /// MQTT/TLS connections the devices' requests are spread over.
    pub concurrency: usize,
    /// Requests each connection keeps in flight (closed loop).
    pub pipeline: usize,
    /// Offered load in requests per second (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    /// Keep the data directory here instead of a temporary one.
    pub keep: Option<PathBuf>,
    /// One connection per device (TLS handshake, CONNECT, SUBSCRIBE), kept
    /// open after the device's enrollment; `concurrency` devices connect at
    /// once. Enrollment only.
    pub keep_connected: bool,
    /// With `keep_connected`: most devices one load-generator process
    /// drives (each holds one open file per device; see
    /// [`DEVICES_PER_PROCESS`]).
    pub devices_per_process: usize,
}

/// Default of [`Options::devices_per_process`]: under the usual hard limit
/// of open files (20,000 here) with room to spare.
pub const DEVICES_PER_PROCESS: usize = 15_000;

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The options make no sense.
    #[error("{0}")]
    Options(String),
    /// The gateway did not start.
    #[error("starting the gateway: {0}")]
    Start(#[from] StartError),
    /// Setting up the data directory, devices or connections failed.
    #[error("setting up: {0}")]
    Setup(String),
    /// A connection failed or a reply did not come.
    #[error("during the run: {0}")]
    Run(String),
}

impl BenchError {
    /// The reason alone, without the stage [`fmt::Display`] names.
    fn detail(&self) -> String {
        match self {
            BenchError::Options(s) | BenchError::Setup(s) | BenchError::Run(s) => s.clone(),
            BenchError::Start(e) => e.to_string(),
        }
    }
}

fn setup(e: impl fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// The figures of one run.
#[derive(Clone, Debug)]
pub struct Report {
    /// What was timed.
    pub op: Op,
    /// Requests timed.
    pub requests: usize,
    /// Of which accepted.
    pub accepted: usize,
    /// Connections.
    pub concurrency: usize,
    /// In flight per connection (closed loop).
    pub pipeline: usize,
    /// Offered load, if open loop.
    pub rate: Option<f64>,
    /// Wall time of the timed phase.
    pub elapsed: Duration,
    /// Latency percentiles p50, p95, p99, max.
    pub latency: [Duration; 4],
    /// Process CPU seconds (gateway and load generator) in the timed phase.
    pub cpu_seconds: f64,
    /// Peak resident memory of the process, KiB.
    pub peak_rss_kib: u64,
    /// P-256 sign + verify pairs per second on one core.
    pub ceiling_one_core: f64,
    /// The same on every core at once (can be below one core's on a
    /// machine whose "cores" are hyperthreads or throttled vCPUs).
    pub ceiling_all_cores: f64,
    /// Cores used for the ceiling.
    pub cores: usize,
    /// Certificates in the registry after the run.
    pub recorded: i64,
    /// The group commits of the timed phase.
    pub commits: GroupCommits,
    /// The registry reads of the requests' contexts in the timed phase.
    pub reads: ContextReads,
    /// Cost of each public-key operation on this machine, this run.
    pub costs: CryptoCosts,
}

impl Report {
    /// The crypto ceiling the throughput is compared with: the better of one
    /// core and every core.
    pub fn ceiling(&self) -> f64 {
        self.ceiling_one_core.max(self.ceiling_all_cores)
    }

    /// Accepted requests per second.
    pub fn throughput(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Enroll => "enrollments",
            Op::Renew => "renewals",
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let load = match self.rate {
            Some(rate) => format!("open loop at {rate:.0}/s offered"),
            None => format!("closed loop, {} in flight per connection", self.pipeline),
        };
        writeln!(
            f,
            "idgate bench {}: {} devices, {} MQTT/TLS connections, {load}",
            match self.op {
                Op::Enroll => "enroll",
                Op::Renew => "renew",
            },
            self.requests,
            self.concurrency
        )?;
        writeln!(
            f,
            "  accepted              {} of {} ({} certificates recorded, SQLite synchronous=FULL)",
            self.accepted, self.requests, self.recorded
        )?;
        let commits = self.commits;
        writeln!(
            f,
            "  group commits         {} transactions, {:.1} records each, {} written record by record",
            commits.groups,
            commits.records as f64 / commits.groups.max(1) as f64,
            commits.per_record
        )?;
        writeln!(
            f,
            "  context reads         {} statements, {:.1} requests each",
            self.reads.statements,
            self.reads.requests as f64 / self.reads.statements.max(1) as f64,
        )?;
        writeln!(
            f,
            "  throughput            {:.0} {op}/s ({:.2} s)",
            self.throughput(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  latency               p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(self.latency[0]),
            ms(self.latency[1]),
            ms(self.latency[2]),
            ms(self.latency[3])
        )?;
        writeln!(
            f,
            "  CPU per request       {:.2} ms (process total, load generator included)",
            self.cpu_seconds * 1000.0 / self.accepted.max(1) as f64
        )?;
        writeln!(
            f,
            "  peak memory           {:.1} MiB (VmHWM)",
            self.peak_rss_kib as f64 / 1024.0
        )?;
        writeln!(
            f,
            "  crypto ceiling        {:.0} P-256 sign+verify/s (ring; {:.0}/s on one core, {:.0}/s on all {})",
            self.ceiling(),
            self.ceiling_one_core,
            self.ceiling_all_cores,
            self.cores
        )?;
        writeln!(
            f,
            "  ratio                 {:.1} % of the ceiling",
            100.0 * self.throughput() / self.ceiling().max(1e-9)
        )?;
        write!(f, "  {}", self.costs)
    }
}

/// CPU microseconds of one core per public-key operation (ring), measured
/// in the same run, and the floors they make.
#[derive(Clone, Copy, Debug, Default)]
pub struct CryptoCosts {
    /// One P-256 ECDSA signature.
    pub sign: f64,
    /// One P-256 ECDSA verification.
    pub verify: f64,
    /// One side of an X25519 exchange: key share generation and agreement.
    pub x25519: f64,
}

impl CryptoCosts {
    /// The gateway's public-key work for an enrollment on an open
    /// connection: verify the CSR's signature, sign the certificate.
    pub fn enrollment(&self) -> f64 {
        self.sign + self.verify
    }

    /// The gateway's side of a device's own TLS 1.3 handshake (X25519, the
    /// CertificateVerify signature) plus the enrollment.
    pub fn gateway_with_handshake(&self) -> f64 {
        self.x25519 + self.sign + self.enrollment()
    }

    /// The device's side of the handshake: X25519, and verifying the server
    /// certificate and the CertificateVerify signature.
    pub fn device_handshake(&self) -> f64 {
        self.x25519 + 2.0 * self.verify
    }
}

impl fmt::Display for CryptoCosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "crypto floor          {:.0} µs per enrollment (P-256 sign {:.0} µs + verify {:.0} µs); \
             with its own TLS handshake {:.0} µs at the gateway (+ X25519 {:.0} µs, + sign) and {:.0} µs at the device",
            self.enrollment(),
            self.sign,
            self.verify,
            self.gateway_with_handshake(),
            self.x25519,
            self.device_handshake()
        )
    }
}

/// Measures [`CryptoCosts`] on one core (about a second).
fn crypto_costs() -> Result<CryptoCosts, BenchError> {
    let rng = SystemRandom::new();
    let (key, public) = p256_key(&rng)?;
    let message = [0x5au8; 300];
    let sig = key
        .sign(&rng, &message)
        .map_err(|_| setup("P-256 signing failed"))?;
    let each = Duration::from_millis(300);
    let time = |op: &mut dyn FnMut() -> Result<(), BenchError>| -> Result<f64, BenchError> {
        let started = Instant::now();
        let mut count = 0u64;
        while started.elapsed() < each {
            op()?;
            count += 1;
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / count.max(1) as f64)
    };
    let sign = time(&mut || {
        key.sign(&rng, &message)
            .map(|_| ())
            .map_err(|_| setup("P-256 signing failed"))
    })?;
    let verify = time(&mut || {
        public
            .verify(&message, sig.as_ref())
            .map_err(|_| setup("P-256 verification failed"))
    })?;
    let peer = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
        .and_then(|k| k.compute_public_key())
        .map_err(|_| setup("X25519 failed"))?;
    let x25519 = time(&mut || {
        let mine = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
            .map_err(|_| setup("X25519 failed"))?;
        let share = mine
            .compute_public_key()
            .map_err(|_| setup("X25519 failed"))?;
        std::hint::black_box(share.as_ref());
        ring::agreement::agree_ephemeral(
            mine,
            &ring::agreement::UnparsedPublicKey::new(&ring::agreement::X25519, peer.as_ref()),
            |secret| std::hint::black_box(secret.len()),
        )
        .map(|_| ())
        .map_err(|_| setup("X25519 failed"))
    })?;
    Ok(CryptoCosts {
        sign,
        verify,
        x25519,
    })
}

/// One prepared request.
struct Job {
    device: usize,
    topic: String,
    payload: Vec<u8>,
}

/// A device's keys and the requests made for it.
struct Device {
    id: String,
    token: String,
    key_pkcs8: Vec<u8>,
}

/// One answered request.
struct Outcome {
    device: usize,
    latency: Duration,
    accepted: bool,
    payload: Vec<u8>,
}

/// Runs the benchmark; `log` gets progress lines.
pub async fn run(options: &Options, log: &(dyn Fn(&str) + Sync)) -> Result<Report, BenchError> {
    if options.devices == 0 || options.concurrency == 0 || options.pipeline == 0 {
        return Err(BenchError::Options(
            "--devices, --concurrency and --pipeline must be at least 1".into(),
        ));
    }
    if options.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(BenchError::Options("--rate must be positive".into()));
    }
    let (_temp, data, gateway) = start_gateway(options).await?;
    let result = measure(options, &gateway, &data, log).await;
    gateway.shutdown().await;
    result
}

/// Starts the gateway under test on loopback ports the system picks, with
/// its data directory in `--keep` or in the returned temporary directory
/// (removed when dropped: keep it until the gateway has shut down).
async fn start_gateway(
    options: &Options,
) -> Result<(tempfile::TempDir, DataDir, Gateway), BenchError> {
    let temp = tempfile::tempdir().map_err(setup)?;
    let root = options
        .keep
        .clone()
        .unwrap_or_else(|| temp.path().join("data"));
    let data = DataDir::new(root);
    let mut settings = Settings::new(data.clone());
    settings.mqtt_listen = ([127, 0, 0, 1], 0).into();
    settings.http_listen = ([127, 0, 0, 1], 0).into();
    settings.admin.listen = ([127, 0, 0, 1], 0).into();
    // Each closed-loop connection stands for N/C devices and subscribes to
    // their reply topics: measure the gateway, not the per-connection limit.
    settings.limits.max_subscriptions = settings
        .limits
        .max_subscriptions
        .max(2 * options.devices + 8);
    // Measure holding the fleet, not the front's admission limit.
    if options.keep_connected {
        settings.limits.max_connections = settings
            .limits
            .max_connections
            .max(options.devices + PROBES);
    }
    let gateway = Gateway::start(settings).await?;
    Ok((temp, data, gateway))
}

/// Runs the `--keep-connected` benchmark; `log` gets progress lines.
///
/// The simulated devices run in child processes of the program that calls
/// this, re-executed as `idgate bench devices`: call it from the `idgate`
/// binary.
pub async fn run_connected(
    options: &Options,
    log: &(dyn Fn(&str) + Sync),
) -> Result<ConnectedReport, BenchError> {
    if options.devices == 0 || options.concurrency == 0 || options.devices_per_process == 0 {
        return Err(BenchError::Options(
            "--devices, --concurrency and --devices-per-process must be at least 1".into(),
        ));
    }
    if options.op != Op::Enroll || options.rate.is_some() {
        return Err(BenchError::Options(
            "--keep-connected measures enrollments in a closed loop: no --rate, no renew".into(),
        ));
    }
    let limit = open_files_limit();
    // A load-generator process holds one descriptor per device (its
    // socket), and inherits this process's limit.
    let per_process = match limit {
        Some(limit) => options
            .devices_per_process
            .min(limit.saturating_sub(PROCESS_RESERVE)),
        None => options.devices_per_process,
    };
    if per_process == 0 {
        return Err(BenchError::Options(format!(
            "an open-file limit of {} leaves no room for device connections \
             in a load-generator process (raise it with `ulimit -n`)",
            limit.unwrap_or_default()
        )));
    }
    // The gateway's process holds at least its accepted socket per device
    // (more while the front links a connection to rumqttd): refuse only
    // what cannot fit even then; the run measures the real figure, warns
    // when the fleet will not fit and stops if the process runs out.
    let least = options.devices + 2 * PROBES + PROCESS_RESERVE;
    if let Some(limit) = limit
        && least > limit
    {
        return Err(BenchError::Options(format!(
            "{} connected devices need at least {least} open files in the gateway's \
             process (one per device, more with the front's link to rumqttd); \
             the limit is {limit} (raise it with `ulimit -n`)",
            options.devices
        )));
    }
    let program = std::env::current_exe()
        .map_err(|e| setup(format!("cannot find this program to run its devices: {e}")))?;
    let (_temp, data, gateway) = start_gateway(options).await?;
    let result = measure_connected(options, &gateway, &data, &program, per_process, log).await;
    gateway.shutdown().await;
    result
}

/// Descriptors a process needs besides its connections (runtime, pipes,
/// SQLite, listeners).
const PROCESS_RESERVE: usize = 256;

async fn measure(
    options: &Options,
    gateway: &Gateway,
    data: &DataDir,
    log: &(dyn Fn(&str) + Sync),
) -> Result<Report, BenchError> {
    let n = options.devices;
    log(&format!("registering {n} devices"));
    let devices = register(gateway, data, n).await?;

    log("preparing keys, CSRs and proofs");
    let (devices, enroll_jobs) = tokio::task::spawn_blocking(move || prepare_enroll(devices))
        .await
        .map_err(setup)??;
    let root_pem = std::fs::read(data.root_certificate()).map_err(setup)?;
    let port = gateway.mqtt_address().port();
    let mut connections = connect(options, &root_pem, port, &devices).await?;

    let jobs = match options.op {
        Op::Enroll => enroll_jobs,
        Op::Renew => {
            log("enrolling every device (untimed)");
            let outcomes = drive(&mut connections, enroll_jobs, options, None).await?;
            let refused = outcomes.iter().filter(|o| !o.accepted).count();
            if refused > 0 {
                return Err(BenchError::Run(format!(
                    "{refused} enrollments were refused before the renewal phase"
                )));
            }
            log("preparing renewal keys, CSRs and signatures");
            tokio::task::spawn_blocking(move || prepare_renew(&devices, &outcomes))
                .await
                .map_err(setup)??
        }
    };
    log("timed phase");
    let commits_before = gateway.registry().commit_stats();
    let reads_before = gateway.registry().context_reads();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let outcomes = drive(&mut connections, jobs, options, options.rate).await?;
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    let commits_after = gateway.registry().commit_stats();
    let reads_after = gateway.registry().context_reads();
    let reads = ContextReads {
        statements: reads_after.statements - reads_before.statements,
        requests: reads_after.requests - reads_before.requests,
    };
    let commits = GroupCommits {
        groups: commits_after.groups - commits_before.groups,
        per_record: commits_after.per_record - commits_before.per_record,
        records: commits_after.records - commits_before.records,
    };
    for connection in connections {
        let _ = connection.client.disconnect().await;
    }
    let accepted = outcomes.iter().filter(|o| o.accepted).count();
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> Duration {
        let index = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies.get(index).copied().unwrap_or_default()
    };
    let latency = [
        percentile(0.50),
        percentile(0.95),
        percentile(0.99),
        percentile(1.0),
    ];
    let recorded = gateway
        .registry()
        .certificate_total()
        .await
        .map_err(|e| BenchError::Run(e.to_string()))?;
    log("measuring the crypto ceiling (about 2 s)");
    let (one, all, cores) = tokio::task::spawn_blocking(crypto_ceiling)
        .await
        .map_err(setup)??;
    let costs = tokio::task::spawn_blocking(crypto_costs)
        .await
        .map_err(setup)??;
    Ok(Report {
        op: options.op,
        requests: outcomes.len(),
        accepted,
        concurrency: connections_used(options, n),
        pipeline: options.pipeline,
        rate: options.rate,
        elapsed,
        latency,
        cpu_seconds: cpu,
        peak_rss_kib: peak_rss_kib(),
        ceiling_one_core: one,
        ceiling_all_cores: all,
        cores,
        recorded,
        commits,
        reads,
        costs,
    })
}

/// Registers `n` pending devices in one batch and returns them with their tokens.
async fn register(gateway: &Gateway, data: &DataDir, n: usize) -> Result<Vec<Device>, BenchError> {
    let tokens = data.tokens().map_err(setup)?;
    let stamp = format!("{:x}", now());
    let mut devices = Vec::with_capacity(n);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("bench-{stamp}-{i}");
        let new = tokens.generate(&id);
        rows.push((
            NewDevice {
                id: id.clone(),
                owner: "bench@example.com".into(),
                site: "bench".into(),
                model: None,
                label: None,
                created_by: "bench".into(),
            },
            new.sealed,
        ));
        devices.push(Device {
            id,
            token: new.token,
            key_pkcs8: Vec::new(),
        });
    }
    gateway
        .registry()
        .import_batch(
            &NewBatch {
                id: format!("bench-{stamp}"),
                owner: "bench@example.com".into(),
                site: "bench".into(),
                model: None,
                created_by: "bench".into(),
            },
            &rows,
            now(),
            &|_| {},
        )
        .await
        .map_err(setup)?;
    Ok(devices)
}

fn connections_used(options: &Options, devices: usize) -> usize {
    options.concurrency.min(devices)
}

fn new_key(rng: &SystemRandom) -> Result<(Vec<u8>, rcgen::KeyPair), BenchError> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng)
        .map_err(|_| setup("cannot generate a P-256 key"))?;
    let der = pkcs8.as_ref().to_vec();
    let key = rcgen::KeyPair::try_from(der.as_slice()).map_err(setup)?;
    Ok((der, key))
}

fn csr_for(key: &rcgen::KeyPair) -> Result<Vec<u8>, BenchError> {
    Ok(rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(setup)?
        .serialize_request(key)
        .map_err(setup)?
        .der()
        .to_vec())
}

fn prepare_enroll(mut devices: Vec<Device>) -> Result<(Vec<Device>, Vec<Job>), BenchError> {
    let rng = SystemRandom::new();
    let mut jobs = Vec::with_capacity(devices.len());
    let mut buffer = vec![0u8; 4096];
    for (index, device) in devices.iter_mut().enumerate() {
        let (pkcs8, key) = new_key(&rng)?;
        let csr = csr_for(&key)?;
        let proof = enrollment_proof(device.token.as_bytes(), &csr);
        let request = EnrollRequest {
            rid: "bench-enroll",
            csr: &csr,
            proof: &proof,
        };
        let len = request.encode_cbor(&mut buffer).map_err(setup)?;
        jobs.push(Job {
            device: index,
            topic: Topic::request(&device.id, ProtocolOp::Enroll, Format::Cbor).to_string(),
            payload: buffer[..len].to_vec(),
        });
        device.key_pkcs8 = pkcs8;
    }
    Ok((devices, jobs))
}

fn prepare_renew(devices: &[Device], enrolled: &[Outcome]) -> Result<Vec<Job>, BenchError> {
    let rng = SystemRandom::new();
    let mut jobs = Vec::with_capacity(enrolled.len());
    let mut buffer = vec![0u8; 4096];
    let mut message = vec![0u8; idgate_pki::protocol::MAX_RENEW_MESSAGE];
    for outcome in enrolled {
        let device = &devices[outcome.device];
        let issued = Issued::decode_cbor(&outcome.payload).map_err(setup)?;
        let current =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &device.key_pkcs8, &rng)
                .map_err(|e| setup(format!("device key: {e}")))?;
        let (_, key) = new_key(&rng)?;
        let csr = csr_for(&key)?;
        let rid = "bench-renew";
        let len =
            renew_message(&device.id, rid, &csr, issued.serial, 1, &mut message).map_err(setup)?;
        let sig = current
            .sign(&rng, &message[..len])
            .map_err(|_| setup("cannot sign the renewal"))?;
        if sig.as_ref().len() != SIG_LEN {
            return Err(setup("unexpected signature length"));
        }
        let request = RenewRequest {
            rid,
            csr: &csr,
            serial: issued.serial,
            counter: 1,
            sig: sig.as_ref(),
        };
        let len = request.encode_cbor(&mut buffer).map_err(setup)?;
        jobs.push(Job {
            device: outcome.device,
            topic: Topic::request(&device.id, ProtocolOp::Renew, Format::Cbor).to_string(),
            payload: buffer[..len].to_vec(),
        });
    }
    Ok(jobs)
}

/// An MQTT/TLS connection and the replies its event loop hands over.
struct Connection {
    client: AsyncClient,
    replies: Replies,
}

/// A TLS client configuration (ring, TLS 1.2 and 1.3) trusting `root_pem`.
fn client_tls(root_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, BenchError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pemfile::certs(&mut &root_pem[..]) {
        roots.add(certificate.map_err(setup)?).map_err(setup)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(setup)?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ))
}

async fn connect(
    options: &Options,
    root_pem: &[u8],
    port: u16,
    devices: &[Device],
) -> Result<Vec<Connection>, BenchError> {
    let tls = client_tls(root_pem)?;
    let count = connections_used(options, devices.len());
    let mut connections = Vec::with_capacity(count);
    for c in 0..count {
        let mut mqtt = MqttOptions::new(format!("bench-{c}"), "127.0.0.1", port);
        mqtt.set_keep_alive(Duration::from_secs(60));
        mqtt.set_max_packet_size(256 * 1024, 256 * 1024);
        mqtt.set_inflight(u16::try_from(options.pipeline.max(100)).unwrap_or(u16::MAX));
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
        let (client, mut events) = AsyncClient::new(mqtt, 1024);
        // Devices send one small request and wait: Nagle's algorithm would
        // hold it back for the delayed ACK (40 ms) and measure TCP, not us.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        // rumqttc's default here is 5 s for TCP + TLS + CONNACK, and for
        // every write: too short for a loaded machine.
        network.set_connection_timeout(30);
        events.set_network_options(network);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (subacks_tx, mut subacks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(Ok((p.topic, p.payload.to_vec()))).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subacks_tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mine: Vec<usize> = (c..devices.len()).step_by(count).collect();
        for &d in &mine {
            for op in [ProtocolOp::Enroll, ProtocolOp::Renew] {
                let filter = format!("{}/+", Topic::request(&devices[d].id, op, Format::Cbor));
                client
                    .subscribe(filter, QoS::AtLeastOnce)
                    .await
                    .map_err(setup)?;
            }
        }
        for _ in 0..mine.len() * 2 {
            match tokio::time::timeout(Duration::from_secs(30), subacks.recv()).await {
                Ok(Some(())) => {}
                waited => {
                    // The event loop's own error, if it stopped.
                    let cause = match rx.try_recv() {
                        Ok(Err(e)) => format!(": {e}"),
                        _ if waited.is_err() => ": no SUBACK within 30 s".to_owned(),
                        _ => String::new(),
                    };
                    return Err(setup(format!(
                        "connection {c}: subscriptions not acknowledged{cause}"
                    )));
                }
            }
        }
        connections.push(Connection {
            client,
            replies: rx,
        });
    }
    Ok(connections)
}

/// Sends every job over its device's connection and waits for every reply.
async fn drive(
    connections: &mut [Connection],
    jobs: Vec<Job>,
    options: &Options,
    rate: Option<f64>,
) -> Result<Vec<Outcome>, BenchError> {
    let count = connections.len();
    let mut per_connection: Vec<Vec<Job>> = (0..count).map(|_| Vec::new()).collect();
    for job in jobs {
        per_connection[job.device % count].push(job);
    }
    let interval = rate.map(|r| Duration::from_secs_f64(count as f64 / r));
    let mut tasks = tokio::task::JoinSet::new();
    let taken: Vec<(AsyncClient, mpsc::UnboundedReceiver<_>)> = connections
        .iter_mut()
        .map(|c| {
            let (_, placeholder) = mpsc::unbounded_channel();
            (
                c.client.clone(),
                std::mem::replace(&mut c.replies, placeholder),
            )
        })
        .collect();
    for (index, ((client, replies), jobs)) in taken.into_iter().zip(per_connection).enumerate() {
        let pipeline = options.pipeline;
        // Spread the connections' schedules over one interval.
        let offset = interval.map(|i| i.mul_f64(index as f64 / count as f64));
        tasks.spawn(async move {
            let result = one_connection(client, replies, jobs, pipeline, interval, offset).await;
            (index, result)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined.map_err(|e| BenchError::Run(e.to_string()))?;
        let (replies, mut done) = result?;
        connections[index].replies = replies;
        outcomes.append(&mut done);
    }
    outcomes.sort_by_key(|o| o.device);
    Ok(outcomes)
}

type Replies = mpsc::UnboundedReceiver<Result<(String, Vec<u8>), String>>;

async fn one_connection(
    client: AsyncClient,
    mut replies: Replies,
    jobs: Vec<Job>,
    pipeline: usize,
    interval: Option<Duration>,
    offset: Option<Duration>,
) -> Result<(Replies, Vec<Outcome>), BenchError> {
    let total = jobs.len();
    let mut pending = jobs.into_iter();
    let mut in_flight: HashMap<String, (usize, Instant)> = HashMap::new();
    let mut outcomes = Vec::with_capacity(total);
    let mut ticker = interval.map(|i| {
        let mut t =
            tokio::time::interval_at(tokio::time::Instant::now() + offset.unwrap_or_default(), i);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let send = |job: Job, in_flight: &mut HashMap<String, (usize, Instant)>| {
        let client = client.clone();
        let device_id = Topic::parse(&job.topic).map(|t| t.device_id.to_owned());
        if let Some(id) = device_id {
            in_flight.insert(id, (job.device, Instant::now()));
        }
        async move {
            client
                .publish(job.topic, QoS::AtLeastOnce, false, job.payload)
                .await
                .map_err(|e| BenchError::Run(e.to_string()))
        }
    };
    if ticker.is_none() {
        for job in pending.by_ref().take(pipeline) {
            send(job, &mut in_flight).await?;
        }
    }
    while outcomes.len() < total {
        let tick = async {
            match ticker.as_mut() {
                Some(t) if pending.len() > 0 => {
                    t.tick().await;
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = tick => {
                if let Some(job) = pending.next() {
                    send(job, &mut in_flight).await?;
                }
            }
            reply = tokio::time::timeout(Duration::from_secs(60), replies.recv()) => {
                let (topic, payload) = match reply {
                    Ok(Some(Ok(reply))) => reply,
                    Ok(Some(Err(e))) => return Err(BenchError::Run(format!("connection failed: {e}"))),
                    Ok(None) => return Err(BenchError::Run("connection closed".into())),
                    Err(_) => return Err(BenchError::Run("no reply within 60 s".into())),
                };
                let Some(parsed) = Topic::parse(&topic) else { continue };
                let Some((device, started)) = in_flight.remove(parsed.device_id) else { continue };
                outcomes.push(Outcome {
                    device,
                    latency: started.elapsed(),
                    accepted: parsed.reply == Some(Reply::Accepted),
                    payload,
                });
                if ticker.is_none()
                    && let Some(job) = pending.next()
                {
                    send(job, &mut in_flight).await?;
                }
            }
        }
    }
    Ok((replies, outcomes))
}

/// Devices that enroll one at a time after the fleet is connected: the
/// latency of a fresh enrollment with N devices connected.
const PROBES: usize = 100;

/// The figures of a `--keep-connected` run.
#[derive(Clone, Debug)]
pub struct ConnectedReport {
    /// Devices connected and enrolled in the ramp.
    pub devices: usize,
    /// Of which accepted.
    pub accepted: usize,
    /// Devices connecting at once during the ramp.
    pub concurrency: usize,
    /// Load-generator processes the devices ran in.
    pub processes: usize,
    /// Wall time of the ramp.
    pub elapsed: Duration,
    /// Connection (TCP, TLS, CONNECT, SUBSCRIBE) latency p50, p99 in the ramp.
    pub connect: [Duration; 2],
    /// Enrollment (request → reply) latency p50, p99 in the ramp.
    pub enroll: [Duration; 2],
    /// CPU seconds in the ramp, gateway and load generator.
    pub cpu_seconds: f64,
    /// Of which the gateway's process.
    pub gateway_cpu_seconds: f64,
    /// Connections the gateway's front held after the ramp.
    pub held: usize,
    /// Open files of the gateway's process before and after the ramp.
    pub gateway_open_files: [usize; 2],
    /// Resident memory before the ramp and with every device connected,
    /// gateway and load generator, KiB.
    pub rss_kib: [u64; 2],
    /// Of which the gateway's process.
    pub gateway_rss_kib: [u64; 2],
    /// CPU seconds per second while the fleet sat idle, gateway and load
    /// generator.
    pub idle_cpu: f64,
    /// Of which the gateway's process.
    pub gateway_idle_cpu: f64,
    /// Enrollment latency p50, p99 of [`PROBES`] devices enrolling one at a
    /// time with the fleet connected (connection excluded).
    pub probe: [Duration; 2],
    /// Peak resident memory of the gateway's process and the sum of the
    /// load-generator processes' peaks, KiB.
    pub peak_rss_kib: [u64; 2],
    /// Cost of each public-key operation on this machine, this run.
    pub costs: CryptoCosts,
}

impl ConnectedReport {
    /// Devices connected and enrolled per second in the ramp.
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn per_device(&self, total: f64) -> f64 {
        total / self.devices.max(1) as f64
    }

    /// Resident memory per connected device, both ends, KiB.
    pub fn kib_per_device(&self) -> f64 {
        self.per_device(self.rss_kib[1].saturating_sub(self.rss_kib[0]) as f64)
    }

    /// Resident memory of the gateway's process per connected device, KiB.
    pub fn gateway_kib_per_device(&self) -> f64 {
        self.per_device(self.gateway_rss_kib[1].saturating_sub(self.gateway_rss_kib[0]) as f64)
    }

    /// Resident memory of the load generator per connected device, KiB.
    pub fn client_kib_per_device(&self) -> f64 {
        self.kib_per_device() - self.gateway_kib_per_device()
    }

    /// Open files the gateway's process holds per connected device.
    pub fn gateway_files_per_device(&self) -> f64 {
        self.per_device(
            self.gateway_open_files[1].saturating_sub(self.gateway_open_files[0]) as f64,
        )
    }

    /// CPU milliseconds per accepted device in the ramp, both sides and
    /// the gateway's process alone.
    pub fn cpu_ms_per_device(&self) -> [f64; 2] {
        let accepted = self.accepted.max(1) as f64;
        [
            self.cpu_seconds * 1000.0 / accepted,
            self.gateway_cpu_seconds * 1000.0 / accepted,
        ]
    }

    /// The table header matching [`ConnectedReport::row`].
    pub const HEADER: &'static str = "| N connected | held | devices/s | CPU/device | connect p50/p99 | enroll p50/p99 | probe p50/p99 | RSS | RSS/device | idle CPU | gateway CPU/device | gateway RSS/device | client RSS/device | gateway fds/device |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    /// One Markdown table row.
    pub fn row(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let [cpu, gateway_cpu] = self.cpu_ms_per_device();
        format!(
            "| {} | {} | {:.0} | {:.2} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.0} MiB | {:.1} KiB | {:.1} % | {:.2} ms | {:.1} KiB | {:.1} KiB | {:.2} |",
            self.devices,
            self.held,
            self.rate(),
            cpu,
            ms(self.connect[0]),
            ms(self.connect[1]),
            ms(self.enroll[0]),
            ms(self.enroll[1]),
            ms(self.probe[0]),
            ms(self.probe[1]),
            self.rss_kib[1] as f64 / 1024.0,
            self.kib_per_device(),
            self.idle_cpu * 100.0,
            gateway_cpu,
            self.gateway_kib_per_device(),
            self.client_kib_per_device(),
            self.gateway_files_per_device(),
        )
    }
}

impl fmt::Display for ConnectedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let [cpu, gateway_cpu] = self.cpu_ms_per_device();
        let processes = match self.processes {
            1 => "1 load-generator process".to_owned(),
            n => format!("{n} load-generator processes"),
        };
        writeln!(
            f,
            "idgate bench enroll --keep-connected: {} devices, one MQTT/TLS connection each, {} connecting at once, {processes}",
            self.devices, self.concurrency
        )?;
        writeln!(
            f,
            "  accepted              {} of {} (SQLite synchronous=FULL)",
            self.accepted, self.devices
        )?;
        writeln!(
            f,
            "  ramp                  {:.0} devices/s connected and enrolled ({:.2} s)",
            self.rate(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  CPU per device        {cpu:.2} ms (TLS handshake, CONNECT, SUBSCRIBE, enrollment; both sides)"
        )?;
        writeln!(
            f,
            "    gateway             {gateway_cpu:.2} ms (the gateway's process alone)"
        )?;
        writeln!(
            f,
            "    load generator      {:.2} ms ({processes})",
            cpu - gateway_cpu
        )?;
        writeln!(
            f,
            "  connect latency       p50 {:.1} ms, p99 {:.1} ms",
            ms(self.connect[0]),
            ms(self.connect[1])
        )?;
        writeln!(
            f,
            "  enroll latency        p50 {:.1} ms, p99 {:.1} ms",
            ms(self.enroll[0]),
            ms(self.enroll[1])
        )?;
        writeln!(
            f,
            "  held                  {} connections at the front, {} open files in the gateway's process ({} before the ramp: {:.2} per device)",
            self.held,
            self.gateway_open_files[1],
            self.gateway_open_files[0],
            self.gateway_files_per_device()
        )?;
        writeln!(
            f,
            "  memory                {:.1} MiB before, {:.1} MiB connected ({:.1} KiB per device, both ends), peak {:.1} MiB",
            mib(self.rss_kib[0]),
            mib(self.rss_kib[1]),
            self.kib_per_device(),
            mib(self.peak_rss_kib[0] + self.peak_rss_kib[1])
        )?;
        writeln!(
            f,
            "    gateway             {:.1} MiB before, {:.1} MiB connected ({:.1} KiB per device), peak {:.1} MiB",
            mib(self.gateway_rss_kib[0]),
            mib(self.gateway_rss_kib[1]),
            self.gateway_kib_per_device(),
            mib(self.peak_rss_kib[0])
        )?;
        writeln!(
            f,
            "    load generator      {:.1} MiB before, {:.1} MiB connected ({:.1} KiB per device), peak {:.1} MiB (keys and requests prepared before the ramp)",
            mib(self.rss_kib[0].saturating_sub(self.gateway_rss_kib[0])),
            mib(self.rss_kib[1].saturating_sub(self.gateway_rss_kib[1])),
            self.client_kib_per_device(),
            mib(self.peak_rss_kib[1])
        )?;
        writeln!(
            f,
            "  idle CPU              {:.1} % of one core with the fleet connected (gateway {:.1} %)",
            self.idle_cpu * 100.0,
            self.gateway_idle_cpu * 100.0
        )?;
        writeln!(
            f,
            "  probe                 p50 {:.1} ms, p99 {:.1} ms ({PROBES} more devices enrolling one at a time)",
            ms(self.probe[0]),
            ms(self.probe[1])
        )?;
        writeln!(f, "  {}", self.costs)?;
        writeln!(f)?;
        writeln!(f, "{}", ConnectedReport::HEADER)?;
        write!(f, "{}", self.row())
    }
}

fn percentiles(mut values: Vec<Duration>, ps: &[f64]) -> Vec<Duration> {
    values.sort_unstable();
    ps.iter()
        .map(|p| {
            let index = ((values.len() as f64 * p).ceil() as usize).saturating_sub(1);
            values.get(index).copied().unwrap_or_default()
        })
        .collect()
}

/// Watches the gateway's process's open files during a `--keep-connected`
/// run: warns once, with the measured descriptors per connected device,
/// when the fleet will not fit under the limit, and turns running out
/// into an error that says so — rather than a device's timeout (the front
/// retries its accepts while the devices wait for their handshakes) or a
/// device's closed connection (a link to rumqttd that could not be opened).
pub(crate) struct FileWatch {
    limit: Option<usize>,
    /// Open files before the ramp.
    baseline: usize,
    /// Devices the run will connect to this process, probes included.
    devices: usize,
    /// Connections the gateway's front holds now.
    held: Box<dyn Fn() -> usize + Send + Sync>,
    /// Open files per connected device, once measured.
    measured: Option<f64>,
    /// The most connections seen held.
    most_held: usize,
    ticker: tokio::time::Interval,
}

impl FileWatch {
    fn new(held: impl Fn() -> usize + Send + Sync + 'static, devices: usize) -> FileWatch {
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        FileWatch {
            limit: open_files_limit(),
            baseline: open_files(),
            devices,
            held: Box::new(held),
            measured: None,
            most_held: 0,
            ticker,
        }
    }

    fn held(&mut self) -> usize {
        self.most_held = self.most_held.max((self.held)());
        self.most_held
    }

    /// Devices that fit under `limit` at `per_device` open files each.
    fn fit(&self, limit: usize, per_device: f64) -> f64 {
        limit.saturating_sub(self.baseline) as f64 / per_device.max(1e-9)
    }

    /// Why the process is out of open files, if it is: it cannot open one
    /// (cheap enough to try ten times a second, unlike counting them), or,
    /// when `count`, it holds within a few of the limit.
    fn exhausted(&mut self, count: bool) -> Option<String> {
        let limit = self.limit?;
        let open = match std::fs::File::open("/dev/null") {
            Err(e) => format!("cannot open one more ({e})"),
            Ok(_) if !count => return None,
            Ok(file) => {
                let open = open_files();
                drop(file);
                if open + 32 < limit {
                    return None;
                }
                format!("{open} open")
            }
        };
        let held = self.held();
        let per_device = self
            .measured
            .unwrap_or(limit.saturating_sub(self.baseline) as f64 / held.max(1) as f64);
        Some(format!(
            "the gateway's process ran out of open files: {open}, limit {limit}, with {held} \
             devices connected ({per_device:.2} per device): about {:.0} devices fit under \
             this limit (raise it with `ulimit -n`)",
            self.fit(limit, per_device)
        ))
    }

    /// A warning, once, when the devices measured so far project past the
    /// limit.
    fn projection(&mut self) -> Option<String> {
        let limit = self.limit?;
        let held = self.held();
        if self.measured.is_some() || held < (self.devices / 10).max(64) {
            return None;
        }
        let per_device = open_files().saturating_sub(self.baseline) as f64 / held as f64;
        self.measured = Some(per_device);
        let needed = self.baseline as f64 + per_device * self.devices as f64;
        (needed > limit as f64).then(|| {
            format!(
                "warning: the gateway's process holds {per_device:.2} open files per connected \
                 device (measured at {held} devices): {} devices need about {needed:.0}, the \
                 limit is {limit}; it will run out near {:.0} devices",
                self.devices,
                self.fit(limit, per_device)
            )
        })
    }

    /// Returns only when the process is out of open files; logs the
    /// projection's warning on the way.
    pub(crate) async fn until_exhausted(&mut self, log: &(dyn Fn(&str) + Sync)) -> BenchError {
        loop {
            self.ticker.tick().await;
            if let Some(reason) = self.exhausted(false) {
                return BenchError::Run(reason);
            }
            if let Some(warning) = self.projection() {
                log(&warning);
            }
        }
    }

    /// `error`, explained if the process is, or was, at its limit of open
    /// files: a device's failure is then only the consequence.
    pub(crate) fn explain(&mut self, error: BenchError) -> BenchError {
        let held = self.held();
        if let Some(reason) = self.exhausted(true) {
            return BenchError::Run(format!("{reason}; what failed then: {}", error.detail()));
        }
        let (Some(limit), Some(per_device)) = (self.limit, self.measured) else {
            return error;
        };
        // The devices that failed may have closed their connections since:
        // compare the most held with what the measured figure lets fit.
        let fit = self.fit(limit, per_device);
        if (held as f64) < fit - (limit / 50).max(64) as f64 / per_device {
            return error;
        }
        BenchError::Run(format!(
            "the gateway's process reached its limit of open files ({limit}) with {held} \
             devices connected ({per_device:.2} per device, measured): about {fit:.0} fit \
             under this limit (raise it with `ulimit -n`); what failed then: {}",
            error.detail()
        ))
    }
}

async fn measure_connected(
    options: &Options,
    gateway: &Gateway,
    data: &DataDir,
    program: &std::path::Path,
    per_process: usize,
    log: &(dyn Fn(&str) + Sync),
) -> Result<ConnectedReport, BenchError> {
    let n = options.devices;
    log(&format!("registering {} devices", n + PROBES));
    let mut devices = register(gateway, data, n + PROBES).await?;
    let probes = devices.split_off(n);
    let credentials: Vec<fleet::Credential> = devices
        .into_iter()
        .map(|d| fleet::Credential {
            id: d.id,
            token: d.token,
        })
        .collect();
    let slices = fleet::split(n, per_process, options.concurrency);
    log(&format!(
        "starting {} load-generator process(es) of at most {per_process} devices; \
         preparing keys, CSRs and proofs",
        slices.len()
    ));
    let (probes, probe_jobs) = tokio::task::spawn_blocking(move || prepare_enroll(probes))
        .await
        .map_err(setup)??;
    let probe_ids: Vec<String> = probes.into_iter().map(|d| d.id).collect();
    let root_certificate = data.root_certificate();
    let root_pem = std::fs::read(&root_certificate).map_err(setup)?;
    let dialer = connected::Dialer {
        gateway: gateway.mqtt_address(),
        tls: client_tls(&root_pem)?,
    };
    let mut children = fleet::Children::spawn(
        program,
        gateway.mqtt_address(),
        &root_certificate,
        &credentials,
        &slices,
    )
    .await?;
    drop(credentials);
    let sessions = gateway.sessions().clone();
    let mut watch = FileWatch::new(move || sessions.connections(), n + PROBES);
    let ready = children.ready(&mut watch, log).await?;

    log(&format!(
        "connecting and enrolling {n} devices, {} at once (timed)",
        options.concurrency
    ));
    let before = fleet::Usage::now();
    watch.baseline = before.open_files;
    let started = Instant::now();
    let ramps = children.ramp(&mut watch, log).await?;
    let elapsed = started.elapsed();
    let after = fleet::Usage::now();
    let held = gateway.sessions().connections();

    log("fleet connected: idle CPU over 2 s");
    let idle_started = Instant::now();
    let idle_before = children.usage(&mut watch, log).await?;
    let gateway_idle_before = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gateway_idle = (cpu_seconds() - gateway_idle_before) / 2.0;
    let idle_after = children.usage(&mut watch, log).await?;
    let children_idle = idle_after
        .iter()
        .zip(&idle_before)
        .map(|(a, b)| a.cpu_seconds - b.cpu_seconds)
        .sum::<f64>()
        / idle_started.elapsed().as_secs_f64();

    log(&format!("{PROBES} probe enrollments, one at a time"));
    let probes = tokio::select! {
        probes = connected::enroll_all(&dialer, &probe_ids, probe_jobs, 1) => {
            probes.map_err(|e| watch.explain(e))?
        }
        error = watch.until_exhausted(log) => return Err(error),
    };
    let probe = percentiles(probes.iter().map(|e| e.enroll).collect(), &[0.5, 0.99]);
    let gateway_peak = peak_rss_kib();
    drop(probes);
    children.close().await?;

    let micros = |us: &u64| Duration::from_micros(*us);
    let connect = percentiles(
        ramps
            .iter()
            .flat_map(|r| r.connect_us.iter().map(micros))
            .collect(),
        &[0.5, 0.99],
    );
    let enroll = percentiles(
        ramps
            .iter()
            .flat_map(|r| r.enroll_us.iter().map(micros))
            .collect(),
        &[0.5, 0.99],
    );
    let children_cpu: f64 = ramps.iter().map(|r| r.cpu_seconds).sum();
    let gateway_cpu = after.cpu_seconds - before.cpu_seconds;
    let sum = |usages: &mut dyn Iterator<Item = &fleet::Usage>, field: fn(&fleet::Usage) -> u64| {
        usages.map(field).sum::<u64>()
    };
    let children_before = sum(&mut ready.iter(), |u| u.rss_kib);
    let children_connected = sum(&mut ramps.iter().map(|r| &r.usage), |u| u.rss_kib);
    let children_peak = sum(&mut idle_after.iter(), |u| u.peak_rss_kib);

    log("measuring the cost of the crypto operations (about 1 s)");
    let costs = tokio::task::spawn_blocking(crypto_costs)
        .await
        .map_err(setup)??;
    Ok(ConnectedReport {
        devices: n,
        accepted: ramps.iter().map(|r| r.accepted).sum(),
        concurrency: options.concurrency,
        processes: slices.len(),
        elapsed,
        connect: [connect[0], connect[1]],
        enroll: [enroll[0], enroll[1]],
        cpu_seconds: gateway_cpu + children_cpu,
        gateway_cpu_seconds: gateway_cpu,
        held,
        gateway_open_files: [before.open_files, after.open_files],
        rss_kib: [
            before.rss_kib + children_before,
            after.rss_kib + children_connected,
        ],
        gateway_rss_kib: [before.rss_kib, after.rss_kib],
        idle_cpu: gateway_idle + children_idle,
        gateway_idle_cpu: gateway_idle,
        probe: [probe[0], probe[1]],
        peak_rss_kib: [gateway_peak, children_peak],
        costs,
    })
}

/// P-256 ECDSA sign + verify pairs per second with ring, on one core and on
/// every core at once (about a second each).
fn crypto_ceiling() -> Result<(f64, f64, usize), BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let one = sign_verify_rate(Duration::from_secs(1))?;
    let threads: Vec<_> = (0..cores)
        .map(|_| std::thread::spawn(|| sign_verify_rate(Duration::from_secs(1))))
        .collect();
    let mut all = 0.0;
    for thread in threads {
        all += thread
            .join()
            .map_err(|_| setup("a crypto thread panicked"))??;
    }
    Ok((one, all, cores))
}

/// A fresh P-256 key pair for the crypto measurements, with ASN.1
/// signatures, as X.509 certificates and CSRs carry them.
fn p256_key(rng: &SystemRandom) -> Result<(EcdsaKeyPair, UnparsedPublicKey<Vec<u8>>), BenchError> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .map_err(|_| setup("cannot generate a P-256 key"))?;
    let key = EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        rng,
    )
    .map_err(|e| setup(format!("P-256 key: {e}")))?;
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    Ok((key, public))
}

fn sign_verify_rate(duration: Duration) -> Result<f64, BenchError> {
    let rng = SystemRandom::new();
    let (key, public) = p256_key(&rng)?;
    let message = [0x5au8; 300];
    let started = Instant::now();
    let mut pairs = 0u64;
    while started.elapsed() < duration {
        let sig = key
            .sign(&rng, &message)
            .map_err(|_| setup("P-256 signing failed"))?;
        public
            .verify(&message, sig.as_ref())
            .map_err(|_| setup("P-256 verification failed"))?;
        pairs += 1;
    }
    Ok(pairs as f64 / started.elapsed().as_secs_f64())
}

/// CPU seconds (user + system) of this process so far, from /proc/self/stat
/// (Linux reports them in USER_HZ = 100 ticks per second); 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// Peak resident set size, KiB (VmHWM); 0 where /proc is absent.
fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// Resident set size now, KiB (VmRSS); 0 where /proc is absent.
fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The soft limit on open files of this process (`ulimit -n`), if known.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Open file descriptors of this process; 0 where /proc is absent.
fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch measures the gateway's open files per device, warns when
    /// the fleet will not fit, and blames a failure on the limit only when
    /// the fleet had reached it.
    #[tokio::test]
    async fn file_watch_projects_and_explains() {
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = held.clone();
        let mut watch = FileWatch::new(
            move || count.load(std::sync::atomic::Ordering::Relaxed),
            1000,
        );
        watch.limit = Some(watch.baseline + 2000);
        assert!(watch.projection().is_none(), "nothing held yet");
        // 100 devices at 3 descriptors each (other tests open files too:
        // the figure is about 3, the assertions leave room).
        let files: Vec<_> = (0..300)
            .map(|_| std::fs::File::open("/dev/null").expect("open /dev/null"))
            .collect();
        held.store(100, std::sync::atomic::Ordering::Relaxed);
        let warning = watch
            .projection()
            .expect("1000 devices at ~3 do not fit in 2000");
        assert!(
            warning.contains("open files per connected device"),
            "{warning}"
        );
        assert!(watch.projection().is_none(), "warns once");
        assert!(
            watch.exhausted(false).is_none(),
            "files can still be opened"
        );
        let failure = || BenchError::Run("device d-1: connection closed".into());
        // Far below the ~670 that fit: the failure is the device's own.
        watch.most_held = 0;
        held.store(100, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(watch.explain(failure()).to_string(), failure().to_string());
        // At the limit: said first, the device's failure after it.
        held.store(2000, std::sync::atomic::Ordering::Relaxed);
        let explained = watch.explain(failure()).to_string();
        assert!(
            explained.contains("reached its limit of open files")
                && explained.ends_with("what failed then: device d-1: connection closed"),
            "{explained}"
        );
        drop(files);
    }

    #[test]
    fn process_figures_are_read() {
        assert!(peak_rss_kib() > 0);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        assert!(cpu_seconds() > 0.0);
    }
}
