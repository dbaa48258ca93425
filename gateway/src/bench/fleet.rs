//! The load generator of `idgate bench enroll --keep-connected`, in child
//! processes: the simulated devices are split over children of the bench
//! (the same binary, re-executed as the hidden `idgate bench devices`), so
//! that their sockets count against each child's open-file limit and the
//! gateway's process holds only its own side of each connection. It also
//! keeps the gateway's CPU and memory apart from the load generator's.
//!
//! The protocol is JSON lines. Parent → child, on the child's stdin:
//! `setup` (the gateway's address, the path of its root certificate, how
//! many devices connect at once, the devices' ids and one-time tokens),
//! `start`, any number of `usage`, then the end of input, on which the
//! child closes its connections and exits. Child → parent, on its stdout:
//! `ready` once every key, CSR and proof is made, `ramp` once every device
//! is connected and enrolled (each device's latencies and the ramp's CPU),
//! `usage` answers, or `failed` with the reason. The child's log lines go
//! to stderr, which it shares with the parent. Tokens travel only through
//! the pipe, never on a command line or in a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use super::connected::{self, Dialer};
use super::{
    BenchError, Device, FileWatch, client_tls, cpu_seconds, open_files, peak_rss_kib,
    prepare_enroll, rss_kib, setup,
};

/// The hidden subcommand that runs a child (`idgate bench devices`).
pub const SUBCOMMAND: [&str; 2] = ["bench", "devices"];

/// A device a child drives: its id and one-time enrollment token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credential {
    /// Device id.
    pub id: String,
    /// One-time enrollment token.
    pub token: String,
}

/// A process's CPU, memory and descriptors at one moment.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Usage {
    /// CPU seconds (user + system) so far.
    pub cpu_seconds: f64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Peak resident memory, KiB.
    pub peak_rss_kib: u64,
    /// Open file descriptors.
    pub open_files: usize,
}

impl Usage {
    /// This process's figures now (zeros where /proc is absent).
    pub fn now() -> Usage {
        Usage {
            cpu_seconds: cpu_seconds(),
            rss_kib: rss_kib(),
            peak_rss_kib: peak_rss_kib(),
            open_files: open_files(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToChild {
    Setup {
        gateway: SocketAddr,
        root_certificate: PathBuf,
        concurrency: usize,
        devices: Vec<Credential>,
    },
    Start,
    Usage,
}

/// What a child measured in the ramp.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ramp {
    /// Devices whose enrollment was accepted.
    pub accepted: usize,
    /// Each device's connection latency (TCP, TLS, CONNECT, SUBSCRIBE), µs.
    pub connect_us: Vec<u64>,
    /// Each device's enrollment latency (request → reply), µs.
    pub enroll_us: Vec<u64>,
    /// The child's CPU seconds in the ramp.
    pub cpu_seconds: f64,
    /// The child's figures with every device connected.
    pub usage: Usage,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum FromChild {
    Ready { usage: Usage },
    Ramp(Ramp),
    Usage { usage: Usage },
    Failed { error: String },
}

async fn send<W: AsyncWrite + Unpin>(
    output: &mut W,
    message: &impl Serialize,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    output.write_all(&line).await?;
    output.flush().await
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Runs one child of the load generator over `input` and `output` (its
/// stdin and stdout); returns when the parent closes `input`. A failure is
/// also reported to the parent as a `failed` message.
pub async fn serve<R, W>(input: R, mut output: W) -> Result<(), BenchError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = input.lines();
    let result = child(&mut lines, &mut output).await;
    if let Err(e) = &result {
        let _ = send(&mut output, &FromChild::Failed { error: e.detail() }).await;
    }
    result
}

async fn receive<R: AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> Result<Option<ToChild>, BenchError> {
    let Some(line) = lines.next_line().await.map_err(setup)? else {
        return Ok(None);
    };
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| setup(format!("unreadable message from the bench: {e}")))
}

async fn child<R, W>(lines: &mut tokio::io::Lines<R>, output: &mut W) -> Result<(), BenchError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(ToChild::Setup {
        gateway,
        root_certificate,
        concurrency,
        devices,
    }) = receive(lines).await?
    else {
        return Err(setup("the bench did not start with `setup`"));
    };
    let root_pem = tokio::fs::read(&root_certificate)
        .await
        .map_err(|e| setup(format!("{}: {e}", root_certificate.display())))?;
    let dialer = Dialer {
        gateway,
        tls: client_tls(&root_pem)?,
    };
    let devices = devices
        .into_iter()
        .map(|c| Device {
            id: c.id,
            token: c.token,
            key_pkcs8: Vec::new(),
        })
        .collect();
    let (devices, jobs) = tokio::task::spawn_blocking(move || prepare_enroll(devices))
        .await
        .map_err(setup)??;
    let ids: Vec<String> = devices.into_iter().map(|d| d.id).collect();
    send(
        output,
        &FromChild::Ready {
            usage: Usage::now(),
        },
    )
    .await
    .map_err(setup)?;
    match receive(lines).await? {
        Some(ToChild::Start) => {}
        Some(other) => return Err(setup(format!("expected `start`, got {other:?}"))),
        None => return Ok(()),
    }
    let cpu_before = cpu_seconds();
    let fleet = connected::enroll_all(&dialer, &ids, jobs, concurrency).await?;
    let ramp = Ramp {
        accepted: fleet.iter().filter(|e| e.accepted).count(),
        connect_us: fleet.iter().map(|e| micros(e.connect)).collect(),
        enroll_us: fleet.iter().map(|e| micros(e.enroll)).collect(),
        cpu_seconds: cpu_seconds() - cpu_before,
        usage: Usage::now(),
    };
    send(output, &FromChild::Ramp(ramp))
        .await
        .map_err(|e| BenchError::Run(e.to_string()))?;
    // Hold the connections until the bench is done with them.
    while let Some(message) = receive(lines).await? {
        match message {
            ToChild::Usage => send(
                output,
                &FromChild::Usage {
                    usage: Usage::now(),
                },
            )
            .await
            .map_err(|e| BenchError::Run(e.to_string()))?,
            other => return Err(BenchError::Run(format!("unexpected {other:?}"))),
        }
    }
    drop(fleet);
    Ok(())
}

/// Splits `devices` over as few slices of at most `per_process` as
/// possible, as even as possible, and `concurrency` over the slices in
/// proportion (at least one each): `(first device, devices, concurrency)`.
pub fn split(devices: usize, per_process: usize, concurrency: usize) -> Vec<(usize, usize, usize)> {
    let per_process = per_process.max(1);
    let count = devices.div_ceil(per_process).max(1);
    let mut slices = Vec::with_capacity(count);
    let mut first = 0;
    for i in 0..count {
        let len = devices / count + usize::from(i < devices % count);
        // The share of `concurrency` up to the end of this slice, minus
        // what the slices before got: the shares add up to `concurrency`.
        let upto = |end: usize| (concurrency * end).div_ceil(devices.max(1));
        let share = (upto(first + len) - upto(first)).max(1);
        slices.push((first, len, share));
        first += len;
    }
    slices
}

/// What the parent hears from a child: a message, or why there will be none.
type Heard = (usize, Result<FromChild, String>);

/// The parent's handle on the children.
pub struct Children {
    processes: Vec<(Child, Option<ChildStdin>)>,
    heard: mpsc::UnboundedReceiver<Heard>,
}

impl Children {
    /// Starts one child of `program` per slice of `devices` and sends each
    /// its `setup`.
    pub async fn spawn(
        program: &Path,
        gateway: SocketAddr,
        root_certificate: &Path,
        devices: &[Credential],
        slices: &[(usize, usize, usize)],
    ) -> Result<Children, BenchError> {
        let (tell, heard) = mpsc::unbounded_channel();
        let mut processes = Vec::with_capacity(slices.len());
        for (index, &(first, len, concurrency)) in slices.iter().enumerate() {
            let mut process = tokio::process::Command::new(program)
                .args(SUBCOMMAND)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| setup(format!("starting {}: {e}", program.display())))?;
            let (Some(mut stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take())
            else {
                return Err(setup("a child's pipes are missing"));
            };
            let tell = tell.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    let heard = match lines.next_line().await {
                        Ok(Some(line)) => serde_json::from_str::<FromChild>(&line)
                            .map_err(|e| format!("unreadable message: {e}")),
                        Ok(None) => Err("closed its output".to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    let end = heard.is_err();
                    if tell.send((index, heard)).is_err() || end {
                        return;
                    }
                }
            });
            let message = ToChild::Setup {
                gateway,
                root_certificate: root_certificate.to_owned(),
                concurrency,
                devices: devices[first..first + len].to_vec(),
            };
            send(&mut stdin, &message)
                .await
                .map_err(|e| setup(format!("load-generator process {index}: {e}")))?;
            processes.push((process, Some(stdin)));
        }
        Ok(Children { processes, heard })
    }

    async fn tell_all(&mut self, message: &ToChild) -> Result<(), BenchError> {
        for (index, (_, stdin)) in self.processes.iter_mut().enumerate() {
            let Some(stdin) = stdin.as_mut() else {
                return Err(BenchError::Run(format!(
                    "load-generator process {index} was closed"
                )));
            };
            send(stdin, message)
                .await
                .map_err(|e| BenchError::Run(format!("load-generator process {index}: {e}")))?;
        }
        Ok(())
    }

    /// Waits for one answer of each child, in the children's order; stops
    /// at the first failure, or when the gateway's process runs out of
    /// open files.
    async fn answers<T>(
        &mut self,
        pick: impl FnMut(FromChild) -> Option<T>,
        watch: &mut FileWatch,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Vec<T>, BenchError> {
        let answers = tokio::select! {
            answers = self.collect(pick) => answers,
            error = watch.until_exhausted(log) => return Err(error),
        };
        answers.map_err(|e| watch.explain(e))
    }

    async fn collect<T>(
        &mut self,
        mut pick: impl FnMut(FromChild) -> Option<T>,
    ) -> Result<Vec<T>, BenchError> {
        let mut answers: Vec<Option<T>> = (0..self.processes.len()).map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            let (index, heard) =
                self.heard.recv().await.ok_or_else(|| {
                    BenchError::Run("every load-generator process is gone".into())
                })?;
            let message = match heard {
                Ok(FromChild::Failed { error }) => {
                    return Err(BenchError::Run(format!(
                        "load-generator process {index}: {error}"
                    )));
                }
                Ok(message) => message,
                Err(reason) => {
                    let status = match self.processes.get_mut(index) {
                        Some((process, _)) => {
                            match tokio::time::timeout(Duration::from_secs(5), process.wait()).await
                            {
                                Ok(Ok(status)) => format!(" ({status})"),
                                _ => String::new(),
                            }
                        }
                        None => String::new(),
                    };
                    return Err(BenchError::Run(format!(
                        "load-generator process {index} {reason}{status}"
                    )));
                }
            };
            let kind = format!("{message:?}");
            match (answers.get_mut(index), pick(message)) {
                (Some(slot @ None), Some(answer)) => *slot = Some(answer),
                _ => {
                    let kind: String = kind.chars().take(40).collect();
                    return Err(BenchError::Run(format!(
                        "load-generator process {index}: unexpected {kind}…"
                    )));
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Waits until every child has prepared its devices; their figures then.
    pub async fn ready(
        &mut self,
        watch: &mut FileWatch,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Vec<Usage>, BenchError> {
        self.answers(
            |m| match m {
                FromChild::Ready { usage } => Some(usage),
                _ => None,
            },
            watch,
            log,
        )
        .await
    }

    /// Starts the ramp in every child and waits until each has connected
    /// and enrolled its devices.
    pub async fn ramp(
        &mut self,
        watch: &mut FileWatch,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Vec<Ramp>, BenchError> {
        self.tell_all(&ToChild::Start).await?;
        self.answers(
            |m| match m {
                FromChild::Ramp(ramp) => Some(ramp),
                _ => None,
            },
            watch,
            log,
        )
        .await
    }

    /// Every child's figures now.
    pub async fn usage(
        &mut self,
        watch: &mut FileWatch,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Vec<Usage>, BenchError> {
        self.tell_all(&ToChild::Usage).await?;
        self.answers(
            |m| match m {
                FromChild::Usage { usage } => Some(usage),
                _ => None,
            },
            watch,
            log,
        )
        .await
    }

    /// Closes every child's input (they close their connections and exit)
    /// and waits for them.
    pub async fn close(mut self) -> Result<(), BenchError> {
        for (_, stdin) in &mut self.processes {
            stdin.take();
        }
        for (index, (process, _)) in self.processes.iter_mut().enumerate() {
            let status = process
                .wait()
                .await
                .map_err(|e| BenchError::Run(format!("load-generator process {index}: {e}")))?;
            if !status.success() {
                return Err(BenchError::Run(format!(
                    "load-generator process {index} ended with {status}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_fills_few_processes_evenly() {
        assert_eq!(split(30, 15_000, 8), vec![(0, 30, 8)]);
        assert_eq!(split(30, 20, 8), vec![(0, 15, 4), (15, 15, 4)]);
        let slices = split(40_001, 15_000, 32);
        assert_eq!(slices.len(), 3);
        assert_eq!(slices.iter().map(|s| s.1).sum::<usize>(), 40_001);
        assert!(slices.iter().all(|s| s.1 <= 15_000 && s.1 >= 13_333));
        assert_eq!(slices.iter().map(|s| s.2).sum::<usize>(), 32);
        for pair in slices.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0);
        }
        // Fewer connecting at once than processes: still one each.
        assert!(split(30, 10, 1).iter().all(|s| s.2 == 1));
    }

    /// A child refuses to go on without `setup`, and says so to the parent.
    #[tokio::test]
    async fn a_child_reports_a_protocol_error() {
        let mut output = Vec::new();
        let input: &[u8] = b"{\"type\":\"start\"}\n";
        assert!(serve(input, &mut output).await.is_err());
        let reply: FromChild = serde_json::from_slice(&output).expect("a JSON line");
        assert!(
            matches!(&reply, FromChild::Failed { error } if error.contains("setup")),
            "{reply:?}"
        );
    }

    #[test]
    fn messages_round_trip() {
        let ramp = FromChild::Ramp(Ramp {
            accepted: 2,
            connect_us: vec![1, 2],
            enroll_us: vec![3, 4],
            cpu_seconds: 0.5,
            usage: Usage::now(),
        });
        let line = serde_json::to_string(&ramp).expect("serializes");
        assert!(line.starts_with("{\"type\":\"ramp\""), "{line}");
        let back: FromChild = serde_json::from_str(&line).expect("parses");
        assert!(matches!(back, FromChild::Ramp(r) if r.enroll_us == [3, 4] && r.accepted == 2));
    }
}
