//! `idgate-sim`: simulated devices on the command line. `enroll` runs one device's
//! first enrollment against a gateway and writes its key and certificates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use idgate_sim::{EnrollOptions, SimError, enroll};

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
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// Gateway MQTT front (TLS), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    broker: String,
    /// PEM file with the CA certificate(s) to trust for the gateway.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Device id, as registered at the gateway.
    #[arg(long, value_name = "ID")]
    id: String,
    /// One-time enrollment token (prefer the environment variable: arguments
    /// show in `ps`).
    #[arg(long, env = "IDGATE_TOKEN", hide_env_values = true, value_name = "T")]
    token: String,
    /// Directory for the key and certificates; created if needed.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
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
    let ca_pem = std::fs::read(&args.ca)
        .with_context(|| format!("reading CA file {}", args.ca.display()))?;
    let mut options = EnrollOptions::new(args.broker, ca_pem, args.id, args.token);
    options.timeout = Duration::from_secs(args.timeout);
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
