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
    for _ in 0..5 {
        let response = login("alice", "guess guess guess").await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // Even the right password is refused now, before it is checked.
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
