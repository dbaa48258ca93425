//! A simulated device on a line station's fixture: it speaks the line link
//! (`idgate_pki::link`) over a byte stream (TCP standing in for the serial
//! port) and enrolls with the real agent ([`Enrollment`] with a
//! [`SoftKeyStore`]), so the station is tested against the same code the
//! firmware runs. It can also misbehave, for the station's tests: answer
//! garbage, or nothing at all.

use std::time::Duration;

use idgate_agent::{Config, Enrollment, Event, MAX_REQUEST, RetryPolicy, Rid};
use idgate_pki::link::{self, Decoder, DeviceState, Frame};
use idgate_pki::protocol::{Format, Op, Topic};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep_until};

use crate::SimError;
use crate::enroll::Enrolled;
use crate::keystore::SoftKeyStore;

/// How the simulated device behaves on the line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Like the firmware: answer `Hello`, take its id and token, enroll.
    #[default]
    Normal,
    /// Answer every byte with random bytes (some of them zeros, so the
    /// station sees "frames" that do not decode).
    Garbage,
    /// Read everything, answer nothing.
    Silent,
}

/// What a simulated line device needs.
#[derive(Clone)]
pub struct LineDeviceOptions {
    /// PEM with the root CA certificate(s) the device pins.
    pub ca_pem: Vec<u8>,
    /// How it behaves.
    pub behaviour: Behaviour,
    /// The agent's retransmission policy (the station relays every attempt).
    pub retry: RetryPolicy,
    /// Give up after this long.
    pub timeout: Duration,
    /// The id and token the device already holds (a unit coming back after
    /// a failed attempt): it reports `provisioned` instead of `blank`. With
    /// another unit's id (and any token) it is the rogue board that tries to
    /// collect that id's token from the station.
    pub provisioned: Option<(String, String)>,
}

impl LineDeviceOptions {
    /// A well-behaved device pinning the roots in `ca_pem`, 60 s timeout.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> LineDeviceOptions {
        LineDeviceOptions {
            ca_pem: ca_pem.into(),
            behaviour: Behaviour::Normal,
            retry: RetryPolicy::DEFAULT,
            timeout: Duration::from_secs(60),
            provisioned: None,
        }
    }
}

impl std::fmt::Debug for LineDeviceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineDeviceOptions")
            .field("behaviour", &self.behaviour)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("provisioned", &self.provisioned.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

/// The version a simulated device reports in its `HelloAck`.
pub const AGENT_VERSION: &str = concat!("idgate-sim ", env!("CARGO_PKG_VERSION"));

/// Runs the device on `line` until it has enrolled (and said so), the
/// station closed the line, or the timeout passed. A misbehaving device
/// returns `Err(SimError::Timeout)` or the line's end as
/// [`SimError::Internal`].
pub async fn run_line_device<T: AsyncRead + AsyncWrite + Unpin>(
    line: T,
    options: &LineDeviceOptions,
) -> Result<Enrolled, SimError> {
    let deadline = Instant::now() + options.timeout;
    match options.behaviour {
        Behaviour::Normal => Device::new(line, options)?.run(deadline).await,
        Behaviour::Garbage => misbehave(line, deadline, true).await,
        Behaviour::Silent => misbehave(line, deadline, false).await,
    }
}

async fn misbehave<T: AsyncRead + AsyncWrite + Unpin>(
    mut line: T,
    deadline: Instant,
    garbage: bool,
) -> Result<Enrolled, SimError> {
    let mut buf = [0u8; 512];
    let mut rng = rand::rngs::OsRng;
    loop {
        let n = tokio::select! {
            () = sleep_until(deadline) => return Err(SimError::Timeout(Duration::ZERO)),
            read = line.read(&mut buf) => read.map_err(|_| SimError::Internal("line closed"))?,
        };
        if n == 0 {
            return Err(SimError::Internal("line closed"));
        }
        if garbage {
            let mut noise = [0u8; 64];
            rng.fill_bytes(&mut noise);
            // A zero now and then makes the station's decoder end a "frame".
            noise[20] = 0;
            noise[63] = 0;
            if line.write_all(&noise).await.is_err() {
                return Err(SimError::Internal("line closed"));
            }
        }
    }
}

struct Device<'o, T> {
    line: T,
    options: &'o LineDeviceOptions,
    roots: Vec<Vec<u8>>,
    decoder: Decoder<Vec<u8>>,
    clock: Instant,
    /// The id and token, once provisioned.
    identity: Option<(String, String)>,
    agent: Option<Enrollment<SoftKeyStore>>,
}

impl<'o, T: AsyncRead + AsyncWrite + Unpin> Device<'o, T> {
    fn new(line: T, options: &'o LineDeviceOptions) -> Result<Self, SimError> {
        Ok(Device {
            line,
            options,
            roots: crate::tls::pinned_roots(&options.ca_pem)?,
            decoder: Decoder::new(vec![0u8; link::MAX_BODY]),
            clock: Instant::now(),
            identity: options.provisioned.clone(),
            agent: None,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn send(&mut self, frame: &Frame<'_>) -> Result<(), SimError> {
        let mut out = vec![0u8; link::MAX_FRAME];
        let n = frame
            .encode(&mut out)
            .map_err(|_| SimError::Internal("a frame does not encode"))?;
        self.line
            .write_all(&out[..n])
            .await
            .map_err(|_| SimError::Internal("line closed"))
    }

    async fn run(mut self, deadline: Instant) -> Result<Enrolled, SimError> {
        let mut buf = [0u8; 1024];
        loop {
            // Hand out what the agent wants sent.
            if let Some(agent) = self.agent.as_mut() {
                let mut request = [0u8; MAX_REQUEST];
                if let Some(transmit) = agent.poll_transmit(&mut request) {
                    self.send(&Frame::Request {
                        op: Op::Enroll,
                        format: Format::Cbor,
                        payload: &request[..transmit.len],
                    })
                    .await?;
                }
            }
            if let Some(done) = self.finished().await? {
                return done;
            }
            let wake = self
                .agent
                .as_ref()
                .and_then(|a| a.poll_timeout())
                .map_or(deadline, |ms| {
                    (self.clock + Duration::from_millis(ms)).min(deadline)
                });
            let n = tokio::select! {
                () = sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        return Err(SimError::Timeout(self.options.timeout));
                    }
                    let now = self.now_ms();
                    if let Some(agent) = self.agent.as_mut() {
                        agent.handle_timeout(now);
                    }
                    continue;
                }
                read = self.line.read(&mut buf) => read.map_err(|_| SimError::Internal("line closed"))?,
            };
            if n == 0 {
                return Err(SimError::Internal("the station closed the line"));
            }
            for &byte in &buf[..n] {
                self.take(byte).await?;
            }
        }
    }

    /// The agent's final event, answered on the line.
    async fn finished(&mut self) -> Result<Option<Result<Enrolled, SimError>>, SimError> {
        let Some(event) = self.agent.as_mut().and_then(|a| a.poll_event()) else {
            return Ok(None);
        };
        let Some(agent) = self.agent.take() else {
            return Ok(None);
        };
        let result = crate::session::outcome(event.clone(), agent);
        match (&event, &result) {
            (Event::Enrolled(_), Ok(enrolled)) => {
                self.send(&Frame::Done {
                    serial: &enrolled.serial,
                })
                .await?;
            }
            (_, Err(SimError::Rejected { code, message })) => {
                let message = cut(message, link::MAX_MESSAGE);
                self.send(&Frame::Failed {
                    code: cut(code, 64),
                    message,
                })
                .await?;
            }
            (_, Err(e)) => {
                let message = e.to_string();
                self.send(&Frame::Failed {
                    code: "gave_up",
                    message: cut(&message, link::MAX_MESSAGE),
                })
                .await?;
            }
            _ => {}
        }
        let _ = self.line.flush().await;
        Ok(Some(result))
    }

    async fn take(&mut self, byte: u8) -> Result<(), SimError> {
        // Copy what is needed out of the frame, which borrows the decoder.
        enum Action {
            Hello,
            Provision(String, String),
            Reply(Topic<'static>, Vec<u8>, String),
            Ignore,
        }
        let action = match self.decoder.push(byte) {
            None => return Ok(()),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "undecodable frame from the station");
                return Ok(());
            }
            Some(Ok(Frame::Hello)) => Action::Hello,
            Some(Ok(Frame::Provision { device_id, token })) => match std::str::from_utf8(token) {
                Ok(token) => Action::Provision(device_id.to_owned(), token.to_owned()),
                Err(_) => Action::Ignore,
            },
            Some(Ok(Frame::Reply {
                op: Op::Enroll,
                format: Format::Cbor,
                outcome,
                payload,
            })) => match &self.identity {
                Some((id, _)) => Action::Reply(
                    Topic::request("x", Op::Enroll, Format::Cbor).with_reply(outcome),
                    payload.to_vec(),
                    id.clone(),
                ),
                None => Action::Ignore,
            },
            Some(Ok(_)) => Action::Ignore,
        };
        match action {
            Action::Hello => {
                // A new session: whatever was in progress is dropped.
                self.agent = None;
                let (state, id) = match &self.identity {
                    Some((id, _)) => (DeviceState::Provisioned, id.clone()),
                    None => (DeviceState::Blank, String::new()),
                };
                self.send(&Frame::HelloAck {
                    state,
                    device_id: &id,
                    agent_version: AGENT_VERSION,
                })
                .await
            }
            Action::Provision(device_id, token) => {
                let pinned: Vec<&[u8]> = self.roots.iter().map(Vec::as_slice).collect();
                let config = Config {
                    device_id: &device_id,
                    token: token.as_bytes(),
                    retry: self.options.retry,
                    pinned_roots: &pinned,
                };
                let rid = Rid::random(&mut rand::rngs::OsRng);
                let agent = Enrollment::start(&config, SoftKeyStore::new(), rid, self.now_ms())?;
                self.agent = Some(agent);
                self.identity = Some((device_id, token));
                Ok(())
            }
            Action::Reply(template, payload, id) => {
                // The reply is checked exactly as one from the broker would be.
                let topic = Topic {
                    device_id: &id,
                    ..template
                }
                .to_string();
                let now = self.now_ms();
                if let Some(agent) = self.agent.as_mut()
                    && let Err(e) = agent.handle_message(now, &topic, &payload)
                {
                    tracing::warn!(error = %e, "the agent ignored a relayed reply");
                }
                Ok(())
            }
            Action::Ignore => Ok(()),
        }
    }
}

fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
