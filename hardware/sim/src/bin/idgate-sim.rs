//! `idgate-sim`: simulated devices on the command line. `enroll` runs one device's
//! first enrollment against a gateway and writes its key and certificates;
//! `renew` replaces them with a new key and certificate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use idgate_sim::files::{read_counter, write_counter};
use idgate_sim::{EnrollOptions, RenewOptions, SimError, enroll, renew};

#[derive(Debug, Parser)]
#[command(name = "idgate-sim", version, about = "Simulated idgate devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll one device and write DIR/key.pem, DIR/cert.pem and DIR/chain.pem.
    Enroll(EnrollArgs),
    /// Renew one device's certificate with a new key: reads DIR/key.pem,
    /// DIR/cert.pem, DIR/chain.pem and DIR/counter, and replaces them.
    Renew(RenewArgs),
    /// A blank device on a line station's fixture: connects to the station
    /// over TCP (standing in for the serial port), speaks the line link and
    /// enrolls with the real agent.
    Device(LineDeviceArgs),
}

#[derive(Debug, clap::Args)]
struct LineDeviceArgs {
    /// The station's fixture address (`idgate line --listen`), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: String,
    /// PEM file with the root CA certificate(s) the device pins.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// normal, garbage (answers noise) or silent (answers nothing).
    #[arg(long, default_value = "normal")]
    behave: String,
    /// Report `provisioned` with this id instead of `blank`, as a unit
    /// coming back would (or a rogue board claiming another unit's id,
    /// which the station refuses unless it gave this unit that id).
    #[arg(long, value_name = "ID")]
    claim: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Directory for the key and certificates, if wanted.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// What every command needs to reach the gateway as one device.
#[derive(Debug, clap::Args)]
struct DeviceArgs {
    /// Gateway MQTT front (TLS), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    broker: String,
    /// PEM file with the CA certificate(s) to trust for the gateway.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Device id, as registered at the gateway.
    #[arg(long, value_name = "ID")]
    id: String,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
}

impl DeviceArgs {
    fn ca_pem(&self) -> anyhow::Result<Vec<u8>> {
        std::fs::read(&self.ca).with_context(|| format!("reading CA file {}", self.ca.display()))
    }
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// One-time enrollment token (prefer the environment variable: arguments
    /// show in `ps`).
    #[arg(long, env = "IDGATE_TOKEN", hide_env_values = true, value_name = "T")]
    token: String,
    /// Directory for the key and certificates; created if needed.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct RenewArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// The device's directory, as `enroll --out` wrote it.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// Exit status for a refusal by the gateway, apart from other failures (1).
const EXIT_REJECTED: u8 = 2;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IDGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Enroll(args) => run_enroll(args).await,
        Command::Renew(args) => run_renew(args).await,
        Command::Device(args) => run_device(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(rejected @ SimError::Rejected { .. }) = e.downcast_ref::<SimError>() {
                eprintln!("{rejected}");
                return ExitCode::from(EXIT_REJECTED);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let ca_pem = args.device.ca_pem()?;
    let mut options = EnrollOptions::new(args.device.broker, ca_pem, args.device.id, args.token);
    options.timeout = Duration::from_secs(args.device.timeout);
    let enrolled = enroll(&options).await?;
    enrolled
        .write_files(&args.out)
        .with_context(|| format!("writing to {}", args.out.display()))?;
    println!("serial: {}", enrolled.serial);
    println!("not_before: {}", enrolled.not_before);
    println!("not_after: {}", enrolled.not_after);
    println!("wrote {}", args.out.display());
    Ok(())
}

async fn run_renew(args: RenewArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let ca_pem = args.device.ca_pem()?;
    let key_pem = String::from_utf8(read("key.pem")?).context("key.pem is not text")?;
    // The chain goes along in the TLS handshake; an enrolled device has one.
    let mut certificate_pem = read("cert.pem")?;
    if dir.join("chain.pem").exists() {
        certificate_pem.extend(read("chain.pem")?);
    }
    let counter = read_counter(dir)
        .with_context(|| format!("reading the counter in {}", dir.display()))?
        .checked_add(1)
        .context("the renewal counter is exhausted")?;
    // Stored before it is used: the counter must never go back, whether or not
    // this renewal succeeds (the gateway takes a repeated counter for a clone).
    write_counter(dir, counter)
        .with_context(|| format!("storing the counter in {}", dir.display()))?;

    let device = args.device;
    let mut options = RenewOptions::new(
        device.broker,
        ca_pem,
        device.id,
        key_pem,
        certificate_pem,
        counter,
    );
    options.timeout = Duration::from_secs(device.timeout);
    let renewed = renew(&options).await?;
    let certified = &renewed.certified;
    certified
        .write_files(dir)
        .with_context(|| format!("writing to {}", dir.display()))?;
    println!("serial: {}", certified.serial);
    println!("not_before: {}", certified.not_before);
    println!("not_after: {}", certified.not_after);
    println!("renewed: {}", renewed.previous_serial);
    println!("counter: {counter}");
    println!(
        "connected: {}",
        if renewed.client_certificate {
            "with the current certificate"
        } else {
            "anonymously (certificate expired)"
        }
    );
    println!("wrote {}", dir.display());
    Ok(())
}

async fn run_device(args: LineDeviceArgs) -> anyhow::Result<()> {
    let ca_pem = std::fs::read(&args.ca)
        .with_context(|| format!("reading CA file {}", args.ca.display()))?;
    let mut options = idgate_sim::LineDeviceOptions::new(ca_pem);
    options.timeout = Duration::from_secs(args.timeout);
    options.behaviour = match args.behave.as_str() {
        "normal" => idgate_sim::Behaviour::Normal,
        "garbage" => idgate_sim::Behaviour::Garbage,
        "silent" => idgate_sim::Behaviour::Silent,
        other => anyhow::bail!("--behave {other:?}: normal, garbage or silent"),
    };
    // The device does not know the token: it waits for the station's.
    options.provisioned = args.claim.map(|id| (id, String::new()));
    let line = tokio::net::TcpStream::connect(&args.tcp)
        .await
        .with_context(|| format!("connecting to the station at {}", args.tcp))?;
    let enrolled = idgate_sim::run_line_device(line, &options).await?;
    if let Some(out) = &args.out {
        enrolled
            .write_files(out)
            .with_context(|| format!("writing to {}", out.display()))?;
    }
    println!("serial: {}", enrolled.serial);
    println!("not_after: {}", enrolled.not_after);
    Ok(())
}
