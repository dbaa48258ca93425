//! Command-line parsing and output for `idgate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use idgate_gateway::admin::{self, RevokeReason};
use idgate_gateway::batch;
use idgate_gateway::datadir::{DataDir, read_text};
use idgate_gateway::gateway::{Gateway, Settings};
use idgate_gateway::registry::{
    BatchError, BatchSummary, DeviceFilter, DeviceStatus, NewBatch, NewDevice, Registry, now,
};
use idgate_pki::ca::{pem_certificates, summarize};
use idgate_pki::profile::Profile;
use idgate_pki::protocol::check_device_id;

/// `println!` that stops quietly when stdout is closed (`idgate device list | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod accounts;

/// idgate: device identity gateway (online intermediate CA over MQTT).
#[derive(Debug, Parser)]
#[command(name = "idgate", version, about)]
struct Cli {
    /// Data directory (CA, keys, SQLite registry).
    #[arg(
        long,
        global = true,
        env = "IDGATE_DATA",
        default_value = "./idgate-data"
    )]
    data: PathBuf,
    /// Registry URL: sqlite://PATH or postgres://… (default: DATA/registry.db).
    #[arg(long, global = true, env = "IDGATE_DATABASE")]
    database: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: embedded MQTT broker with TLS and the enrollment service.
    Serve(ServeArgs),
    /// Manage the certificate authorities.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Register and inspect devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Register manufacturing batches from CSV files and follow their progress.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Measure enrollment or renewal throughput against an in-process gateway.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Manage staff accounts of the admin API and web console.
    #[command(subcommand)]
    User(accounts::UserCommand),
    /// Manage API tokens for automation (line stations, scripts).
    #[command(subcommand)]
    Token(accounts::TokenCommand),
    /// Register and revoke line stations (the programming fixtures' identities).
    #[command(subcommand)]
    Station(idgate_gateway::line::cli::StationCommand),
    /// Run a line station: provision and enroll devices on serial/TCP fixtures.
    Line(idgate_gateway::line::cli::LineArgs),
}

#[derive(Debug, Subcommand)]
enum BatchCommand {
    /// Register every device of a CSV file (header `id[,owner,site,model]`) in
    /// one transaction, and write their one-time tokens to a 0600 file for the
    /// line's programming station. A bad row refuses the whole file.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Owner's email, for rows without an owner cell.
        #[arg(long)]
        owner: String,
        /// Site, for rows without a site cell.
        #[arg(long)]
        site: String,
        /// Model, for rows without a model cell.
        #[arg(long)]
        model: Option<String>,
        /// Batch id (default: b-YYYYMMDD-HHMMSS-xxxx).
        #[arg(long = "batch")]
        batch_id: Option<String>,
        /// Where to write the `id,token` lines (default: FILE's stem + .tokens.csv
        /// beside it). Never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List batches with their registered, enrolled, failed and pending counts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one batch: counts and the devices still pending.
    Show {
        /// Batch id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Enroll N simulated devices over MQTT/TLS and report the figures.
    Enroll(BenchArgs),
    /// Enroll N devices (untimed), then time one renewal of each.
    Renew(BenchArgs),
    /// One load-generator process of `bench enroll --keep-connected`, run
    /// by the bench itself: JSON lines on stdin and stdout.
    #[command(hide = true)]
    Devices,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 2000)]
    devices: usize,
    /// MQTT connections the devices' requests are spread over.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests each connection keeps in flight.
    #[arg(long, default_value_t = 4)]
    pipeline: usize,
    /// Offered load in requests per second (default: as fast as it goes).
    #[arg(long)]
    rate: Option<f64>,
    /// Keep the benchmark's data directory here instead of a temporary one.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// One connection per device (TLS handshake, CONNECT, SUBSCRIBE) that
    /// stays open after its enrollment; --concurrency devices connect at once.
    #[arg(long)]
    keep_connected: bool,
    /// With --keep-connected: most devices one load-generator process
    /// drives (each holds one open file per device; the gateway runs apart).
    #[arg(long, default_value_t = idgate_gateway::bench::DEVICES_PER_PROCESS)]
    devices_per_process: usize,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address devices connect to (MQTT over TLS). Port 0 picks a free port.
    #[arg(long, default_value = "0.0.0.0:8883")]
    mqtt_listen: SocketAddr,
    /// Address of the public HTTP endpoints: `GET /crl` and the OCSP responder.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Address of the admin API and web console (HTTPS). Keep it private.
    #[arg(long, default_value = "127.0.0.1:8443")]
    admin_listen: SocketAddr,
    /// Device certificate lifetime, e.g. 24h, 30m, 7d (5 minutes to 30 days).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// How long after expiry a certificate may still be renewed.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    renew_grace: Duration,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root CA and an issuing intermediate in the data directory.
    Init,
    /// Print the CA certificates: subjects, fingerprints, validity.
    Show,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Register a device and print its one-time enrollment token.
    Add {
        /// Device id: 1–64 of A–Z a–z 0–9 . _ -, starting with a letter or digit.
        id: String,
        /// Owner's email.
        #[arg(long)]
        owner: String,
        /// Site (building, plant, line…).
        #[arg(long)]
        site: String,
        /// Device model.
        #[arg(long)]
        model: Option<String>,
        /// The label on the device's case (what facilities staff search for).
        #[arg(long)]
        label: Option<String>,
        /// Print {"id", "token"} as JSON (for line tooling).
        #[arg(long)]
        json: bool,
    },
    /// List devices.
    List {
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        /// Only this owner.
        #[arg(long)]
        owner: Option<String>,
        /// Only this status: pending, active, suspended, revoked, retired.
        #[arg(long)]
        status: Option<DeviceStatus>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one device with its certificates and audit trail.
    Show {
        /// Device id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device for good: its certificates are revoked, its MQTT
    /// sessions closed, its renewals and enrollments refused.
    Revoke {
        /// Device id.
        id: String,
        /// Why: lost, stolen, compromised, retired or superseded.
        #[arg(long)]
        reason: RevokeReason,
    },
    /// Suspend a device until `resume`: its certificates are put on hold.
    Suspend {
        /// Device id.
        id: String,
    },
    /// Resume a suspended device, or clear one marked suspect.
    Resume {
        /// Device id.
        id: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Per-request log lines would cost the benchmark more than it measures.
    let quiet = matches!(cli.command, Command::Bench(_));
    init_logging(
        cli.log_json,
        if quiet {
            "warn,rumqttd=off"
        } else {
            "info,rumqttd=off"
        },
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("idgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> Result<()> {
    let data = DataDir::new(&cli.data);
    let database = cli.database.clone();
    match cli.command {
        Command::Serve(args) => serve(data, database, args).await,
        Command::Ca(CaCommand::Init) => {
            data.init_ca()?;
            say!("Created a CA in {}:", data.root().display());
            print_ca(&data)?;
            say!(
                "\nThe root key {} is needed only to create issuing CAs: keep it offline.",
                data.root_key().display()
            );
            Ok(())
        }
        Command::Ca(CaCommand::Show) => print_ca(&data),
        Command::Device(command) => device(data, database, command).await,
        Command::Batch(command) => batch(data, database, command).await,
        Command::Bench(command) => bench(command).await,
        Command::User(command) => accounts::user(data, database, command).await,
        Command::Token(command) => accounts::token(data, database, command).await,
        Command::Station(command) => {
            let registry = open_registry(&data, database).await?;
            idgate_gateway::line::cli::station(data, registry, &actor(), command).await
        }
        Command::Line(args) => {
            let summary = idgate_gateway::line::cli::line(args).await?;
            if summary.failed > 0 {
                bail!("{} unit(s) failed", summary.failed);
            }
            Ok(())
        }
    }
}

async fn open_registry(data: &DataDir, database: Option<String>) -> Result<Registry> {
    let url = match database {
        Some(url) => url,
        None => {
            if !data.root().exists() {
                bail!(
                    "no data directory at {} (run `idgate ca init` or `idgate serve` first, or pass --data)",
                    data.root().display()
                );
            }
            data.default_database_url()
        }
    };
    Registry::open(&url)
        .await
        .with_context(|| format!("opening the registry {}", redact(&url)))
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

async fn serve(data: DataDir, database: Option<String>, args: ServeArgs) -> Result<()> {
    let profile = Profile::new(args.cert_lifetime)?;
    let mut settings = Settings::new(data.clone());
    settings.database_url = database;
    settings.mqtt_listen = args.mqtt_listen;
    settings.http_listen = args.http_listen;
    settings.admin.listen = args.admin_listen;
    settings.policy.profile = profile;
    settings.policy.renew_grace = args.renew_grace;
    let gateway = Gateway::start(settings).await?;
    if gateway.initialized() {
        say!(
            "Initialised a new data directory at {}.",
            data.root().display()
        );
    }
    say!("idgate is serving.");
    say!(
        "  devices connect to   mqtts://{} (MQTT 3.1.1 or 5 over TLS)",
        gateway.mqtt_address()
    );
    say!(
        "  devices trust        {}",
        data.root_certificate().display()
    );
    say!(
        "  CRL                  http://{}/crl",
        gateway.http_address()
    );
    say!(
        "  OCSP responder       http://{}/ocsp",
        gateway.http_address()
    );
    say!(
        "  admin API, console   https://{}/ (`idgate user add NAME --role admin` first)",
        gateway.admin_address()
    );
    say!(
        "  certificate lifetime {}",
        format_duration(args.cert_lifetime)
    );
    say!(
        "Register a device:     idgate device add ID --owner EMAIL --site SITE --data {}",
        data.root().display()
    );
    say!(
        "Enroll a test device:  idgate-sim enroll --broker 127.0.0.1:{} --ca {} --id ID --token TOKEN --out DIR",
        gateway.mqtt_address().port(),
        data.root_certificate().display()
    );
    wait_for_signal().await?;
    eprintln!("idgate: shutting down (finishing requests in progress)");
    gateway.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn print_ca(data: &DataDir) -> Result<()> {
    if !data.has_ca() {
        bail!(
            "no CA in {} (run `idgate ca init --data {}`)",
            data.root().display(),
            data.root().display()
        );
    }
    for (label, path) in [
        ("Root CA", data.root_certificate()),
        ("Issuing CA", data.issuing_certificate()),
    ] {
        let der = pem_certificates(&read_text(&path)?)?.remove(0);
        let summary = summarize(&der)?;
        say!("{label} ({})", path.display());
        say!("  subject      {}", summary.subject);
        say!("  issuer       {}", summary.issuer);
        say!("  serial       {}", summary.serial);
        say!("  SHA-256      {}", summary.fingerprint_sha256);
        say!("  valid from   {}", format_time(summary.not_before));
        say!("  valid until  {}", format_time(summary.not_after));
        if let Some(path_len) = summary.ca {
            match path_len {
                Some(n) => say!("  CA           yes, path length {n}"),
                None => say!("  CA           yes, no path length limit"),
            }
        }
    }
    Ok(())
}

fn check_owner(owner: &str) -> Result<()> {
    batch::check_owner(owner).map_err(anyhow::Error::msg)
}

fn check_label(what: &str, value: &str) -> Result<()> {
    batch::check_label(what, value).map_err(anyhow::Error::msg)
}

async fn device(data: DataDir, database: Option<String>, command: DeviceCommand) -> Result<()> {
    match command {
        DeviceCommand::Add {
            id,
            owner,
            site,
            model,
            label,
            json,
        } => {
            check_device_id(&id).map_err(|e| anyhow::anyhow!("device id {id:?} {e}"))?;
            check_owner(&owner)?;
            check_label("site", &site)?;
            if let Some(model) = &model {
                check_label("model", model)?;
            }
            if let Some(label) = &label {
                check_label("label", label)?;
            }
            if !data.has_ca() {
                bail!(
                    "no CA in {} (run `idgate ca init --data {}` or `idgate serve` first)",
                    data.root().display(),
                    data.root().display()
                );
            }
            let tokens = data.tokens()?;
            let registry = open_registry(&data, database).await?;
            let new = tokens.generate(&id);
            let device = NewDevice {
                id: id.clone(),
                owner: owner.clone(),
                site: site.clone(),
                model,
                label,
                created_by: actor(),
            };
            registry.add_device(&device, &new.sealed, now()).await?;
            registry.close().await;
            if json {
                say!("{}", serde_json::json!({ "id": id, "token": new.token }));
            } else {
                say!("Registered device {id} (owner {owner}, site {site}), status pending.");
                say!("One-time enrollment token (shown only now; give it to the device):");
                say!("{}", new.token);
            }
            Ok(())
        }
        DeviceCommand::List {
            site,
            owner,
            status,
            json,
        } => {
            let registry = open_registry(&data, database).await?;
            let devices = registry
                .list_devices(&DeviceFilter {
                    site,
                    owner,
                    status,
                })
                .await?;
            registry.close().await;
            if json {
                say!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                say!(
                    "{:<24} {:<10} {:<28} {:<16} MODEL",
                    "ID",
                    "STATUS",
                    "OWNER",
                    "SITE"
                );
                for d in &devices {
                    say!(
                        "{:<24} {:<10} {:<28} {:<16} {}",
                        d.id,
                        d.status.as_str(),
                        d.owner,
                        d.site,
                        d.model.as_deref().unwrap_or("-")
                    );
                }
                say!("{} device(s)", devices.len());
            }
            Ok(())
        }
        DeviceCommand::Show { id, json } => {
            let registry = open_registry(&data, database).await?;
            let Some(device) = registry.device(&id).await? else {
                bail!("no device {id:?} is registered");
            };
            let certificates = registry.certificates(&id).await?;
            let audit = registry.audit_trail(&id).await?;
            let enrolled_by = registry.enrolled_by(&id).await?;
            registry.close().await;
            if json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "device": device,
                        "certificates": certificates,
                        "enrolled_by": enrolled_by,
                        "audit": audit,
                    }))?
                );
                return Ok(());
            }
            say!("Device {}", device.id);
            say!("  status      {}", device.status);
            say!("  owner       {}", device.owner);
            say!("  site        {}", device.site);
            say!("  model       {}", device.model.as_deref().unwrap_or("-"));
            say!("  label       {}", device.label.as_deref().unwrap_or("-"));
            say!(
                "  registered  {} by {}",
                format_time(device.created_at),
                device.created_by
            );
            say!("Certificates ({})", certificates.len());
            for c in &certificates {
                let state = match (&c.revoked_at, c.not_after < now()) {
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
                if let Some(by) = enrolled_by.iter().find(|e| e.serial == c.serial) {
                    say!("    enrolled by line station {}", by.station_id);
                }
            }
            say!("Audit trail ({})", audit.len());
            for a in &audit {
                say!(
                    "  {}  {:<12} {:<20} {:<18} {}",
                    format_time(a.at),
                    a.action,
                    a.actor,
                    a.outcome,
                    a.detail
                );
            }
            Ok(())
        }
        DeviceCommand::Revoke { id, reason } => {
            let registry = open_registry(&data, database).await?;
            let serials = admin::revoke(&registry, &id, reason, &actor(), now()).await?;
            registry.close().await;
            say!(
                "Revoked device {id} ({reason}); {} certificate(s) revoked{}.",
                serials.len(),
                list(&serials)
            );
            say!("Running gateways close its connections and publish a new CRL within a second.");
            Ok(())
        }
        DeviceCommand::Suspend { id } => {
            let registry = open_registry(&data, database).await?;
            let serials = admin::suspend(&registry, &id, &actor(), now()).await?;
            registry.close().await;
            say!(
                "Suspended device {id}; {} certificate(s) on hold{}. `idgate device resume {id}` undoes it.",
                serials.len(),
                list(&serials)
            );
            Ok(())
        }
        DeviceCommand::Resume { id } => {
            let registry = open_registry(&data, database).await?;
            let serials = admin::resume(&registry, &id, &actor(), now()).await?;
            registry.close().await;
            say!(
                "Resumed device {id}; {} certificate(s) released from hold{}.",
                serials.len(),
                list(&serials)
            );
            Ok(())
        }
    }
}

async fn batch(data: DataDir, database: Option<String>, command: BatchCommand) -> Result<()> {
    match command {
        BatchCommand::Import {
            file,
            owner,
            site,
            model,
            batch_id,
            out,
        } => {
            check_owner(&owner)?;
            check_label("site", &site)?;
            if let Some(model) = &model {
                check_label("model", model)?;
            }
            let batch_id = match batch_id {
                Some(id) => {
                    batch::check_batch_id(&id).map_err(anyhow::Error::msg)?;
                    id
                }
                None => batch::new_batch_id(now()),
            };
            if !data.has_ca() {
                bail!(
                    "no CA in {} (run `idgate ca init --data {}` or `idgate serve` first)",
                    data.root().display(),
                    data.root().display()
                );
            }
            let rows = read_batch_file(&file, &owner, &site, model.clone())?;
            let out = match out {
                Some(out) => out,
                None => default_tokens_path(&file)?,
            };
            let tokens = data.tokens()?;
            let registry = open_registry(&data, database).await?;
            let created_by = actor();
            let mut sealed = Vec::with_capacity(rows.len());
            let mut lines = String::from("id,token\n");
            for row in &rows {
                let new = tokens.generate(&row.id);
                lines.push_str(&format!("{},{}\n", row.id, new.token));
                sealed.push((
                    NewDevice {
                        id: row.id.clone(),
                        owner: row.owner.clone(),
                        site: row.site.clone(),
                        model: row.model.clone(),
                        label: row.label.clone(),
                        created_by: created_by.clone(),
                    },
                    new.sealed,
                ));
            }
            // The tokens reach the file before the devices are committed: if
            // the file cannot be written nothing is registered, and if the
            // import is refused the file is removed. The other order could
            // leave registered devices whose tokens nobody has.
            write_private(&out, lines.as_bytes())?;
            drop(lines);
            let bar = progress_bar(rows.len());
            let new_batch = NewBatch {
                id: batch_id.clone(),
                owner,
                site,
                model,
                created_by,
            };
            let report = |n: usize| bar.set_position(n as u64);
            let imported = registry
                .import_batch(&new_batch, &sealed, now(), &report)
                .await;
            bar.finish_and_clear();
            registry.close().await;
            if let Err(e) = imported {
                let _ = std::fs::remove_file(&out);
                return Err(match e {
                    BatchError::DeviceExists { index, id } => anyhow::anyhow!(
                        "{}: line {}: device id {id:?} is already registered; nothing was imported",
                        file.display(),
                        rows.get(index).map_or(0, |r| r.line)
                    ),
                    e => anyhow::Error::new(e).context("nothing was imported"),
                });
            }
            say!(
                "Imported batch {batch_id}: {} device(s) registered, status pending.",
                rows.len()
            );
            say!(
                "One-time tokens written to {} (mode 0600; give it to the programming station, then delete it).",
                out.display()
            );
            Ok(())
        }
        BatchCommand::List { json } => {
            let registry = open_registry(&data, database).await?;
            let batches = registry.batches().await?;
            registry.close().await;
            if json {
                say!("{}", serde_json::to_string_pretty(&batches)?);
                return Ok(());
            }
            say!(
                "{:<28} {:<20} {:>10} {:>8} {:>6} {:>7}  SITE",
                "BATCH",
                "CREATED",
                "REGISTERED",
                "ENROLLED",
                "FAILED",
                "PENDING"
            );
            for b in &batches {
                say!(
                    "{:<28} {:<20} {:>10} {:>8} {:>6} {:>7}  {}",
                    b.id,
                    format_time(b.created_at),
                    b.registered,
                    b.enrolled,
                    b.failed,
                    b.pending,
                    b.site
                );
            }
            say!("{} batch(es)", batches.len());
            Ok(())
        }
        BatchCommand::Show { id, json } => {
            let registry = open_registry(&data, database).await?;
            let Some(summary) = registry.batch(&id).await? else {
                bail!("no batch {id:?} (see `idgate batch list`)");
            };
            let pending = registry.batch_pending(&id).await?;
            registry.close().await;
            if json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "batch": summary,
                        "pending_devices": pending,
                    }))?
                );
                return Ok(());
            }
            print_batch(&summary, &pending);
            Ok(())
        }
    }
}

fn print_batch(b: &BatchSummary, pending: &[String]) {
    say!("Batch {}", b.id);
    say!("  owner       {}", b.owner);
    say!("  site        {}", b.site);
    say!("  model       {}", b.model.as_deref().unwrap_or("-"));
    say!(
        "  imported    {} by {}",
        format_time(b.created_at),
        b.created_by
    );
    say!("  registered  {}", b.registered);
    say!("  enrolled    {}", b.enrolled);
    say!(
        "  failed      {} (refused at least once, not enrolled yet)",
        b.failed
    );
    say!("  pending     {}", b.pending);
    if !pending.is_empty() {
        say!("Not enrolled yet ({})", pending.len());
        for id in pending {
            say!("  {id}");
        }
    }
}

fn read_batch_file(
    file: &std::path::Path,
    owner: &str,
    site: &str,
    model: Option<String>,
) -> Result<Vec<batch::BatchRow>> {
    use std::io::Read as _;
    let opened =
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    // Read one byte past the limit rather than trusting the file's size.
    let mut bytes = Vec::new();
    opened
        .take(batch::MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", file.display()))?;
    let defaults = batch::Defaults {
        owner: owner.to_owned(),
        site: site.to_owned(),
        model,
    };
    let rows = batch::parse(&bytes, &defaults)
        .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was imported", file.display()))?;
    Ok(rows)
}

fn default_tokens_path(file: &std::path::Path) -> Result<PathBuf> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{} has no usable file name; pass --out", file.display()))?;
    Ok(file.with_file_name(format!("{stem}.tokens.csv")))
}

/// Creates `path` readable by its owner only, refusing to overwrite.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating the token file {} (it must not exist yet; pass --out to choose another)",
                path.display()
            )
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A progress bar on stderr when it is a terminal; nothing otherwise (logs
/// and CI output stay clean).
fn progress_bar(len: usize) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) || len < 1000 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "registering {bar:40} {pos}/{len} devices ({eta} left)",
    ) {
        bar.set_style(style);
    }
    bar
}

async fn bench(command: BenchCommand) -> Result<()> {
    let (op, args) = match command {
        BenchCommand::Enroll(args) => (idgate_gateway::bench::Op::Enroll, args),
        BenchCommand::Renew(args) => (idgate_gateway::bench::Op::Renew, args),
        BenchCommand::Devices => {
            let stdin = tokio::io::BufReader::new(tokio::io::stdin());
            idgate_gateway::bench::serve_devices(stdin, tokio::io::stdout())
                .await
                .context("bench load-generator process")?;
            return Ok(());
        }
    };
    let options = idgate_gateway::bench::Options {
        op,
        devices: args.devices,
        concurrency: args.concurrency,
        pipeline: args.pipeline,
        rate: args.rate,
        keep: args.keep,
        keep_connected: args.keep_connected,
        devices_per_process: args.devices_per_process,
    };
    if options.keep_connected {
        let report =
            idgate_gateway::bench::run_connected(&options, &|line| eprintln!("{line}")).await?;
        say!("{report}");
        return Ok(());
    }
    let report = idgate_gateway::bench::run(&options, &|line| eprintln!("{line}")).await?;
    say!("{report}");
    Ok(())
}

fn list(serials: &[String]) -> String {
    if serials.is_empty() {
        String::new()
    } else {
        format!(": {}", serials.join(", "))
    }
}

fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
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

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: add a unit: s, m, h or d"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 24h"))?;
    let seconds = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

fn format_duration(duration: Duration) -> String {
    let s = duration.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("3w").is_err());
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
    }

    #[test]
    fn owners_must_look_like_email() {
        assert!(check_owner("facilities@example.com").is_ok());
        for bad in ["", "nobody", "a@", "@b", "a@b@c", "a b@c", "a@b\n"] {
            assert!(check_owner(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://idgate:s3cret@db:5432/idgate"),
            "postgres://idgate@db:5432/idgate"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
