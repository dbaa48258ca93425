//! The web console's answers to bad input, over real HTTPS to a running
//! gateway's admin listener: not logged in, expired sessions, unknown ids,
//! bad parameters, posts without the CSRF token or the reason, a viewer
//! revoking, revoking twice, markup in queries; and the security headers.
//! Editing a device's owner, site and label through the console's form.

use std::sync::Arc;

use idgate_gateway::api::auth::{Role, hash_password};
use idgate_gateway::registry::{Account, DeviceStatus, now};
use idgate_gateway::testing::TestDatabase;
use idgate_tests::Harness;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

crate::on_both_backends!(
    console_refuses_bad_input,
    console_edits_owner_site_and_label
);

/// One HTTP/1.1 answer.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A browser-like client of the admin listener: HTTPS trusting the gateway's
/// root, one request per connection.
struct Client {
    address: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    fn new(h: &Harness) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(h.root_ca()).unwrap();
        for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Client {
            address: h.gateway.admin_address(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        form: Option<&str>,
    ) -> Answer {
        let tcp = tokio::net::TcpStream::connect(self.address).await.unwrap();
        let name = ServerName::IpAddress(self.address.ip().into());
        let mut tls = self.tls.connect(name, tcp).await.unwrap();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        if let Some(cookie) = cookie {
            request.push_str(&format!("Cookie: {cookie}\r\n"));
        }
        let body = form.unwrap_or("");
        if form.is_some() {
            request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        // The server closes after its answer (Connection: close); a TLS
        // close_notify may or may not come first.
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Answer {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Answer {
        self.send("GET", path, cookie, None).await
    }

    async fn post(&self, path: &str, cookie: &str, form: &str) -> Answer {
        self.send("POST", path, Some(cookie), Some(form)).await
    }

    /// Logs in through the console's form; the session cookie and the CSRF token.
    async fn log_in(&self, name: &str, password: &str) -> (String, String) {
        let answer = self
            .send(
                "POST",
                "/login",
                None,
                Some(&format!("username={name}&password={password}&next=%2F")),
            )
            .await;
        assert_eq!(answer.status, 303, "{}", answer.body);
        let cookie = answer
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .expect("a session cookie")
            .to_owned();
        let page = self.get("/", Some(&cookie)).await;
        assert_eq!(page.status, 200);
        let csrf = page
            .body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the logout form carries the CSRF token")
            .to_owned();
        (cookie, csrf)
    }
}

/// Adds the operator `olga` and the viewer `vera`, password
/// "correct horse battery".
async fn add_staff(h: &Harness) {
    for (name, role) in [("olga", Role::Operator), ("vera", Role::Viewer)] {
        h.registry()
            .add_account(
                &Account {
                    name: name.into(),
                    role,
                    password_hash: hash_password("correct horse battery").unwrap(),
                    created_by: "test".into(),
                    created_at: now(),
                    disabled_at: None,
                },
                "test",
            )
            .await
            .unwrap();
    }
}

async fn console_refuses_bad_input(db: TestDatabase) {
    let Some(h) = Harness::start(db).await else {
        return;
    };
    add_staff(&h).await;
    h.add_device("th-1", "berlin").await;
    let client = Client::new(&h);

    // Not logged in: every page sends the browser to the login form, which
    // comes back to the page.
    let answer = client.get("/devices?q=x", None).await;
    assert_eq!(answer.status, 303);
    assert_eq!(
        answer.header("location"),
        Some("/login?next=%2Fdevices%3Fq%3Dx")
    );
    let login = client.get("/login?next=%2Fdevices", None).await;
    assert_eq!(login.status, 200);
    assert!(login.body.contains("name=\"next\" value=\"/devices\""));
    // `next` is only ever a local path.
    let login = client
        .get("/login?next=https%3A%2F%2Fevil.example", None)
        .await;
    assert!(login.body.contains("name=\"next\" value=\"/\""));
    // A session that ended: the login page says so.
    let answer = client
        .get("/devices", Some("__Host-idgate-session=forgotten"))
        .await;
    assert_eq!(answer.status, 303);
    assert!(
        answer
            .header("location")
            .unwrap()
            .contains("error=session_expired"),
        "{:?}",
        answer.header("location")
    );

    let (cookie, csrf) = client.log_in("olga", "correct%20horse%20battery").await;
    let cookie = cookie.as_str();

    // Security headers on every page.
    let page = client.get("/devices", Some(cookie)).await;
    assert_eq!(page.status, 200);
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("frame-ancestors 'none'"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );

    // Unknown ids and bad parameters: a page that says what is wrong.
    let answer = client.get("/devices/no-such-device", Some(cookie)).await;
    assert_eq!(answer.status, 404);
    assert!(
        answer
            .body
            .contains("No device “no-such-device” is registered")
    );
    let answer = client.get("/batches/nope", Some(cookie)).await;
    assert_eq!(answer.status, 404);
    let answer = client.get("/devices?status=lost", Some(cookie)).await;
    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("unknown status"), "{}", answer.body);
    let answer = client.get("/devices?page=-1", Some(cookie)).await;
    assert_eq!(answer.status, 400);
    let answer = client
        .get("/devices?page=99999999999999999999", Some(cookie))
        .await;
    assert_eq!(answer.status, 400);
    let answer = client.get("/?not_seen_days=0", Some(cookie)).await;
    assert_eq!(answer.status, 400);
    let answer = client.get("/devices?view=sideways", Some(cookie)).await;
    assert_eq!(answer.status, 400);
    let long = "x".repeat(201);
    let answer = client
        .get(&format!("/devices?q={long}"), Some(cookie))
        .await;
    assert_eq!(answer.status, 400);
    // A page far past the end is empty, not an error.
    let answer = client.get("/devices?page=1000", Some(cookie)).await;
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("No device matches."));

    // Markup in a query is text.
    let answer = client
        .get(
            "/devices?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
            Some(cookie),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert!(!answer.body.contains("<script>alert(1)"));
    assert!(
        answer
            .body
            .contains("&lt;script&gt;alert(1)&lt;/script&gt;")
    );
    let answer = client
        .get("/audit?q=%3Cimg%20src%3Dx%3E&before=%3Cb%3E", Some(cookie))
        .await;
    assert_eq!(answer.status, 200);
    assert!(!answer.body.contains("<img src=x>"));

    // Posts without the CSRF token are refused before anything happens.
    let answer = client
        .post("/devices/th-1/revoke", cookie, "reason=lost")
        .await;
    assert_eq!(answer.status, 403);
    let answer = client
        .post("/devices/th-1/revoke", cookie, "csrf=wrong&reason=lost")
        .await;
    assert_eq!(answer.status, 403);
    // Without a reason, or with one that is not: the form again, saying so.
    let answer = client
        .post("/devices/th-1/revoke", cookie, &format!("csrf={csrf}"))
        .await;
    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("Choose why the device is revoked."));
    let answer = client
        .post(
            "/devices/th-1/revoke",
            cookie,
            &format!("csrf={csrf}&reason=misplaced"),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("unknown reason"));
    // Unknown device.
    let answer = client
        .post(
            "/devices/ghost/revoke",
            cookie,
            &format!("csrf={csrf}&reason=lost"),
        )
        .await;
    assert_eq!(answer.status, 404);
    // Resuming an active device does not apply.
    let answer = client
        .post("/devices/th-1/resume", cookie, &format!("csrf={csrf}"))
        .await;
    assert_eq!(answer.status, 409);
    assert!(answer.body.contains("it is pending"), "{}", answer.body);
    assert_eq!(
        h.registry().device("th-1").await.unwrap().unwrap().status,
        DeviceStatus::Pending
    );

    // A viewer reads but cannot act, even with its own CSRF token.
    let (viewer, viewer_csrf) = client.log_in("vera", "correct%20horse%20battery").await;
    let page = client.get("/devices/th-1", Some(&viewer)).await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("/devices/th-1/revoke"));
    let answer = client.get("/devices/th-1/revoke", Some(&viewer)).await;
    assert_eq!(answer.status, 403);
    let answer = client
        .post(
            "/devices/th-1/revoke",
            &viewer,
            &format!("csrf={viewer_csrf}&reason=lost"),
        )
        .await;
    assert_eq!(answer.status, 403);
    assert!(
        answer
            .body
            .contains("Your role (viewer) cannot revoke devices")
    );
    assert_eq!(
        h.registry().device("th-1").await.unwrap().unwrap().status,
        DeviceStatus::Pending
    );

    // The operator revokes; a second revoke does not apply.
    let answer = client
        .post(
            "/devices/th-1/revoke",
            cookie,
            &format!("csrf={csrf}&reason=retired"),
        )
        .await;
    assert_eq!(answer.status, 303);
    assert_eq!(
        answer.header("location"),
        Some("/devices/th-1?done=revoked")
    );
    let device = h.registry().device("th-1").await.unwrap().unwrap();
    assert_eq!(device.status, DeviceStatus::Retired);
    let answer = client
        .post(
            "/devices/th-1/revoke",
            cookie,
            &format!("csrf={csrf}&reason=lost"),
        )
        .await;
    assert_eq!(answer.status, 409);
    let trail = h.registry().audit_trail("th-1").await.unwrap();
    let revoke = trail.iter().find(|e| e.action == "device.revoke").unwrap();
    assert_eq!(revoke.actor, "user:olga");
}

async fn console_edits_owner_site_and_label(db: TestDatabase) {
    let Some(h) = Harness::start(db).await else {
        return;
    };
    add_staff(&h).await;
    h.add_device("th-1", "berlin").await;
    let client = Client::new(&h);
    let (cookie, csrf) = client.log_in("olga", "correct%20horse%20battery").await;
    let cookie = cookie.as_str();
    let stored = || async { h.registry().device("th-1").await.unwrap().unwrap() };
    let original = stored().await;

    // The operator's device page links to the form, which shows the values
    // and a label for every field.
    let page = client.get("/devices/th-1", Some(cookie)).await;
    assert!(page.body.contains("href=\"/devices/th-1/edit\""));
    let form = client.get("/devices/th-1/edit", Some(cookie)).await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("value=\"facilities@example.com\""));
    assert!(form.body.contains("value=\"berlin\""));
    assert!(
        form.body
            .contains(&format!("name=\"csrf\" value=\"{csrf}\""))
    );
    for field in ["owner", "site", "label"] {
        assert!(form.body.contains(&format!("<label for=\"{field}\">")));
    }
    assert_eq!(
        client.get("/devices/ghost/edit", Some(cookie)).await.status,
        404
    );

    // Without the CSRF token: refused, nothing changed.
    let answer = client
        .post(
            "/devices/th-1/edit",
            cookie,
            "owner=x%40y.io&site=paris&label=",
        )
        .await;
    assert_eq!(answer.status, 403);
    // A bad owner: the form again with what was typed and why, nothing changed.
    let answer = client
        .post(
            "/devices/th-1/edit",
            cookie,
            &format!("csrf={csrf}&owner=not-an-email&site=paris&label=Room+4"),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("owner must be an email address"),
        "{}",
        answer.body
    );
    assert!(answer.body.contains("value=\"not-an-email\""));
    assert!(answer.body.contains("value=\"paris\""));
    // A control character in the site, and a site too long: the API's rules.
    let answer = client
        .post(
            "/devices/th-1/edit",
            cookie,
            &format!("csrf={csrf}&owner=a%40x.io&site=pa%07ris&label="),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains("site must be 1–128 printable characters")
    );
    let long = "x".repeat(129);
    let answer = client
        .post(
            "/devices/th-1/edit",
            cookie,
            &format!("csrf={csrf}&owner=a%40x.io&site=paris&label={long}"),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains("label must be 1–128 printable characters")
    );
    assert_eq!(stored().await, original);
    // Unknown device.
    let answer = client
        .post(
            "/devices/ghost/edit",
            cookie,
            &format!("csrf={csrf}&owner=a%40x.io&site=paris&label="),
        )
        .await;
    assert_eq!(answer.status, 404);

    // A viewer sees no edit link and is refused, even with its CSRF token.
    let (viewer, viewer_csrf) = client.log_in("vera", "correct%20horse%20battery").await;
    let page = client.get("/devices/th-1", Some(&viewer)).await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("/devices/th-1/edit"));
    assert_eq!(
        client.get("/devices/th-1/edit", Some(&viewer)).await.status,
        403
    );
    let answer = client
        .post(
            "/devices/th-1/edit",
            &viewer,
            &format!("csrf={viewer_csrf}&owner=v%40x.io&site=paris&label="),
        )
        .await;
    assert_eq!(answer.status, 403);
    assert!(
        answer
            .body
            .contains("Your role (viewer) cannot edit devices")
    );
    assert_eq!(stored().await, original);

    // The operator's edit: values change, the audit trail names the account,
    // and markup in the site is text on the device page.
    let answer = client
        .post(
            "/devices/th-1/edit",
            cookie,
            &format!(
                "csrf={csrf}&owner=+ops%40example.com+&site=%3Cscript%3Ealert(1)%3C%2Fscript%3E&label=Room+4"
            ),
        )
        .await;
    assert_eq!(answer.status, 303, "{}", answer.body);
    assert_eq!(answer.header("location"), Some("/devices/th-1?done=edited"));
    let device = stored().await;
    assert_eq!(
        (
            device.owner.as_str(),
            device.site.as_str(),
            device.label.as_deref()
        ),
        (
            "ops@example.com",
            "<script>alert(1)</script>",
            Some("Room 4")
        )
    );
    let trail = h.registry().audit_trail("th-1").await.unwrap();
    let updates: Vec<_> = trail
        .iter()
        .filter(|e| e.action == "device.update")
        .collect();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].actor, "user:olga");
    assert_eq!(
        updates[0].detail,
        "owner: facilities@example.com -> ops@example.com; \
         site: berlin -> <script>alert(1)</script>; label: - -> Room 4"
    );
    let page = client.get("/devices/th-1?done=edited", Some(cookie)).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Changes to device th-1 saved."));
    assert!(!page.body.contains("<script>alert(1)"));
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let form = client.get("/devices/th-1/edit", Some(cookie)).await;
    assert!(!form.body.contains("<script>alert(1)"));
    assert!(
        form.body
            .contains("value=\"&lt;script&gt;alert(1)&lt;/script&gt;\"")
    );

    // Saving the same values again writes nothing; an empty label removes it.
    let same = format!(
        "csrf={csrf}&owner=ops%40example.com&site=%3Cscript%3Ealert(1)%3C%2Fscript%3E&label=Room+4"
    );
    let answer = client.post("/devices/th-1/edit", cookie, &same).await;
    assert_eq!(
        answer.header("location"),
        Some("/devices/th-1?done=unchanged")
    );
    let answer = client
        .post(
            "/devices/th-1/edit",
            cookie,
            &format!("csrf={csrf}&owner=ops%40example.com&site=hall+B&label="),
        )
        .await;
    assert_eq!(answer.status, 303);
    let device = stored().await;
    assert_eq!((device.site.as_str(), device.label), ("hall B", None));
    let updates = h
        .registry()
        .audit_trail("th-1")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "device.update")
        .count();
    assert_eq!(updates, 2);
}
