//! The web console in a real browser: a gateway with its admin listener, an
//! operator and a viewer account, a batch of devices (two enrolled over MQTT,
//! one with markup in its owner and site), then `node
//! tests/browser/console.mjs` drives Debian's Chromium through the console
//! (log in, search a site, open a device, revoke it for "lost", see it
//! revoked; a viewer sees no revoke button and is refused; markup shows as
//! text). Afterwards the revoked device's next renewal over MQTT is refused.
//!
//! Needs node, Chromium and `npm ci` in tests/browser (`.ci/run` installs
//! them); without them the test fails saying what is missing. Screenshots go
//! to `target/console-screenshots/` (or `$IDGATE_SCREENSHOTS`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use idgate_gateway::api::auth::{Role, hash_password};
use idgate_gateway::registry::{Account, DeviceStatus, NewBatch, NewDevice, now};
use idgate_gateway::testing::TestDatabase;
use idgate_pki::ca::to_pem;
use idgate_sim::{EnrollOptions, RenewOptions, SimError, enroll, renew};
use idgate_tests::Harness;

const SITE: &str = "Building 7 / Floor 2";
const OPERATOR: (&str, &str) = ("olga", "operator-password-1");
const VIEWER: (&str, &str) = ("vera", "viewer-password-1");
const XSS_OWNER: &str = "\"><script>alert('owner')</script>@evil.example";
const XSS_SITE: &str = "<img src=x onerror=alert('site')>";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// Node, Chromium and playwright-core, or a panic saying how to get them.
fn browser_tools() -> (PathBuf, PathBuf) {
    let root = workspace();
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the console browser test needs Node.js (`node`): install it (apt-get install nodejs npm), \
         or run .ci/run, which does"
    );
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(
        chromium.exists(),
        "the console browser test needs Chromium at {} (apt-get install chromium, or set CHROMIUM); \
         .ci/run installs it",
        chromium.display()
    );
    let browser = root.join("tests/browser");
    assert!(
        browser
            .join("node_modules/playwright-core/package.json")
            .exists(),
        "the console browser test needs playwright-core: run `npm ci --prefix {}` (.ci/run does)",
        browser.display()
    );
    (browser.join("console.mjs"), chromium)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser() {
    let (script, chromium) = browser_tools();
    let h = Harness::start(TestDatabase::Sqlite)
        .await
        .expect("SQLite is always there");
    let registry = h.registry();
    let at = now();
    for ((name, password), role) in [(OPERATOR, Role::Operator), (VIEWER, Role::Viewer)] {
        registry
            .add_account(
                &Account {
                    name: name.into(),
                    role,
                    password_hash: hash_password(password).unwrap(),
                    created_by: "test".into(),
                    created_at: at,
                    disabled_at: None,
                },
                "test",
            )
            .await
            .unwrap();
    }

    // A batch from the line: two sensors at the site (labels on their cases)
    // and one whose owner and site hold markup.
    let tokens = h.data.tokens().unwrap();
    let batch = "b-console-1";
    let rows = [
        ("th-0101", "x@facilities.example", SITE, Some("B7-F2-014")),
        ("th-0102", "x@facilities.example", SITE, Some("B7-F2-015")),
        ("xss-1", XSS_OWNER, XSS_SITE, Some("<b>label</b>")),
    ];
    let mut devices = Vec::new();
    let mut issued = Vec::new();
    for (id, owner, site, label) in rows {
        let new = tokens.generate(id);
        issued.push((id, new.token));
        devices.push((
            NewDevice {
                id: id.into(),
                owner: owner.into(),
                site: site.into(),
                model: Some("TH-2".into()),
                label: label.map(Into::into),
                created_by: "test".into(),
            },
            new.sealed,
        ));
    }
    registry
        .import_batch(
            &NewBatch {
                id: batch.into(),
                owner: "x@facilities.example".into(),
                site: SITE.into(),
                model: Some("TH-2".into()),
                created_by: "test".into(),
            },
            &devices,
            at,
            &|_| {},
        )
        .await
        .unwrap();
    let root = std::fs::read(h.root_ca()).unwrap();
    let mut enrolled = Vec::new();
    for (id, token) in &issued[..2] {
        let options = EnrollOptions::new(h.broker(), root.clone(), *id, token.clone());
        enrolled.push(enroll(&options).await.unwrap());
    }

    let screenshots = std::env::var("IDGATE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target/console-screenshots"));
    let url = format!("https://127.0.0.1:{}", h.gateway.admin_address().port());
    let environment = [
        ("IDGATE_CONSOLE_URL", url),
        ("IDGATE_OPERATOR", OPERATOR.0.into()),
        ("IDGATE_OPERATOR_PASSWORD", OPERATOR.1.into()),
        ("IDGATE_VIEWER", VIEWER.0.into()),
        ("IDGATE_VIEWER_PASSWORD", VIEWER.1.into()),
        ("IDGATE_SITE", "building 7".into()),
        ("IDGATE_DEVICE", "th-0101".into()),
        ("IDGATE_DEVICE_LABEL", "B7-F2-014".into()),
        ("IDGATE_OTHER_DEVICE", "th-0102".into()),
        ("IDGATE_XSS_DEVICE", "xss-1".into()),
        ("IDGATE_XSS_OWNER", XSS_OWNER.into()),
        ("IDGATE_BATCH", batch.into()),
        ("IDGATE_SCREENSHOTS", screenshots.display().to_string()),
        ("CHROMIUM", chromium.display().to_string()),
    ];
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .current_dir(workspace())
            .envs(environment)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all steps passed"), "{stdout}");
    println!("screenshots in {}", screenshots.display());

    // What the browser did is in the registry, by the operator's name.
    let revoked = registry.device("th-0101").await.unwrap().unwrap();
    assert_eq!(revoked.status, DeviceStatus::Revoked);
    let trail = registry.audit_trail("th-0101").await.unwrap();
    let entry = trail.iter().find(|e| e.action == "device.revoke").unwrap();
    assert_eq!(entry.actor, "user:olga");
    assert!(entry.detail.contains("reason=lost"), "{}", entry.detail);
    // The viewer changed nothing.
    let untouched = registry.device("th-0102").await.unwrap().unwrap();
    assert_eq!(untouched.status, DeviceStatus::Active);

    // The revoked device's next renewal is refused.
    let target = registry.revocation_epoch().await.unwrap();
    let mut applied = h.gateway.revocation();
    tokio::time::timeout(
        Duration::from_secs(10),
        applied.wait_for(|s| s.epoch >= target),
    )
    .await
    .expect("the gateway applies the revocation within seconds")
    .expect("gateway running");
    let device = &enrolled[0];
    let mut options = RenewOptions::new(
        h.broker(),
        root.clone(),
        "th-0101",
        device.key_pem.as_str(),
        to_pem(&[device.certificate.as_slice()]).into_bytes(),
        1,
    );
    options.timeout = Duration::from_secs(30);
    match renew(&options).await {
        Err(SimError::Rejected { code, .. }) => assert_eq!(code, "device_revoked"),
        Err(SimError::Connection(e)) => assert!(
            e.to_string().contains("CertificateRevoked"),
            "expected the TLS handshake to refuse the revoked certificate, got {e}"
        ),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(renewed) => panic!(
            "a device revoked in the console renewed: {}",
            renewed.serial
        ),
    }
    // The other device still renews.
    let device = &enrolled[1];
    let mut options = RenewOptions::new(
        h.broker(),
        root,
        "th-0102",
        device.key_pem.as_str(),
        to_pem(&[device.certificate.as_slice()]).into_bytes(),
        1,
    );
    options.timeout = Duration::from_secs(30);
    renew(&options).await.expect("an untouched device renews");
    let renewed = registry.device("th-0102").await.unwrap().unwrap();
    assert!(renewed.last_seen_at.is_some_and(|seen| seen >= at));
}
