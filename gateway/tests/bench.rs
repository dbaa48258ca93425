//! Smoke test of `idgate bench`: a small run of each benchmark completes and
//! prints its figures. The figures themselves are not asserted (CI machines
//! vary); docs/performance.md has the measured ones.

use std::process::Command;

fn bench(op: &str, devices: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["bench", op, "--devices", devices, "--concurrency", "8"])
        .output()
        .expect("run idgate bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench {op} failed: {stderr}");
    println!("{stdout}");
    assert!(
        stdout.contains(&format!("accepted              {devices} of {devices}")),
        "{stdout}"
    );
    for figure in [
        "throughput",
        "p99",
        "CPU per request",
        "peak memory",
        "crypto ceiling",
        "ratio",
    ] {
        assert!(stdout.contains(figure), "no {figure} in {stdout}");
    }
}

#[test]
fn bench_enroll_small() {
    bench("enroll", "50");
}

#[test]
fn bench_renew_small() {
    bench("renew", "20");
}

#[test]
fn bench_enroll_keep_connected_small() {
    // 30 devices over two load-generator processes of 15: the parent
    // splits the fleet, and merges what both children measured.
    let output = Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args([
            "bench",
            "enroll",
            "--keep-connected",
            "--devices",
            "30",
            "--concurrency",
            "8",
            "--devices-per-process",
            "20",
        ])
        .output()
        .expect("run idgate bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    println!("{stdout}");
    assert!(
        stdout.contains("30 devices, one MQTT/TLS connection each, 8 connecting at once, 2 load-generator processes"),
        "{stdout}"
    );
    assert!(
        stdout.contains("accepted              30 of 30"),
        "{stdout}"
    );
    // Every device was still connected when the figures were taken.
    assert!(
        stdout.contains("held                  30 connections"),
        "{stdout}"
    );
    for figure in [
        "CPU per device",
        "    gateway             ",
        "    load generator      ",
        "probe",
        "memory",
        "| N connected |",
    ] {
        assert!(stdout.contains(figure), "no {figure} in {stdout}");
    }
    // The accepted figure above is the children's (the parent sums their
    // reports). The gateway's own open files per device are measured: at
    // least its accepted socket, at most that and both ends of a link to
    // rumqttd.
    let per_device: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("  held "))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no open files per device in {stdout}"));
    assert!(
        (1.0..3.5).contains(&per_device),
        "{per_device} open files per device in the gateway: {stdout}"
    );
}

/// The hidden load-generator subcommand stays out of the help.
#[test]
fn bench_devices_is_hidden() {
    let output = Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["bench", "--help"])
        .output()
        .expect("run idgate bench --help");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let commands: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"enroll"), "{stdout}");
    assert!(!commands.contains(&"devices"), "{stdout}");
}
