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
    let output = Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args([
            "bench",
            "enroll",
            "--keep-connected",
            "--devices",
            "30",
            "--concurrency",
            "8",
        ])
        .output()
        .expect("run idgate bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    println!("{stdout}");
    assert!(
        stdout.contains("accepted              30 of 30"),
        "{stdout}"
    );
    // Every device was still connected when the figures were taken.
    assert!(
        stdout.contains("held                  30 connections"),
        "{stdout}"
    );
    for figure in ["CPU per device", "probe", "memory", "| N connected |"] {
        assert!(stdout.contains(figure), "no {figure} in {stdout}");
    }
}
