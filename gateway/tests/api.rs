//! The admin API as staff and scripts use it: over real HTTPS (the gateway's
//! own listener and certificate, checked against its root), accounts made
//! with `idgate user add`, tokens with `idgate token create`.

use std::path::Path;
use std::process::{Command, Stdio};

use idgate_gateway::datadir::DataDir;
use idgate_gateway::gateway::{Gateway, Settings};
use idgate_gateway::registry::{NewSession, now};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER, SET_COOKIE};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A gateway with its admin listener on 127.0.0.1:0.
struct Admin {
    gateway: Gateway,
    data: DataDir,
    base: String,
    _dir: tempfile::TempDir,
}

impl Admin {
    async fn start() -> Admin {
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = DataDir::new(dir.path().join("data"));
        let mut settings = Settings::new(data.clone());
        settings.mqtt_listen = "127.0.0.1:0".parse().expect("address");
        settings.http_listen = "127.0.0.1:0".parse().expect("address");
        settings.admin.listen = "127.0.0.1:0".parse().expect("address");
        let gateway = Gateway::start(settings).await.expect("gateway starts");
        let base = format!("https://127.0.0.1:{}", gateway.admin_address().port());
        Admin {
            gateway,
            data,
            base,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A client that trusts only the gateway's root, keeps cookies and does
    /// not follow redirects.
    fn client(&self) -> reqwest::Client {
        let root = std::fs::read(self.data.root_certificate()).expect("root certificate");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&root).expect("root PEM"))
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client")
    }

    fn idgate(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_idgate"));
        command
            .arg("--data")
            .arg(self.data.root())
            .env_remove("IDGATE_DATABASE");
        command
    }

    /// `idgate user add NAME --role ROLE` with the password on stdin.
    fn add_user(&self, name: &str, role: &str, password: &str) {
        let output = run_with_stdin(
            self.idgate().args(["user", "add", name, "--role", role]),
            &format!("{password}\n"),
        );
        assert!(
            output.status.success(),
            "user add failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `idgate token create`; returns the token it printed.
    fn create_token(&self, name: &str, role: &str) -> String {
        let output = self
            .idgate()
            .args(["token", "create", "--name", name, "--role", role])
            .output()
            .expect("run idgate");
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).expect("UTF-8");
        stdout
            .lines()
            .find(|l| l.starts_with("idgate_"))
            .unwrap_or_else(|| panic!("no token printed: {stdout}"))
            .to_owned()
    }

    /// Logs in over the JSON API; returns the client and its CSRF token.
    async fn log_in(&self, name: &str, password: &str) -> (reqwest::Client, String) {
        let client = self.client();
        let response = client
            .post(self.url("/api/v1/login"))
            .json(&json!({ "username": name, "password": password }))
            .send()
            .await
            .expect("login request");
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("JSON");
        let csrf = body["csrf_token"].as_str().expect("csrf_token").to_owned();
        (client, csrf)
    }
}

fn run_with_stdin(command: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run idgate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("idgate finishes")
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON error body");
    let code = body["code"].as_str().expect("code").to_owned();
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    (status, code)
}

fn session_cookie(headers: &HeaderMap) -> String {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("__Host-idgate-session="))
        .expect("session cookie set")
        .to_owned()
}

const PASSWORD: &str = "correct horse battery staple";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_logout_and_csrf() {
    let admin = Admin::start().await;
    admin.add_user("alice", "admin", PASSWORD);
    let anonymous = admin.client();

    let response = anonymous.get(admin.url("/api/v1/me")).send().await.unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    let wrong = anonymous
        .post(admin.url("/api/v1/login"))
        .json(&json!({ "username": "alice", "password": "not the password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(wrong).await,
        (StatusCode::UNAUTHORIZED, "invalid_credentials".into())
    );
    let unknown = anonymous
        .post(admin.url("/api/v1/login"))
        .json(&json!({ "username": "mallory", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(unknown).await,
        (StatusCode::UNAUTHORIZED, "invalid_credentials".into())
    );

    let client = admin.client();
    let response = client
        .post(admin.url("/api/v1/login"))
        .json(&json!({ "username": "alice", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = session_cookie(response.headers());
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(!cookie.contains("Domain"), "{cookie}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["role"], "admin");
    let csrf = body["csrf_token"].as_str().unwrap().to_owned();

    let me: Value = client
        .get(admin.url("/api/v1/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&me["name"], &me["role"], &me["via"]),
        (&json!("alice"), &json!("admin"), &json!("session"))
    );

    // A cookie-authenticated change without the CSRF token, or with another.
    let response = client
        .post(admin.url("/api/v1/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::FORBIDDEN, "csrf".into())
    );
    let response = client
        .post(admin.url("/api/v1/logout"))
        .header("X-CSRF-Token", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = client
        .post(admin.url("/logout"))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Still logged in.
    let response = client.get(admin.url("/api/v1/me")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let response = client
        .post(admin.url("/api/v1/logout"))
        .header("X-CSRF-Token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = client.get(admin.url("/api/v1/me")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // The browser flow: the form posts, 303s, the CSRF field in a form.
    let browser = admin.client();
    let response = browser
        .post(admin.url("/login"))
        .form(&[
            ("username", "alice"),
            ("password", "wrong password"),
            ("next", "/devices/x"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()[LOCATION],
        "/login?error=invalid_credentials&next=/devices/x"
    );
    let response = browser
        .post(admin.url("/login"))
        .form(&[
            ("username", "alice"),
            ("password", PASSWORD),
            ("next", "https://evil.example/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/");
    session_cookie(response.headers());
    let me: Value = browser
        .get(admin.url("/api/v1/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let csrf = me["csrf_token"].as_str().unwrap().to_owned();
    let response = browser
        .post(admin.url("/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/login");
    let response = browser.get(admin.url("/api/v1/me")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // A login posted from another site's page is refused.
    let response = admin
        .client()
        .post(admin.url("/api/v1/login"))
        .header("Origin", "https://evil.example")
        .json(&json!({ "username": "alice", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::FORBIDDEN, "csrf".into())
    );
    admin.gateway.shutdown().await;
}

/// Where a login sends the browser next: only a path on this site, whatever
/// a browser would make of the rest (tabs dropped, `\\` read as `/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_redirects_stay_on_this_site() {
    let admin = Admin::start().await;
    admin.add_user("alice", "viewer", PASSWORD);
    let offsite = [
        "/\t/evil.example",
        "/%09/evil.example",
        "/\\evil.example",
        "//evil.example",
        "/%2F/evil.example",
        "/%5C%5Cevil.example",
        "https://evil.example/",
    ];
    let browser = admin.client();
    for next in offsite {
        let response = browser
            .post(admin.url("/login"))
            .form(&[
                ("username", "alice"),
                ("password", PASSWORD),
                ("next", next),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(response.headers()[LOCATION], "/", "{next:?}");
    }
    // Already logged in, `GET /login?next=` redirects at once: same rule.
    for next in offsite {
        let response = browser
            .get(admin.url("/login"))
            .query(&[("next", next)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(response.headers()[LOCATION], "/", "{next:?}");
    }
    let response = browser
        .get(admin.url("/login"))
        .query(&[("next", "/devices?q=hall+b")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()[LOCATION], "/devices?q=hall+b");
    admin.gateway.shutdown().await;
}

/// Every free-text filter, in the API and the console, is capped at 200
/// characters with a clear 400 rather than searched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_filters_are_refused() {
    let admin = Admin::start().await;
    admin.add_user("alice", "viewer", PASSWORD);
    let (client, _) = admin.log_in("alice", PASSWORD).await;
    let fits = "a".repeat(200);
    let long = "é".repeat(201);
    for (path, names) in [
        (
            "/api/v1/devices",
            &["q", "site", "owner", "model", "batch", "after", "status"][..],
        ),
        ("/api/v1/audit", &["q", "before"][..]),
    ] {
        for name in names {
            let response = client
                .get(admin.url(path))
                .query(&[(*name, long.as_str())])
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                (status, body["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("invalid_request")),
                "{path} {name}"
            );
            let message = body["message"].as_str().unwrap();
            assert!(
                message.contains(name) && message.contains("200"),
                "{message}"
            );
        }
        let response = client
            .get(admin.url(path))
            .query(&[("q", fits.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    for (path, name) in [("/devices", "q"), ("/audit", "q"), ("/audit", "before")] {
        let response = client
            .get(admin.url(path))
            .query(&[(name, long.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path} {name}");
        let page = response.text().await.unwrap();
        assert!(page.contains("at most 200 characters"), "{page}");
    }
    for path in ["/devices", "/audit"] {
        let response = client
            .get(admin.url(path))
            .query(&[("q", fits.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens() {
    let admin = Admin::start().await;
    let token = admin.create_token("station-3", "operator");
    let client = admin.client();
    let me: Value = client
        .get(admin.url("/api/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&me["name"], &me["role"], &me["via"]),
        (&json!("station-3"), &json!("operator"), &json!("token"))
    );
    // No CSRF token needed: a bearer token is never sent by a browser on its own.
    let response = client
        .post(admin.url("/api/v1/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    for bad in ["idgate_not-a-real-token", &format!("{token}x")] {
        let response = client
            .get(admin.url("/api/v1/me"))
            .bearer_auth(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(response).await,
            (StatusCode::UNAUTHORIZED, "invalid_token".into())
        );
    }
    let response = client
        .get(admin.url("/api/v1/me"))
        .header("Authorization", "Basic YWxpY2U6cGFzcw==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let output = admin
        .idgate()
        .args(["token", "revoke", "station-3"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let response = client
        .get(admin.url("/api/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    admin.gateway.shutdown().await;
}

/// API tokens expire by default (90 days), an expired one is refused, and a
/// token made by an account stops working when the account is disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_and_die_with_their_creator() {
    let admin = Admin::start().await;
    admin.add_user("alice", "admin", PASSWORD);
    let (client, csrf) = admin.log_in("alice", PASSWORD).await;
    let create = |body: Value| {
        client
            .post(admin.url("/api/v1/tokens"))
            .header("X-CSRF-Token", &csrf)
            .json(&body)
            .send()
    };
    let before = now();
    let response = create(json!({ "name": "ticketing", "role": "operator" }))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let expires_at = created["expires_at"]
        .as_i64()
        .expect("an expiry by default");
    assert!((before + 90 * 86_400..=now() + 90 * 86_400).contains(&expires_at));
    let token = created["token"].as_str().unwrap().to_owned();
    for days in [0, 3651] {
        let response = create(json!({ "name": "t2", "role": "viewer", "expires_in_days": days }))
            .await
            .unwrap();
        assert_eq!(
            error_code(response).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into()),
            "{days}"
        );
    }
    // `idgate token create`: 90 days unless told, `never` when asked.
    admin.create_token("cli-default", "viewer");
    let output = admin
        .idgate()
        .args(["token", "create", "--name", "cli-never", "--role", "viewer"])
        .args(["--expires-in", "never"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let tokens = admin.gateway.registry().api_tokens().await.unwrap();
    let expiry = |name: &str| {
        tokens
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.expires_at.map(|e| e - t.created_at))
    };
    assert_eq!(expiry("cli-default"), Some(Some(90 * 86_400)));
    assert_eq!(expiry("cli-never"), Some(None));

    // An expired token is refused.
    let (expired, expired_sha256) = idgate_gateway::api::auth::new_api_token();
    admin
        .gateway
        .registry()
        .add_api_token(&idgate_gateway::registry::NewApiToken {
            name: "old".into(),
            token_sha256: expired_sha256,
            role: idgate_gateway::registry::Role::Admin,
            created_by: "cli:root".into(),
            created_at: now() - 100,
            expires_at: Some(now() - 1),
        })
        .await
        .unwrap();
    let me = |token: String| {
        admin
            .client()
            .get(admin.url("/api/v1/me"))
            .bearer_auth(token)
            .send()
    };
    let response = me(expired).await.unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::UNAUTHORIZED, "invalid_token".into())
    );

    // alice's token works until alice is disabled, and again once enabled.
    assert_eq!(me(token.clone()).await.unwrap().status(), StatusCode::OK);
    let output = admin
        .idgate()
        .args(["user", "disable", "alice"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let response = me(token.clone()).await.unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::UNAUTHORIZED, "invalid_token".into())
    );
    let output = admin
        .idgate()
        .args(["user", "enable", "alice"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(me(token).await.unwrap().status(), StatusCode::OK);
    admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited() {
    let admin = Admin::start().await;
    admin.add_user("alice", "operator", PASSWORD);
    admin.add_user("bob", "viewer", PASSWORD);
    let client = admin.client();
    let login = |name: &'static str, password: &'static str| {
        client
            .post(admin.url("/api/v1/login"))
            .json(&json!({ "username": name, "password": password }))
            .send()
    };
    // Five guesses at alice from another address: the requests reach the
    // gateway from 127.0.0.1, so they are recorded as the registry would
    // record them from that address.
    let registry = admin.gateway.registry();
    for i in 0..5 {
        let audit =
            idgate_gateway::registry::AuditEntry::new(now() - i, "user:alice", "account.login")
                .outcome("invalid_credentials");
        registry
            .record_login_failure(&["account:alice@192.0.2.66", "ip:192.0.2.66"], &audit, 0)
            .await
            .unwrap();
    }
    // ... do not keep alice out from her own address.
    let response = login("alice", PASSWORD).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for _ in 0..5 {
        let response = login("alice", "guess guess guess").await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // Five from this address: even the right password is refused now,
    // before it is checked.
    let response = login("alice", PASSWORD).await.unwrap();
    let retry_after: u64 = response.headers()[RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 900);
    assert_eq!(
        error_code(response).await,
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited".into())
    );
    // Another account from the same address is not locked out by alice's five.
    let response = login("bob", PASSWORD).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The form login says so too.
    let response = admin
        .client()
        .post(admin.url("/login"))
        .form(&[("username", "alice"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()[LOCATION], "/login?error=rate_limited");
    // 20 failures from one address lock the address out, whatever the name.
    for i in 0..15 {
        let name = format!("nobody{i}");
        let response = client
            .post(admin.url("/api/v1/login"))
            .json(&json!({ "username": name, "password": "x" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let response = login("bob", PASSWORD).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    admin.gateway.shutdown().await;
}

/// Guesses sent all at once are counted while they are checked: no more
/// than the limit reach argon2, the rest are refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_do_not_overrun_the_limit() {
    let admin = Admin::start().await;
    admin.add_user("alice", "operator", PASSWORD);
    let client = admin.client();
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..16 {
        let request = client
            .post(admin.url("/api/v1/login"))
            .json(&json!({ "username": "alice", "password": format!("guess {i:02} guess") }));
        guesses.spawn(async move { request.send().await.expect("login request").status() });
    }
    let statuses: Vec<StatusCode> = guesses.join_all().await;
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((checked, refused), (5, 11), "{statuses:?}");
    let failures = admin
        .gateway
        .registry()
        .login_failures(&["account:alice@127.0.0.1", "ip:127.0.0.1"], 0)
        .await
        .unwrap();
    assert_eq!(failures, [5, 5]);
    let response = client
        .post(admin.url("/api/v1/login"))
        .json(&json!({ "username": "alice", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_are_refused() {
    let admin = Admin::start().await;
    admin.add_user("alice", "admin", PASSWORD);
    let registry = admin.gateway.registry();
    let at = now();
    let mut cookies = Vec::new();
    // Past its hard end; idle for two hours; still good.
    for (i, (created_at, expires_at)) in
        [(at - 100, at - 1), (at - 7200, at + 3600), (at, at + 3600)]
            .into_iter()
            .enumerate()
    {
        let cookie = format!("test-session-{i}-{at}");
        registry
            .create_session(&NewSession {
                id_sha256: Sha256::digest(cookie.as_bytes()).to_vec(),
                account: "alice".into(),
                csrf_token: "t".into(),
                created_at,
                expires_at,
                client: "test".into(),
            })
            .await
            .unwrap();
        cookies.push(cookie);
    }
    let client = admin.client();
    let send = |cookie: &str| {
        client
            .get(admin.url("/api/v1/me"))
            .header("Cookie", format!("__Host-idgate-session={cookie}"))
            .send()
    };
    for cookie in &cookies[..2] {
        let response = send(cookie).await.unwrap();
        // The browser is told to drop the dead cookie.
        assert!(session_cookie(response.headers()).contains("Max-Age=0"));
        assert_eq!(
            error_code(response).await,
            (StatusCode::UNAUTHORIZED, "session_expired".into())
        );
    }
    assert_eq!(send(&cookies[2]).await.unwrap().status(), StatusCode::OK);

    // Disabling the account ends the good one too.
    let output = admin
        .idgate()
        .args(["user", "disable", "alice"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        send(&cookies[2]).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let response = admin
        .client()
        .post(admin.url("/api/v1/login"))
        .json(&json!({ "username": "alice", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_add_refuses_weak_passwords_and_duplicates() {
    let admin = Admin::start().await;
    let output = run_with_stdin(
        admin
            .idgate()
            .args(["user", "add", "alice", "--role", "admin"]),
        "short\n",
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("at least 12"));
    admin.add_user("alice", "admin", PASSWORD);
    let output = run_with_stdin(
        admin
            .idgate()
            .args(["user", "add", "alice", "--role", "viewer"]),
        &format!("{PASSWORD}\n"),
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    let output = admin
        .idgate()
        .args(["user", "list", "--json"])
        .output()
        .unwrap();
    let accounts: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(accounts[0]["name"], "alice");
    assert_eq!(accounts[0]["role"], "admin");
    assert!(accounts[0].get("password_hash").is_none());
    let _ = admin.log_in("alice", PASSWORD).await;
    let data: &Path = admin.data.root();
    assert!(data.exists());
    admin.gateway.shutdown().await;
}

/// A gateway with an admin, an operator and a viewer logged in, and an
/// operator API token.
struct Staff {
    admin: Admin,
    boss: (reqwest::Client, String),
    operator: (reqwest::Client, String),
    viewer: (reqwest::Client, String),
    token: String,
}

impl Staff {
    async fn start() -> Staff {
        let admin = Admin::start().await;
        admin.add_user("boss", "admin", PASSWORD);
        admin.add_user("olga", "operator", PASSWORD);
        admin.add_user("vera", "viewer", PASSWORD);
        let token = admin.create_token("station-3", "operator");
        Staff {
            boss: admin.log_in("boss", PASSWORD).await,
            operator: admin.log_in("olga", PASSWORD).await,
            viewer: admin.log_in("vera", PASSWORD).await,
            token,
            admin,
        }
    }

    /// A cookie-authenticated change with the session's CSRF token.
    async fn send(
        &self,
        who: &(reqwest::Client, String),
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = who
            .0
            .request(method, self.admin.url(path))
            .header("X-CSRF-Token", &who.1);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request")
    }

    async fn get(&self, who: &(reqwest::Client, String), path: &str) -> reqwest::Response {
        who.0
            .get(self.admin.url(path))
            .send()
            .await
            .expect("request")
    }
}

async fn ok_json(response: reqwest::Response, status: StatusCode) -> Value {
    let got = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(got, status, "{text}");
    serde_json::from_str(&text).expect("JSON body")
}

/// The console's suspend and resume buttons: refused to a viewer and to a
/// form without the session's CSRF token, whatever the role; only then done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_status_changes_need_the_role_and_the_csrf_token() {
    let staff = Staff::start().await;
    let response = staff
        .send(
            &staff.boss,
            reqwest::Method::POST,
            "/api/v1/devices",
            Some(json!({ "id": "sensor-1", "owner": "fm@example.com", "site": "hq-2f" })),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let status = async || {
        ok_json(
            staff.get(&staff.viewer, "/api/v1/devices/sensor-1").await,
            StatusCode::OK,
        )
        .await["device"]["status"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // The device is pending (not enrolled yet): a suspend or resume that gets
    // through is refused by the device's state (409), one that does not by
    // the gate (403) before anything is looked at.
    for action in ["suspend", "resume"] {
        let url = staff.admin.url(&format!("/devices/sensor-1/{action}"));
        // A viewer with a valid CSRF token.
        let response = staff
            .viewer
            .0
            .post(&url)
            .form(&[("csrf", staff.viewer.1.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "viewer {action}");
        // An operator and an admin without one, or with another session's.
        for who in [&staff.operator, &staff.boss] {
            for form in [vec![], vec![("csrf", staff.viewer.1.as_str())]] {
                let response = who.0.post(&url).form(&form).send().await.unwrap();
                assert_eq!(
                    response.status(),
                    StatusCode::FORBIDDEN,
                    "{action} {form:?}"
                );
            }
        }
        assert_eq!(status().await, "pending", "{action}");
        let response = staff
            .operator
            .0
            .post(&url)
            .form(&[("csrf", staff.operator.1.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT, "{action}");
    }

    // A form login posted from another site's page opens no session.
    let response = staff
        .admin
        .client()
        .post(staff.admin.url("/login"))
        .header("Origin", "https://evil.example")
        .form(&[("username", "boss"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()[LOCATION], "/login?error=invalid_request");
    assert!(response.headers().get(SET_COOKIE).is_none());
    staff.admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_may_change_devices() {
    let staff = Staff::start().await;
    let post = reqwest::Method::POST;
    let new_device = json!({ "id": "sensor-1", "owner": "fm@example.com", "site": "hq-2f" });

    // Only an admin registers devices; the token comes back once.
    for who in [&staff.viewer, &staff.operator] {
        let response = staff
            .send(
                who,
                post.clone(),
                "/api/v1/devices",
                Some(new_device.clone()),
            )
            .await;
        assert_eq!(
            error_code(response).await,
            (StatusCode::FORBIDDEN, "forbidden".into())
        );
    }
    let added = ok_json(
        staff
            .send(
                &staff.boss,
                post.clone(),
                "/api/v1/devices",
                Some(new_device.clone()),
            )
            .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(added["device"]["status"], "pending");
    assert_eq!(added["device"]["created_by"], "user:boss");
    let token = added["token"].as_str().expect("token").to_owned();
    let response = staff
        .send(
            &staff.boss,
            post.clone(),
            "/api/v1/devices",
            Some(new_device),
        )
        .await;
    assert_eq!(
        error_code(response).await,
        (StatusCode::CONFLICT, "device_exists".into())
    );

    // The device enrolls over MQTT, so it has a certificate to revoke.
    let root_pem = std::fs::read(staff.admin.data.root_certificate()).unwrap();
    let enrolled = idgate_sim::enroll(&idgate_sim::EnrollOptions::new(
        format!("127.0.0.1:{}", staff.admin.gateway.mqtt_address().port()),
        root_pem,
        "sensor-1",
        token,
    ))
    .await
    .expect("enrollment");

    // A viewer reads but cannot revoke, suspend or edit.
    let shown = ok_json(
        staff.get(&staff.viewer, "/api/v1/devices/sensor-1").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(shown["device"]["status"], "active");
    assert_eq!(shown["certificates"][0]["serial"], enrolled.serial.as_str());
    assert_eq!(shown["certificates"][0]["state"], "valid");
    for (method, path, body) in [
        (
            post.clone(),
            "/api/v1/devices/sensor-1/revoke",
            Some(json!({ "reason": "lost" })),
        ),
        (post.clone(), "/api/v1/devices/sensor-1/suspend", None),
        (post.clone(), "/api/v1/devices/sensor-1/retire", None),
        (
            reqwest::Method::PATCH,
            "/api/v1/devices/sensor-1",
            Some(json!({ "site": "elsewhere" })),
        ),
    ] {
        let response = staff.send(&staff.viewer, method, path, body).await;
        assert_eq!(
            error_code(response).await,
            (StatusCode::FORBIDDEN, "forbidden".into()),
            "{path}"
        );
    }

    // A cookie-authenticated revoke without the CSRF token changes nothing.
    let response = staff
        .operator
        .0
        .post(staff.admin.url("/api/v1/devices/sensor-1/revoke"))
        .json(&json!({ "reason": "lost" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::FORBIDDEN, "csrf".into())
    );

    // The operator suspends and resumes; a bad reason and an unknown device
    // are refused; then the line station's token revokes (no CSRF token).
    let suspended = ok_json(
        staff
            .send(
                &staff.operator,
                post.clone(),
                "/api/v1/devices/sensor-1/suspend",
                None,
            )
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(suspended["device"]["status"], "suspended");
    assert_eq!(suspended["certificates"], json!([enrolled.serial]));
    let on_hold = ok_json(
        staff
            .get(
                &staff.viewer,
                &format!("/api/v1/certificates/{}", enrolled.serial),
            )
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(on_hold["state"], "on_hold");
    assert!(
        on_hold["pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    ok_json(
        staff
            .send(
                &staff.operator,
                post.clone(),
                "/api/v1/devices/sensor-1/resume",
                None,
            )
            .await,
        StatusCode::OK,
    )
    .await;
    let response = staff
        .send(
            &staff.operator,
            post.clone(),
            "/api/v1/devices/sensor-1/revoke",
            Some(json!({ "reason": "misplaced" })),
        )
        .await;
    assert_eq!(
        error_code(response).await,
        (StatusCode::BAD_REQUEST, "invalid_reason".into())
    );
    let response = staff
        .send(
            &staff.operator,
            post.clone(),
            "/api/v1/devices/no-such-sensor/revoke",
            Some(json!({ "reason": "lost" })),
        )
        .await;
    assert_eq!(
        error_code(response).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let revoked: Value = ok_json(
        staff
            .operator
            .0
            .post(staff.admin.url("/api/v1/devices/sensor-1/revoke"))
            .bearer_auth(&staff.token)
            .json(&json!({ "reason": "lost" }))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(revoked["device"]["status"], "revoked");
    // The gateway applies it: the serial is in the revocation state in force
    // (TLS verifier, live sessions, CRL), awaited rather than slept for.
    let mut applied = staff.admin.gateway.revocation();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        applied.wait_for(|state| state.revoked.contains(&enrolled.serial)),
    )
    .await
    .expect("the revocation is applied within 10 s")
    .expect("gateway running");
    let response = staff
        .send(
            &staff.operator,
            post.clone(),
            "/api/v1/devices/sensor-1/suspend",
            None,
        )
        .await;
    assert_eq!(
        error_code(response).await,
        (StatusCode::CONFLICT, "invalid_transition".into())
    );
    let certificate = ok_json(
        staff
            .get(
                &staff.viewer,
                &format!("/api/v1/certificates/{}", enrolled.serial.to_uppercase()),
            )
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (&certificate["state"], &certificate["revocation_reason"]),
        (&json!("revoked"), &json!("keyCompromise"))
    );

    // Every change is in the audit trail under the name of who made it.
    let trail = ok_json(
        staff
            .get(&staff.viewer, "/api/v1/devices/sensor-1/audit")
            .await,
        StatusCode::OK,
    )
    .await;
    let actions: Vec<(String, String)> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] == "ok")
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        actions,
        [
            expect("device.add", "user:boss"),
            expect("enroll", "device:sensor-1"),
            expect("device.suspend", "user:olga"),
            expect("device.resume", "user:olga"),
            expect("device.revoke", "token:station-3"),
        ]
    );
    staff.admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_paging_and_bad_input() {
    let staff = Staff::start().await;
    let post = reqwest::Method::POST;
    let script_owner = "<script>alert(1)</script>@example.com";
    let script_site = "<img src=x onerror=alert(1)> & \"hall\"";
    for (id, site) in [
        ("a-1", "hq"),
        ("a-2", "hq"),
        ("a-3", "lab"),
        ("x-1", script_site),
    ] {
        let owner = if id == "x-1" {
            script_owner
        } else {
            "fm@example.com"
        };
        ok_json(
            staff
                .send(
                    &staff.boss,
                    post.clone(),
                    "/api/v1/devices",
                    Some(json!({ "id": id, "owner": owner, "site": site, "model": "th-1" })),
                )
                .await,
            StatusCode::CREATED,
        )
        .await;
    }

    // Script in owner and site is data: it comes back exactly, as JSON.
    let response = staff.get(&staff.viewer, "/api/v1/devices/x-1").await;
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let shown = ok_json(response, StatusCode::OK).await;
    assert_eq!(shown["device"]["owner"], script_owner);
    assert_eq!(shown["device"]["site"], script_site);
    let edited = ok_json(
        staff
            .send(
                &staff.operator,
                reqwest::Method::PATCH,
                "/api/v1/devices/a-3",
                Some(json!({ "site": "</script><b>lab</b>", "label": "Room 1 <i>" })),
            )
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(edited["device"]["site"], "</script><b>lab</b>");
    assert_eq!(edited["device"]["label"], "Room 1 <i>");
    let found = ok_json(
        staff
            .viewer
            .0
            .get(staff.admin.url("/api/v1/devices"))
            .query(&[("owner", script_owner)])
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(found["devices"][0]["id"], "x-1");
    assert_eq!(found["total"], 1);

    // Filters and cursor paging.
    let page = ok_json(
        staff
            .get(
                &staff.viewer,
                "/api/v1/devices?site=hq&model=th-1&status=pending&limit=1",
            )
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (&page["devices"][0]["id"], &page["total"], &page["next"]),
        (&json!("a-1"), &json!(2), &json!("a-1"))
    );
    let page = ok_json(
        staff
            .get(&staff.viewer, "/api/v1/devices?site=hq&limit=1&after=a-1")
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (&page["devices"][0]["id"], &page["next"]),
        (&json!("a-2"), &Value::Null)
    );
    let page = ok_json(
        staff.get(&staff.viewer, "/api/v1/devices?q=ROOM%201").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["devices"][0]["id"], "a-3");

    // Huge, zero and malformed page sizes, unknown parameters and statuses.
    for (query, code) in [
        ("limit=1000000", "invalid_page_size"),
        ("limit=201", "invalid_page_size"),
        ("limit=0", "invalid_page_size"),
        ("limit=-1", "invalid_request"),
        ("limit=lots", "invalid_request"),
        ("limit=99999999999999999999999", "invalid_request"),
        ("colour=red", "invalid_request"),
        ("status=lost", "invalid_status"),
    ] {
        let response = staff
            .get(&staff.viewer, &format!("/api/v1/devices?{query}"))
            .await;
        assert_eq!(
            error_code(response).await,
            (StatusCode::BAD_REQUEST, code.into()),
            "{query}"
        );
    }
    let response = staff.get(&staff.viewer, "/api/v1/audit?limit=100000").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // Bad bodies.
    for (body, code) in [
        (
            json!({ "id": "bad id!", "owner": "fm@example.com", "site": "hq" }),
            "invalid_device_id",
        ),
        (
            json!({ "id": "ok-1", "owner": "not an email", "site": "hq" }),
            "invalid_owner",
        ),
        (
            json!({ "id": "ok-1", "owner": "fm@example.com", "site": "" }),
            "invalid_site",
        ),
        (
            json!({ "id": "ok-1", "owner": "fm@example.com" }),
            "invalid_request",
        ),
        (
            json!({ "id": "ok-1", "owner": "fm@example.com", "site": "hq", "extra": 1 }),
            "invalid_request",
        ),
        (json!(["not", "an", "object"]), "invalid_request"),
    ] {
        let response = staff
            .send(
                &staff.boss,
                post.clone(),
                "/api/v1/devices",
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            error_code(response).await,
            (StatusCode::BAD_REQUEST, code.into()),
            "{body}"
        );
    }
    let response = staff
        .boss
        .0
        .post(staff.admin.url("/api/v1/devices"))
        .header("X-CSRF-Token", &staff.boss.1)
        .header("Content-Type", "application/json")
        .body("{\"id\": \"ok-1\", \u{0}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::BAD_REQUEST, "invalid_request".into())
    );

    // Unknown ids and routes.
    for path in [
        "/api/v1/devices/no-such-device",
        "/api/v1/devices/no-such-device/certificates",
        "/api/v1/devices/no-such-device/audit",
        "/api/v1/certificates/00ff",
        "/api/v1/batches/no-such-batch",
        "/api/v1/no-such-route",
        "/api/v2/devices",
    ] {
        let response = staff.get(&staff.boss, path).await;
        assert_eq!(
            error_code(response).await,
            (StatusCode::NOT_FOUND, "not_found".into()),
            "{path}"
        );
    }
    let response = staff
        .send(
            &staff.boss,
            post.clone(),
            "/api/v1/accounts/nobody/disable",
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // The audit log pages backwards in time.
    let first = ok_json(
        staff.get(&staff.viewer, "/api/v1/audit?limit=2").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(first["entries"].as_array().unwrap().len(), 2);
    assert_eq!(first["entries"][0]["action"], "device.update");
    let next = first["next"].as_str().unwrap();
    let second = ok_json(
        staff
            .get(
                &staff.viewer,
                &format!("/api/v1/audit?limit=2&before={next}"),
            )
            .await,
        StatusCode::OK,
    )
    .await;
    assert!(second["entries"][0]["id"].as_str().unwrap() < next);
    staff.admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_tokens_ca_and_openapi() {
    let staff = Staff::start().await;
    let post = reqwest::Method::POST;

    // Accounts and tokens are the admin's.
    for path in ["/api/v1/accounts", "/api/v1/tokens"] {
        let response = staff.get(&staff.operator, path).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
    }
    // ... and so is every change to them: refused to operators, viewers and
    // an operator token alike, and nothing changes.
    let changes = [
        (
            "/api/v1/accounts",
            json!({ "name": "mallory", "role": "admin", "password": PASSWORD }),
        ),
        ("/api/v1/accounts/vera/disable", json!({})),
        ("/api/v1/accounts/vera/enable", json!({})),
        (
            "/api/v1/tokens",
            json!({ "name": "mallory", "role": "admin", "expires_in_days": 1 }),
        ),
        ("/api/v1/tokens/station-3/revoke", json!({})),
    ];
    for (path, body) in &changes {
        for who in [&staff.operator, &staff.viewer] {
            let response = staff
                .send(who, post.clone(), path, Some(body.clone()))
                .await;
            assert_eq!(
                error_code(response).await,
                (StatusCode::FORBIDDEN, "forbidden".into()),
                "{path}"
            );
        }
        let response = staff
            .admin
            .client()
            .post(staff.admin.url(path))
            .bearer_auth(&staff.token)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(response).await,
            (StatusCode::FORBIDDEN, "forbidden".into()),
            "token {path}"
        );
    }
    let registry = staff.admin.gateway.registry();
    assert!(registry.account("mallory").await.unwrap().is_none());
    assert!(
        registry
            .account("vera")
            .await
            .unwrap()
            .unwrap()
            .disabled_at
            .is_none()
    );
    let tokens = registry.api_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].revoked_at.is_none());
    let response = staff
        .send(
            &staff.boss,
            post.clone(),
            "/api/v1/accounts",
            Some(json!({ "name": "nina", "role": "viewer", "password": "short" })),
        )
        .await;
    assert_eq!(
        error_code(response).await,
        (StatusCode::BAD_REQUEST, "weak_password".into())
    );
    let created = ok_json(
        staff
            .send(
                &staff.boss,
                post.clone(),
                "/api/v1/accounts",
                Some(json!({ "name": "nina", "role": "viewer", "password": PASSWORD })),
            )
            .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(created["account"]["role"], "viewer");
    assert!(created["account"].get("password_hash").is_none());
    let nina = staff.admin.log_in("nina", PASSWORD).await;
    ok_json(
        staff
            .send(
                &staff.boss,
                post.clone(),
                "/api/v1/accounts/nina/disable",
                None,
            )
            .await,
        StatusCode::OK,
    )
    .await;
    let response = nina
        .0
        .get(staff.admin.url("/api/v1/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let made = ok_json(
        staff
            .send(
                &staff.boss,
                post.clone(),
                "/api/v1/tokens",
                Some(json!({ "name": "script-1", "role": "viewer", "expires_in_days": 30 })),
            )
            .await,
        StatusCode::CREATED,
    )
    .await;
    let script_token = made["token"].as_str().unwrap().to_owned();
    let listed = ok_json(
        staff.get(&staff.boss, "/api/v1/tokens").await,
        StatusCode::OK,
    )
    .await;
    let names: Vec<&str> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["script-1", "station-3"]);
    assert!(!listed.to_string().contains(&script_token));
    let me = ok_json(
        staff
            .viewer
            .0
            .get(staff.admin.url("/api/v1/me"))
            .bearer_auth(&script_token)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me["name"], "script-1");
    let response = staff
        .send(
            &staff.boss,
            post.clone(),
            "/api/v1/tokens/script-1/revoke",
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // CA information.
    let ca = ok_json(staff.get(&staff.viewer, "/api/v1/ca").await, StatusCode::OK).await;
    assert_eq!(ca["issuing"]["path_length"], 0);
    assert_eq!(ca["issuing"]["issuer"], ca["root"]["subject"]);
    assert_eq!(
        ca["root_pem"].as_str().unwrap(),
        std::fs::read_to_string(staff.admin.data.root_certificate()).unwrap()
    );
    assert_eq!(ca["crl"]["path"], "/crl");

    // The OpenAPI document is public, and every operation it lists is served.
    let response = staff
        .admin
        .client()
        .get(staff.admin.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    let document = ok_json(response, StatusCode::OK).await;
    assert_eq!(
        document,
        serde_json::from_str::<Value>(idgate_gateway::api::OPENAPI).unwrap()
    );
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| *m != "parameters")
        {
            let concrete = path
                .replace("{id}", "unknown-x")
                .replace("{serial}", "00")
                .replace("{name}", "unknown-x");
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = staff
                .boss
                .0
                .request(method.clone(), staff.admin.url(&concrete))
                .bearer_auth(&staff.token)
                .header("Content-Type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = response.status();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            // An operator token reaches no admin-only route.
            if path.starts_with("/api/v1/accounts") || path.starts_with("/api/v1/tokens") {
                assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
            }
            let body = response.text().await.unwrap();
            assert!(
                !body.contains("no such API route"),
                "{method} {path}: {body}"
            );
        }
    }
    staff.admin.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_register_all_or_nothing() {
    let staff = Staff::start().await;
    let post = reqwest::Method::POST;
    let batch = |devices: Value| {
        json!({ "id": "line-7", "owner": "fm@example.com", "site": "plant-1", "model": "th-1",
                "devices": devices })
    };
    let three = json!([
        { "id": "sn-1" },
        { "id": "sn-2", "site": "lab", "label": "<b>case 2</b>" },
        { "id": "sn-3", "owner": "lab@example.com" },
    ]);
    let response = staff
        .send(
            &staff.operator,
            post.clone(),
            "/api/v1/batches",
            Some(batch(three.clone())),
        )
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // Refused whole: a bad row, a repeated id, too many or no devices.
    let many: Vec<Value> = (0..10_001)
        .map(|i| json!({ "id": format!("m-{i}") }))
        .collect();
    for (devices, code, says) in [
        (
            json!([{ "id": "ok-1" }, { "id": "bad id" }]),
            "invalid_request",
            "devices[1]",
        ),
        (
            json!([{ "id": "ok-1" }, { "id": "ok-1" }]),
            "invalid_request",
            "twice",
        ),
        (
            json!([{ "id": "ok-1", "owner": "nobody" }]),
            "invalid_request",
            "devices[0]",
        ),
        (json!(many), "invalid_request", "10000"),
        (json!([]), "invalid_request", "1 to"),
    ] {
        let response = staff
            .send(
                &staff.boss,
                post.clone(),
                "/api/v1/batches",
                Some(batch(devices)),
            )
            .await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (StatusCode::BAD_REQUEST, code)
        );
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }

    let made = ok_json(
        staff
            .send(
                &staff.boss,
                post.clone(),
                "/api/v1/batches",
                Some(batch(three.clone())),
            )
            .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(made["batch"]["registered"], 3);
    assert_eq!(made["batch"]["created_by"], "user:boss");
    let tokens: Vec<&str> = made["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 3);
    assert!(tokens[0] != tokens[1] && !tokens[2].is_empty());
    let sn2 = ok_json(
        staff.get(&staff.viewer, "/api/v1/devices/sn-2").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (
            &sn2["device"]["site"],
            &sn2["device"]["label"],
            &sn2["device"]["owner"],
            &sn2["batch"]
        ),
        (
            &json!("lab"),
            &json!("<b>case 2</b>"),
            &json!("fm@example.com"),
            &json!("line-7")
        )
    );

    // The same batch id, or a device registered already: 409, nothing written.
    let response = staff
        .send(
            &staff.boss,
            post.clone(),
            "/api/v1/batches",
            Some(batch(json!([{ "id": "new-1" }]))),
        )
        .await;
    assert_eq!(
        error_code(response).await,
        (StatusCode::CONFLICT, "batch_exists".into())
    );
    let mut again = batch(json!([{ "id": "new-1" }, { "id": "sn-3" }]));
    again["id"] = json!("line-8");
    let response = staff
        .send(&staff.boss, post.clone(), "/api/v1/batches", Some(again))
        .await;
    assert_eq!(
        error_code(response).await,
        (StatusCode::CONFLICT, "device_exists".into())
    );
    let response = staff.get(&staff.viewer, "/api/v1/devices/new-1").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let listed = ok_json(
        staff.get(&staff.viewer, "/api/v1/batches").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(listed["batches"].as_array().unwrap().len(), 1);
    let shown = ok_json(
        staff.get(&staff.viewer, "/api/v1/batches/line-7").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(shown["pending_devices"], json!(["sn-1", "sn-2", "sn-3"]));
    let page = ok_json(
        staff
            .get(
                &staff.viewer,
                "/api/v1/devices?batch=line-7&owner=lab@example.com",
            )
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (&page["total"], &page["devices"][0]["id"]),
        (&json!(1), &json!("sn-3"))
    );
    staff.admin.gateway.shutdown().await;
}
