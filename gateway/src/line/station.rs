//! The station program: drives one unit at a time on each fixture with the
//! line link (`idgate_pki::link`), gives it its id and token, relays its
//! enrollment request to the gateway and the reply back, and reports
//! pass/fail per unit. A unit that answers garbage or nothing is failed when
//! its time is up, and the fixture goes on with the next unit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idgate_pki::link::{self, Decoder, DeviceState, Frame, LinkError};
use idgate_pki::protocol::{Format, Op, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use super::relay::Relay;
use super::tokens::{Assignment, TokenPool};

/// How a unit ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitOutcome {
    /// The device stored its certificate.
    Passed {
        /// Its serial.
        serial: String,
    },
    /// The unit failed; the reason is for the operator.
    Failed {
        /// Why.
        reason: String,
    },
    /// Nothing to do (the device is enrolled already).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One unit's report.
#[derive(Clone, Debug)]
pub struct UnitReport {
    /// Which fixture (port, peer address).
    pub fixture: String,
    /// The device id, once known.
    pub device_id: Option<String>,
    /// The agent version the device reported.
    pub agent_version: Option<String>,
    /// How it ended.
    pub outcome: UnitOutcome,
    /// Requests relayed to the gateway (more than one: the device
    /// retransmitted).
    pub requests: usize,
    /// How long it took.
    pub elapsed: Duration,
}

impl UnitReport {
    /// Whether the unit failed.
    pub fn failed(&self) -> bool {
        matches!(self.outcome, UnitOutcome::Failed { .. })
    }
}

impl std::fmt::Display for UnitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let device = self.device_id.as_deref().unwrap_or("(unknown device)");
        let seconds = self.elapsed.as_secs_f64();
        match &self.outcome {
            UnitOutcome::Passed { serial } => write!(
                f,
                "PASS {device} on {} serial {serial} ({seconds:.1} s)",
                self.fixture
            ),
            UnitOutcome::Failed { reason } => {
                write!(
                    f,
                    "FAIL {device} on {}: {reason} ({seconds:.1} s)",
                    self.fixture
                )
            }
            UnitOutcome::Skipped { reason } => {
                write!(f, "SKIP {device} on {}: {reason}", self.fixture)
            }
        }
    }
}

/// Counts of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Units that passed.
    pub passed: usize,
    /// Units that failed.
    pub failed: usize,
    /// Units skipped.
    pub skipped: usize,
}

impl Summary {
    fn add(&mut self, report: &UnitReport) {
        match report.outcome {
            UnitOutcome::Passed { .. } => self.passed += 1,
            UnitOutcome::Failed { .. } => self.failed += 1,
            UnitOutcome::Skipped { .. } => self.skipped += 1,
        }
    }

    /// All units seen.
    pub fn units(&self) -> usize {
        self.passed + self.failed + self.skipped
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unit(s): {} passed, {} failed, {} skipped",
            self.units(),
            self.passed,
            self.failed,
            self.skipped
        )
    }
}

/// What every unit needs.
#[derive(Debug)]
pub struct Station {
    /// The MQTT relay.
    pub relay: Relay,
    /// The ids and tokens.
    pub pool: TokenPool,
    /// The longest a unit may take from its first byte to `Done`.
    pub unit_timeout: Duration,
    /// How often `Hello` is repeated until the device answers.
    pub hello_interval: Duration,
    /// The agent's CBOR or JSON requests are relayed as they come; this is
    /// the longest the gateway may take to answer one.
    pub reply_timeout: Duration,
}

/// Where the units come from.
#[derive(Debug)]
pub enum Fixtures {
    /// Each TCP connection accepted is one unit (QEMU `-serial tcp:HOST:PORT`
    /// connects to us; so does `idgate-sim device`). Up to `parallel` at once.
    Listen {
        /// The bound listener.
        listener: TcpListener,
        /// Units at once.
        parallel: usize,
    },
    /// Connect to each address (QEMU `-serial tcp::PORT,server`), one unit
    /// per connection, all addresses in parallel.
    Connect(Vec<String>),
    /// Opened serial ports (or any byte streams), each a fixture where units
    /// are swapped by hand: the next unit starts with the first byte a new
    /// device sends.
    Streams(Vec<(String, tokio::io::DuplexStream)>),
}

/// Runs units until `units` reports have been made (for [`Fixtures::Connect`],
/// one per address and round). Every report goes to `report` as it happens.
pub async fn run(
    station: Arc<Station>,
    fixtures: Fixtures,
    units: usize,
    report: &(dyn Fn(&UnitReport) + Sync),
) -> Summary {
    let (tx, mut rx) = mpsc::channel::<UnitReport>(64);
    let driver = {
        let station = station.clone();
        tokio::spawn(async move {
            match fixtures {
                Fixtures::Listen { listener, parallel } => {
                    let slots = Arc::new(Semaphore::new(parallel.max(1)));
                    for _ in 0..units {
                        let Ok(slot) = slots.clone().acquire_owned().await else {
                            return;
                        };
                        let (stream, peer) = match listener.accept().await {
                            Ok(pair) => pair,
                            Err(e) => {
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        let _ = stream.set_nodelay(true);
                        let station = station.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let unit =
                                run_unit(&station, stream, &format!("tcp {peer}"), false, None)
                                    .await;
                            let _ = tx.send(unit).await;
                            drop(slot);
                        });
                    }
                }
                Fixtures::Connect(addresses) => {
                    let rounds = units.div_ceil(addresses.len().max(1));
                    let mut tasks = tokio::task::JoinSet::new();
                    for address in addresses {
                        let station = station.clone();
                        let tx = tx.clone();
                        tasks.spawn(async move {
                            for _ in 0..rounds {
                                let label = format!("tcp {address}");
                                let unit = match connect_with_retry(&address, station.unit_timeout)
                                    .await
                                {
                                    Ok(stream) => {
                                        run_unit(&station, stream, &label, false, None).await
                                    }
                                    Err(reason) => failed_before(&label, reason),
                                };
                                if tx.send(unit).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                }
                Fixtures::Streams(streams) => {
                    let rounds = units.div_ceil(streams.len().max(1));
                    let mut tasks = tokio::task::JoinSet::new();
                    for (label, mut stream) in streams {
                        let station = station.clone();
                        let tx = tx.clone();
                        tasks.spawn(async move {
                            let mut last: Option<String> = None;
                            for _ in 0..rounds {
                                let unit =
                                    run_unit(&station, &mut stream, &label, true, last.as_deref())
                                        .await;
                                last = unit.device_id.clone();
                                if tx.send(unit).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                }
            }
        })
    };
    let mut summary = Summary::default();
    while summary.units() < units {
        let Some(unit) = rx.recv().await else { break };
        summary.add(&unit);
        report(&unit);
    }
    driver.abort();
    summary
}

async fn connect_with_retry(
    address: &str,
    patience: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let deadline = Instant::now() + patience;
    loop {
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) if Instant::now() >= deadline => return Err(format!("cannot connect: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn failed_before(fixture: &str, reason: String) -> UnitReport {
    UnitReport {
        fixture: fixture.to_owned(),
        device_id: None,
        agent_version: None,
        outcome: UnitOutcome::Failed { reason },
        requests: 0,
        elapsed: Duration::ZERO,
    }
}

/// A frame from the device, owned.
#[derive(Debug)]
enum FromDevice {
    HelloAck {
        state: DeviceState,
        device_id: String,
        agent_version: String,
    },
    Request {
        op: Op,
        format: Format,
        payload: Vec<u8>,
    },
    Done {
        serial: String,
    },
    Failed {
        code: String,
        message: String,
    },
    /// A frame only a station sends.
    Unexpected(&'static str),
}

impl FromDevice {
    fn from_frame(frame: &Frame<'_>) -> FromDevice {
        match *frame {
            Frame::HelloAck {
                state,
                device_id,
                agent_version,
            } => FromDevice::HelloAck {
                state,
                device_id: device_id.to_owned(),
                agent_version: agent_version.to_owned(),
            },
            Frame::Request {
                op,
                format,
                payload,
            } => FromDevice::Request {
                op,
                format,
                payload: payload.to_vec(),
            },
            Frame::Done { serial } => FromDevice::Done {
                serial: serial.to_owned(),
            },
            Frame::Failed { code, message } => FromDevice::Failed {
                code: code.to_owned(),
                message: message.to_owned(),
            },
            ref other => FromDevice::Unexpected(other.name()),
        }
    }
}

/// Why no frame came.
#[derive(Debug)]
enum Silence {
    /// The deadline passed.
    Timeout,
    /// The line closed or failed.
    Closed(String),
}

/// The link on one line: framing, a receive buffer, and what went wrong.
struct Port<T> {
    io: T,
    decoder: Decoder<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
    filled: usize,
    /// Undecodable frames so far, and the last reason.
    garbage: usize,
    last_error: Option<LinkError>,
    /// Whether anything at all came from the device.
    heard: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Port<T> {
    fn new(io: T) -> Port<T> {
        Port {
            io,
            decoder: Decoder::new(vec![0u8; link::MAX_BODY]),
            chunk: vec![0u8; 2048],
            at: 0,
            filled: 0,
            garbage: 0,
            last_error: None,
            heard: false,
        }
    }

    async fn send(&mut self, frame: &Frame<'_>) -> Result<(), String> {
        let mut out = vec![0u8; link::MAX_FRAME];
        let n = frame
            .encode(&mut out)
            .map_err(|e| format!("cannot encode {}: {e}", frame.name()))?;
        self.io
            .write_all(&out[..n])
            .await
            .map_err(|e| format!("line write: {e}"))?;
        self.io
            .flush()
            .await
            .map_err(|e| format!("line write: {e}"))
    }

    /// The next frame that decodes, until `deadline` (`None`: no deadline).
    /// Undecodable frames are counted and skipped.
    async fn recv(&mut self, deadline: Option<Instant>) -> Result<FromDevice, Silence> {
        loop {
            while self.at < self.filled {
                let byte = self.chunk[self.at];
                self.at += 1;
                match self.decoder.push(byte) {
                    None => {}
                    Some(Ok(frame)) => return Ok(FromDevice::from_frame(&frame)),
                    Some(Err(e)) => {
                        debug!(error = %e, "undecodable frame from the device");
                        self.garbage += 1;
                        self.last_error = Some(e);
                    }
                }
            }
            let read = self.io.read(&mut self.chunk);
            let n = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline.into(), read).await {
                    Ok(result) => result,
                    Err(_) => return Err(Silence::Timeout),
                },
                None => read.await,
            }
            .map_err(|e| Silence::Closed(format!("line read: {e}")))?;
            if n == 0 {
                return Err(Silence::Closed("the device closed the line".into()));
            }
            self.heard = true;
            self.at = 0;
            self.filled = n;
        }
    }

    fn garbage_note(&self) -> String {
        match (self.garbage, &self.last_error) {
            (0, _) | (_, None) => String::new(),
            (n, Some(e)) => format!("; {n} undecodable frame(s), last: {e}"),
        }
    }
}

/// Runs one unit on `line`. `wait_for_device`: the unit's time starts with the
/// first byte from the device (a fixture waiting for the operator), and a
/// device answering as `previous` (the unit just done, still plugged in) is
/// waited out.
pub async fn run_unit<T: AsyncRead + AsyncWrite + Unpin>(
    station: &Station,
    line: T,
    fixture: &str,
    wait_for_device: bool,
    previous: Option<&str>,
) -> UnitReport {
    let mut port = Port::new(line);
    let mut started = Instant::now();
    let mut report = UnitReport {
        fixture: fixture.to_owned(),
        device_id: None,
        agent_version: None,
        outcome: UnitOutcome::Failed {
            reason: String::new(),
        },
        requests: 0,
        elapsed: Duration::ZERO,
    };
    let mut held = None;
    let outcome = drive(
        station,
        &mut port,
        &mut report,
        &mut held,
        &mut started,
        wait_for_device,
        previous,
    )
    .await;
    report.elapsed = started.elapsed();
    report.outcome = match outcome {
        Ok(outcome) => outcome,
        Err(reason) => UnitOutcome::Failed {
            reason: format!("{reason}{}", port.garbage_note()),
        },
    };
    if let Some(device_id) = &report.device_id {
        let (label, detail) = match &report.outcome {
            UnitOutcome::Passed { serial } => ("pass", serial.as_str()),
            UnitOutcome::Failed { reason } => ("fail", reason.as_str()),
            UnitOutcome::Skipped { reason } => ("skip", reason.as_str()),
        };
        if let Err(e) = station.pool.record(device_id, label, detail) {
            warn!(error = %e, "cannot write the journal");
        }
    }
    // After the outcome is journaled, so that a unit claiming this id next
    // sees it passed.
    if let Some(device_id) = held {
        station.pool.release(&device_id);
    }
    // The operator reads the report lines `run` hands out; the log only
    // keeps them for `IDGATE_LOG=debug`.
    debug!(%report, "unit finished");
    report
}

/// `held`: the id this unit holds in the pool, once it has one.
async fn drive<T: AsyncRead + AsyncWrite + Unpin>(
    station: &Station,
    port: &mut Port<T>,
    report: &mut UnitReport,
    held: &mut Option<String>,
    started: &mut Instant,
    wait_for_device: bool,
    previous: Option<&str>,
) -> Result<UnitOutcome, String> {
    // 1. Hello until the device answers.
    let mut deadline = (!wait_for_device).then(|| *started + station.unit_timeout);
    let (state, reported_id) = loop {
        port.send(&Frame::Hello).await?;
        let resend = Instant::now() + station.hello_interval;
        let until = deadline.map_or(resend, |d| d.min(resend));
        match port.recv(Some(until)).await {
            Ok(FromDevice::HelloAck {
                state,
                device_id,
                agent_version,
            }) => {
                if wait_for_device
                    && state == DeviceState::Enrolled
                    && previous == Some(device_id.as_str())
                {
                    // The unit just done is still on the fixture.
                    continue;
                }
                report.agent_version = Some(agent_version);
                break (state, device_id);
            }
            Ok(other) => debug!(?other, "ignoring a frame before hello_ack"),
            Err(Silence::Timeout) => {}
            Err(Silence::Closed(reason)) => return Err(format!("{reason} before answering hello")),
        }
        if deadline.is_none() && port.heard {
            *started = Instant::now();
            deadline = Some(*started + station.unit_timeout);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(format!("no hello_ack within {:?}", station.unit_timeout));
        }
    };
    if deadline.is_none() {
        *started = Instant::now();
    }
    let deadline = *started + station.unit_timeout;

    // 2. Its id and token.
    let assignment: Assignment = match state {
        DeviceState::Enrolled => {
            report.device_id = Some(reported_id);
            return Ok(UnitOutcome::Skipped {
                reason: "already enrolled".into(),
            });
        }
        DeviceState::Provisioned => {
            report.device_id = Some(reported_id.clone());
            // Any board can claim any id: only a unit this station gave the
            // id to, and that has not passed, gets its token again.
            station.pool.reclaim(&reported_id).map_err(|refusal| {
                warn!(device_id = %reported_id, %refusal, "refused a unit's claimed id");
                refusal.to_string()
            })?
        }
        DeviceState::Blank => station
            .pool
            .assign_next()
            .map_err(|e| format!("journal: {e}"))?
            .ok_or("no device id left in the tokens file")?,
    };
    report.device_id = Some(assignment.device_id.clone());
    *held = Some(assignment.device_id.clone());
    port.send(&Frame::Provision {
        device_id: &assignment.device_id,
        token: assignment.token.as_bytes(),
    })
    .await?;

    // 3. Relay requests until the device is done.
    let mut relayed = 0usize;
    loop {
        let frame = match port.recv(Some(deadline)).await {
            Ok(frame) => frame,
            Err(Silence::Timeout) => {
                let waiting_for = if relayed == 0 {
                    "its enrollment request"
                } else {
                    "done after the gateway's reply"
                };
                return Err(format!(
                    "timed out after {:?} waiting for {waiting_for}",
                    station.unit_timeout
                ));
            }
            Err(Silence::Closed(reason)) => return Err(reason),
        };
        match frame {
            FromDevice::Request {
                op: Op::Enroll,
                format,
                payload,
            } => {
                let left = deadline.saturating_duration_since(Instant::now());
                let (reply, answer) = station
                    .relay
                    .enroll(
                        &assignment.device_id,
                        format,
                        &payload,
                        left.min(station.reply_timeout),
                    )
                    .await
                    .map_err(|e| format!("relaying the request: {e}"))?;
                relayed += 1;
                report.requests = relayed;
                let frame = Frame::Reply {
                    op: Op::Enroll,
                    format,
                    outcome: reply,
                    payload: &answer,
                };
                if frame.body_len() > link::MAX_BODY {
                    return Err(format!(
                        "the gateway's reply ({} bytes) does not fit a link frame",
                        answer.len()
                    ));
                }
                if reply == Reply::Rejected {
                    debug!(device_id = %assignment.device_id, "gateway rejected the request");
                }
                port.send(&frame).await?;
            }
            FromDevice::Request { op, .. } => {
                return Err(format!(
                    "the device asked for `{}`; a station relays enroll only",
                    op.as_str()
                ));
            }
            FromDevice::Done { serial } => return Ok(UnitOutcome::Passed { serial }),
            FromDevice::Failed { code, message } => {
                return Err(format!("the device failed: {code}: {message}"));
            }
            // Answers to the Hellos repeated while the device was busy
            // (booting, generating its key) arrive after the first one.
            FromDevice::HelloAck { .. } if relayed == 0 => {
                debug!("a late hello_ack; ignored");
            }
            FromDevice::HelloAck { .. } => {
                return Err("the device restarted during its unit".into());
            }
            FromDevice::Unexpected(name) => {
                debug!(name, "ignoring a station frame from the device");
            }
        }
    }
}
