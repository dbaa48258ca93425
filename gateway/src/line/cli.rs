//! `idgate station …` and `idgate line`: the operator's commands for line
//! stations, parsed by clap in the `idgate` binary and run here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::admin::{Renewed, StationFiles, add_station, renew_station};
use super::relay::{Relay, RelayOptions};
use super::station::{Fixtures, Station, Summary, UnitReport, run};
use super::tokens::TokenPool;
use crate::datadir::DataDir;
use crate::registry::{Registry, now};

/// `println!` that stops quietly when stdout is closed.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `idgate station …`.
#[derive(Debug, Subcommand)]
pub enum StationCommand {
    /// Register a line station: issue its certificate and key (written to
    /// DIR/station.pem, DIR/station.key with mode 0600, DIR/root.pem) and
    /// allow it to enroll the devices of the given batches.
    Add {
        /// Station id (same syntax as a device id).
        id: String,
        /// A batch whose devices it may enroll (repeat for several).
        #[arg(long = "batch", required = true)]
        batches: Vec<String>,
        /// Where to write the files (default: ./station-ID). Must not hold a key yet.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Certificate lifetime in days (1 to 398).
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
    /// Issue a new certificate and key for a station (written to a new
    /// directory). The old certificates stay valid until they expire unless
    /// --revoke-old is given.
    Renew {
        /// Station id.
        id: String,
        /// Where to write the files (must not hold a key yet).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days (1 to 398).
        #[arg(long, default_value_t = 90)]
        days: u64,
        /// Revoke the station's earlier certificates now (they go on the
        /// CRL; connections using them are closed): after a key compromise,
        /// or once the new files are on the station.
        #[arg(long)]
        revoke_old: bool,
        /// Why, with --revoke-old: compromised or superseded.
        #[arg(long, requires = "revoke_old", default_value = "superseded")]
        reason: String,
    },
    /// List stations with their batches and the devices they enrolled.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one station with its certificates.
    Show {
        /// Station id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a station for good: its certificates go on the CRL, running
    /// gateways close its connections and refuse its handshakes.
    Revoke {
        /// Station id.
        id: String,
        /// Why: compromised, retired or superseded.
        #[arg(long, default_value = "retired")]
        reason: String,
    },
}

/// `idgate line`: run a line station.
#[derive(Debug, Args)]
pub struct LineArgs {
    /// The gateway's MQTT/TLS address, HOST:PORT.
    #[arg(long)]
    pub broker: String,
    /// Directory with station.pem, station.key and root.pem (from `idgate station add`).
    #[arg(long)]
    pub station_dir: PathBuf,
    /// The station id (default: the directory's name without a `station-` prefix).
    #[arg(long)]
    pub station: Option<String>,
    /// The `id,token` file written by `idgate batch import`.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Journal of ids handed out (default: TOKENS.journal).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// A serial port fixture, e.g. /dev/ttyUSB0 (repeat for several fixtures).
    #[arg(long = "serial")]
    pub serial: Vec<String>,
    /// Baud rate of the serial ports.
    #[arg(long, default_value_t = 115_200)]
    pub baud: u32,
    /// Listen for fixtures connecting over TCP (QEMU `-serial tcp:HOST:PORT`,
    /// `idgate-sim device --tcp`): each connection is one unit.
    #[arg(long)]
    pub listen: Option<String>,
    /// Connect to a fixture over TCP (QEMU `-serial tcp::PORT,server`); repeat for several.
    #[arg(long = "tcp")]
    pub tcp: Vec<String>,
    /// Units handled at once with --listen.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Stop after this many units (default: as many as the tokens file has ids left).
    #[arg(long)]
    pub units: Option<usize>,
    /// Longest time one unit may take, in seconds.
    #[arg(long, default_value_t = 30)]
    pub unit_timeout: u64,
}

/// Runs an `idgate station` command.
pub async fn station(
    data: DataDir,
    registry: Registry,
    actor: &str,
    command: StationCommand,
) -> Result<()> {
    let result = station_inner(&data, &registry, actor, command).await;
    registry.close().await;
    result
}

async fn station_inner(
    data: &DataDir,
    registry: &Registry,
    actor: &str,
    command: StationCommand,
) -> Result<()> {
    match command {
        StationCommand::Add {
            id,
            batches,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("station-{id}")));
            if StationFiles::in_dir(&out).key.exists() {
                bail!("{} already holds a station key; pass --out", out.display());
            }
            let lifetime = Duration::from_secs(days.saturating_mul(86_400));
            let credentials =
                add_station(data, registry, &id, &batches, lifetime, actor, now()).await?;
            let files = credentials
                .write(&out)
                .with_context(|| format!("writing the station files into {}", out.display()))?;
            say!(
                "Registered station {id} for batch(es) {}; certificate serial {}, valid until {}.",
                batches.join(", "),
                credentials.serial,
                format_time(credentials.not_after)
            );
            say!("  certificate  {}", files.certificate.display());
            say!(
                "  key          {} (mode 0600: copy it to the station, then delete it here)",
                files.key.display()
            );
            say!("  trust        {}", files.root.display());
            Ok(())
        }
        StationCommand::Renew {
            id,
            out,
            days,
            revoke_old,
            reason,
        } => {
            let reason = match reason.as_str() {
                "compromised" => "keyCompromise",
                "superseded" => "superseded",
                other => bail!("unknown reason {other:?} (compromised, superseded)"),
            };
            if StationFiles::in_dir(&out).key.exists() {
                bail!(
                    "{} already holds a station key; pass another --out",
                    out.display()
                );
            }
            let lifetime = Duration::from_secs(days.saturating_mul(86_400));
            let revoke_old = revoke_old.then_some(reason);
            let Renewed {
                credentials,
                revoked,
            } = renew_station(data, registry, &id, lifetime, revoke_old, actor, now()).await?;
            let files = credentials
                .write(&out)
                .with_context(|| format!("writing the station files into {}", out.display()))?;
            say!(
                "Issued station {id} a new certificate, serial {}, valid until {}.",
                credentials.serial,
                format_time(credentials.not_after)
            );
            say!("  certificate  {}", files.certificate.display());
            say!(
                "  key          {} (mode 0600: copy it to the station, then delete it here)",
                files.key.display()
            );
            say!("  trust        {}", files.root.display());
            if revoke_old.is_some() {
                say!(
                    "Revoked {} earlier certificate(s): {}. Running gateways refuse them and close \
                     their connections within a second.",
                    revoked.len(),
                    revoked.join(", ")
                );
            }
            Ok(())
        }
        StationCommand::List { json } => {
            let stations = registry.stations().await?;
            if json {
                say!("{}", serde_json::to_string_pretty(&stations)?);
                return Ok(());
            }
            say!(
                "{:<24} {:<8} {:>8}  BATCHES",
                "STATION",
                "STATUS",
                "ENROLLED"
            );
            for s in &stations {
                say!(
                    "{:<24} {:<8} {:>8}  {}",
                    s.id,
                    s.status.as_str(),
                    s.enrolled,
                    s.batches.join(",")
                );
            }
            say!("{} station(s)", stations.len());
            Ok(())
        }
        StationCommand::Show { id, json } => {
            let Some(station) = registry.station(&id).await? else {
                bail!("no station {id:?} (see `idgate station list`)");
            };
            let certificates = registry.station_certificates(&id).await?;
            if json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "station": station,
                        "certificates": certificates,
                    }))?
                );
                return Ok(());
            }
            say!("Station {}", station.id);
            say!("  status      {}", station.status.as_str());
            say!("  batches     {}", station.batches.join(", "));
            say!("  enrolled    {} device(s)", station.enrolled);
            say!(
                "  registered  {} by {}",
                format_time(station.created_at),
                station.created_by
            );
            say!("Certificates ({})", certificates.len());
            for c in &certificates {
                let state = match (c.revoked_at, c.not_after < now()) {
                    (Some(_), _) => "revoked",
                    (None, true) => "expired",
                    (None, false) => "valid",
                };
                say!(
                    "  {}  {}  {} → {}",
                    c.serial,
                    state,
                    format_time(c.not_before),
                    format_time(c.not_after)
                );
            }
            Ok(())
        }
        StationCommand::Revoke { id, reason } => {
            let reason = match reason.as_str() {
                "compromised" => "keyCompromise",
                "retired" => "cessationOfOperation",
                "superseded" => "superseded",
                other => bail!("unknown reason {other:?} (compromised, retired, superseded)"),
            };
            let serials = registry.revoke_station(&id, reason, actor, now()).await?;
            say!(
                "Revoked station {id}; {} certificate(s) revoked: {}.",
                serials.len(),
                serials.join(", ")
            );
            say!(
                "Running gateways refuse its handshakes and close its connections within a second."
            );
            Ok(())
        }
    }
}

/// Runs `idgate line`; the exit status is a failure if any unit failed.
pub async fn line(args: LineArgs) -> Result<Summary> {
    let read = |name: &str| {
        let path = args.station_dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let station_id = match &args.station {
        Some(id) => id.clone(),
        None => {
            let name = args
                .station_dir
                .file_name()
                .and_then(|n| n.to_str())
                .context("pass --station ID")?;
            name.strip_prefix("station-").unwrap_or(name).to_owned()
        }
    };
    let options = RelayOptions {
        broker: args.broker.clone(),
        station_id: station_id.clone(),
        root_pem: read("root.pem")?,
        certificate_pem: read("station.pem")?,
        key_pem: read("station.key")?,
    };
    let pool = TokenPool::open(&args.tokens, args.journal.as_deref())?;
    let units = args.units.unwrap_or_else(|| pool.remaining());
    if units == 0 {
        bail!(
            "every id of {} has been handed out already (see {})",
            args.tokens.display(),
            pool.journal_path().display()
        );
    }
    let fixtures = match (
        args.listen.as_deref(),
        args.tcp.is_empty(),
        args.serial.is_empty(),
    ) {
        (Some(address), true, true) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening on {address}"))?;
            eprintln!(
                "listening for fixtures on {}",
                listener
                    .local_addr()
                    .map_or_else(|_| address.to_owned(), |a| a.to_string())
            );
            Fixtures::Listen {
                listener,
                parallel: args.parallel,
            }
        }
        (None, false, true) => Fixtures::Connect(args.tcp.clone()),
        (None, true, false) => {
            let mut ports = Vec::new();
            for path in &args.serial {
                let stream = super::serial::open(path, args.baud).map_err(anyhow::Error::msg)?;
                ports.push((format!("serial {path}"), stream));
            }
            Fixtures::Streams(ports)
        }
        _ => {
            bail!("give exactly one kind of fixture: --serial PORT…, --listen ADDR or --tcp ADDR…")
        }
    };
    let relay = Relay::connect(&options, Duration::from_secs(15)).await?;
    eprintln!("station {station_id} connected to {}", args.broker);
    let station = Arc::new(Station {
        relay,
        pool,
        unit_timeout: Duration::from_secs(args.unit_timeout.max(1)),
        hello_interval: Duration::from_secs(1),
        reply_timeout: Duration::from_secs(20),
    });
    let bar = progress(units);
    let report = |unit: &UnitReport| {
        if bar.is_hidden() {
            eprintln!("{unit}");
        } else {
            bar.println(unit.to_string());
            bar.inc(1);
        }
    };
    let summary = run(station.clone(), fixtures, units, &report).await;
    bar.finish_and_clear();
    if let Ok(station) = Arc::try_unwrap(station) {
        station.relay.close().await;
    }
    say!("{summary}");
    Ok(summary)
}

/// A live progress bar on a terminal; plain lines otherwise.
fn progress(units: usize) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(units as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("line {bar:40} {pos}/{len} units ({elapsed})")
    {
        bar.set_style(style);
    }
    bar
}

fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
