//! The console's HTML, written with `maud`: every `(value)` spliced into a
//! page is escaped, so device names, owners, labels and audit details that
//! hold markup show as text. Nothing here reads the registry; the handlers in
//! [`super`] hand each page what it shows.

use maud::{DOCTYPE, Markup, html};

use crate::admin::RevokeReason;
use crate::api::auth::{Principal, Role, csrf_token};
use crate::registry::console::{DevicePage, FleetCounts};
use crate::registry::{AuditEntry, BatchSummary, CertificateRecord, Device, DeviceStatus};

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The fleet overview.
    Overview,
    /// Device search, lists and pages.
    Devices,
    /// Manufacturing batches.
    Batches,
    /// The audit log.
    Audit,
    /// No entry (login, errors).
    None,
}

/// The page frame: header, navigation, the signed-in account and its logout
/// button, then `body`.
pub fn layout(title: &str, section: Section, who: Option<&Principal>, body: Markup) -> Markup {
    let nav = [
        (Section::Overview, "/", "Overview"),
        (Section::Devices, "/devices", "Devices"),
        (Section::Batches, "/batches", "Batches"),
        (Section::Audit, "/audit", "Audit log"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · idgate" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                header.top {
                    div.bar {
                        a.brand href="/" { "idgate" }
                        @if let Some(who) = who {
                            nav aria-label="Main" {
                                @for (entry, href, label) in nav {
                                    @if entry == section {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                            div.who {
                                span { (who.name) " (" (who.role) ")" }
                                @if let Some(session) = who.session() {
                                    form method="post" action="/logout" {
                                        input type="hidden" name="csrf" value=(csrf_token(session));
                                        button type="submit" { "Log out" }
                                    }
                                }
                            }
                        }
                    }
                }
                main id="main" { (body) }
            }
        }
    }
}

/// The login form; it posts to the admin listener's `POST /login`.
pub fn login(error: Option<&str>, next: &str) -> Markup {
    let message = error.map(|code| match code {
        "invalid_credentials" => "Wrong user name or password.",
        "rate_limited" => "Too many failed logins. Wait a few minutes, then try again.",
        "busy" => "Too many logins at once. Try again in a few seconds.",
        "session_expired" => "Your session has ended. Log in again.",
        _ => "The login could not be processed. Try again.",
    });
    let body = html! {
        div.login.card {
            h1 { "Log in" }
            @if let Some(message) = message {
                p.notice.error role="alert" { (message) }
            }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="username" { "User name" }
                input #username name="username" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
        }
    };
    layout("Log in", Section::None, None, body)
}

/// An error page: what went wrong and where to go.
pub fn error(who: Option<&Principal>, title: &str, message: &str) -> Markup {
    let body = html! {
        h1 { (title) }
        p.notice.error role="alert" { (message) }
        p { a href="/" { "Back to the overview" } }
    };
    layout(title, Section::None, who, body)
}

/// The search box, on the overview and the device list.
fn search_box(query: &str) -> Markup {
    html! {
        form.search role="search" method="get" action="/devices" {
            label for="q" { "Find a device by id, label, site, owner or model" }
            input #q type="search" name="q" value=(query) placeholder="e.g. the label on the case";
            button type="submit" { "Search" }
        }
    }
}

/// The fleet overview.
pub fn overview(
    who: &Principal,
    counts: &FleetCounts,
    expiring_days: i64,
    not_seen_days: i64,
) -> Markup {
    let status = |s: DeviceStatus| counts.status(s);
    let tiles: Vec<(&str, i64, String, String)> = vec![
        (
            "",
            status(DeviceStatus::Active),
            "Active".into(),
            "/devices?status=active".into(),
        ),
        (
            "warn",
            counts.expiring,
            format!("Certificate ends within {}", days(expiring_days)),
            format!("/devices?view=expiring&days={expiring_days}"),
        ),
        (
            "bad",
            counts.expired,
            "Certificate ended, not renewed".into(),
            "/devices?view=expired".into(),
        ),
        (
            "warn",
            counts.not_seen,
            format!("Not seen for {}", days(not_seen_days)),
            format!("/devices?view=not_seen&days={not_seen_days}"),
        ),
        (
            "warn",
            status(DeviceStatus::Suspended),
            "Suspended".into(),
            "/devices?status=suspended".into(),
        ),
        (
            "bad",
            status(DeviceStatus::Suspect),
            "Suspect (possible clone)".into(),
            "/devices?status=suspect".into(),
        ),
        (
            "",
            status(DeviceStatus::Pending),
            "Never enrolled".into(),
            "/devices?status=pending".into(),
        ),
        (
            "",
            status(DeviceStatus::Revoked),
            "Revoked".into(),
            "/devices?status=revoked".into(),
        ),
        (
            "",
            status(DeviceStatus::Retired),
            "Retired".into(),
            "/devices?status=retired".into(),
        ),
    ];
    let body = html! {
        h1 { "Fleet overview" }
        (search_box(""))
        div.tiles {
            @for (class, n, what, href) in &tiles {
                a.tile.(class) href=(href) {
                    span.n { (n) }
                    span.what { (what) }
                }
            }
        }
        form.windows method="get" action="/" {
            label { "Ends within (days)"
                input type="number" name="expiring_days" min="1" max="365" value=(expiring_days);
            }
            label { "Not seen for (days)"
                input type="number" name="not_seen_days" min="1" max="3650" value=(not_seen_days);
            }
            button.secondary type="submit" { "Update" }
        }
        p.muted { (counts.total()) " devices registered. " a href="/devices" { "List all devices" } }
    };
    layout("Overview", Section::Overview, Some(who), body)
}

/// What a device list shows, for its heading, filters and page links.
#[derive(Clone, Debug, Default)]
pub struct ListView {
    /// The text query.
    pub query: String,
    /// The status filter, if any.
    pub status: Option<DeviceStatus>,
    /// A named view (`expiring`, `expired`, `not_seen`) and its days.
    pub view: Option<(String, i64)>,
    /// The heading.
    pub heading: String,
    /// 1-based page.
    pub page: i64,
    /// Rows per page.
    pub per_page: i64,
}

impl ListView {
    /// The URL of this list at `page`, with `status` instead of the current one.
    fn href(&self, status: Option<DeviceStatus>, page: i64) -> String {
        let mut params = Vec::new();
        if !self.query.is_empty() {
            params.push(format!("q={}", encode(&self.query)));
        }
        if let Some(status) = status {
            params.push(format!("status={status}"));
        }
        if let Some((view, days)) = &self.view {
            params.push(format!("view={}&days={days}", encode(view)));
        }
        if page > 1 {
            params.push(format!("page={page}"));
        }
        if params.is_empty() {
            "/devices".to_owned()
        } else {
            format!("/devices?{}", params.join("&"))
        }
    }
}

/// The device list (search results, a status, a named view).
pub fn devices(who: &Principal, view: &ListView, page: &DevicePage, now: i64) -> Markup {
    let first = (view.page - 1) * view.per_page + 1;
    let last = first + page.devices.len() as i64 - 1;
    let body = html! {
        h1 { (view.heading) }
        (search_box(&view.query))
        @if view.view.is_none() {
            ul.filters aria-label="Filter by status" {
                li { a href=(view.href(None, 1)) aria-current=(view.status.is_none()) { "All" } }
                @for status in DeviceStatus::ALL {
                    li { a href=(view.href(Some(status), 1)) aria-current=(view.status == Some(status)) { (status) } }
                }
            }
        }
        @if page.devices.is_empty() {
            p.notice.warn { "No device matches." }
        } @else {
            p.muted aria-live="polite" { "Devices " (first) "–" (last) " of " (page.total) }
            (device_table(&page.devices, now))
            div.pager {
                @if view.page > 1 {
                    a.button.secondary href=(view.href(view.status, view.page - 1)) rel="prev" { "Previous" }
                }
                @if last < page.total {
                    a.button.secondary href=(view.href(view.status, view.page + 1)) rel="next" { "Next" }
                }
            }
        }
    };
    layout(&view.heading, Section::Devices, Some(who), body)
}

/// A table of devices.
pub fn device_table(devices: &[Device], now: i64) -> Markup {
    html! {
        table.stack {
            thead { tr { th { "Device" } th { "Label" } th { "Status" } th { "Site" } th { "Owner" } th { "Model" } th { "Last seen" } } }
            tbody {
                @for d in devices {
                    tr {
                        td data-label="Device" { a.mono href=(device_href(&d.id)) { (d.id) } }
                        td data-label="Label" { (d.label.as_deref().unwrap_or("")) }
                        td data-label="Status" { (status_badge(d.status)) }
                        td data-label="Site" { (d.site) }
                        td data-label="Owner" { (d.owner) }
                        td data-label="Model" { (d.model.as_deref().unwrap_or("")) }
                        td data-label="Last seen" { (last_seen(d.last_seen_at, now)) }
                    }
                }
            }
        }
    }
}

/// A notice after an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Revoked (or retired).
    Revoked,
    /// Suspended.
    Suspended,
    /// Resumed.
    Resumed,
    /// Owner, site or label changed.
    Edited,
    /// The edit form was saved without a change.
    Unchanged,
}

/// Everything the device page shows.
#[derive(Debug)]
pub struct DeviceView<'a> {
    /// The device.
    pub device: &'a Device,
    /// Its batch.
    pub batch: Option<&'a str>,
    /// Its certificates, newest first.
    pub certificates: &'a [CertificateRecord],
    /// Its audit trail, oldest first.
    pub audit: &'a [AuditEntry],
    /// The action just done, if any.
    pub done: Option<Done>,
}

/// The device page: status, facts, actions for operators, certificates and
/// the audit trail.
pub fn device(who: &Principal, view: &DeviceView<'_>, now: i64) -> Markup {
    let d = view.device;
    let current = view
        .certificates
        .iter()
        .find(|c| c.revoked_at.is_none() && c.not_after > now);
    let operator = who.has(Role::Operator);
    let can_revoke = matches!(
        d.status,
        DeviceStatus::Pending
            | DeviceStatus::Active
            | DeviceStatus::Suspect
            | DeviceStatus::Suspended
    );
    let can_suspend = matches!(d.status, DeviceStatus::Active | DeviceStatus::Suspect);
    let can_resume = matches!(d.status, DeviceStatus::Suspended | DeviceStatus::Suspect);
    let csrf = who.session().map(csrf_token).unwrap_or_default();
    let body = html! {
        @match view.done {
            Some(Done::Revoked) => p.notice.ok role="status" {
                "Device " (d.id) " is " (d.status) ". Its connections are closed and its certificates revoked; it can no longer renew."
            },
            Some(Done::Suspended) => p.notice.ok role="status" {
                "Device " (d.id) " is suspended: its certificates are on hold until it is resumed."
            },
            Some(Done::Resumed) => p.notice.ok role="status" {
                "Device " (d.id) " is active again."
            },
            Some(Done::Edited) => p.notice.ok role="status" {
                "Changes to device " (d.id) " saved."
            },
            Some(Done::Unchanged) => p.notice.ok role="status" {
                "Nothing changed: device " (d.id) " already had these values."
            },
            None => {}
        }
        h1 { "Device " span.mono { (d.id) } " " (status_badge(d.status)) }
        div.card {
            dl.facts {
                dt { "Label" } dd { (d.label.as_deref().unwrap_or("—")) }
                dt { "Site" } dd { (d.site) }
                dt { "Owner" } dd { (d.owner) }
                dt { "Model" } dd { (d.model.as_deref().unwrap_or("—")) }
                dt { "Last seen" } dd { (last_seen(d.last_seen_at, now)) }
                dt { "Certificate" } dd {
                    @if let Some(c) = current {
                        "valid until " (time_and_ago(c.not_after, now))
                    } @else if d.status == DeviceStatus::Pending {
                        "none yet (never enrolled)"
                    } @else {
                        "no valid certificate"
                    }
                }
                dt { "Batch" } dd {
                    @if let Some(batch) = view.batch {
                        a.mono href=(format!("/batches/{}", encode(batch))) { (batch) }
                    } @else { "—" }
                }
                dt { "Registered" } dd { (format_time(d.created_at)) " by " (d.created_by) }
            }
        }
        @if operator {
            div.actions {
                a.button.secondary href=(format!("{}/edit", device_href(&d.id))) { "Edit owner, site, label" }
                @if can_revoke {
                    a.button.danger href=(format!("{}/revoke", device_href(&d.id))) { "Revoke…" }
                }
                @if can_suspend {
                    form method="post" action=(format!("{}/suspend", device_href(&d.id))) {
                        input type="hidden" name="csrf" value=(csrf);
                        button.secondary type="submit" { "Suspend" }
                    }
                }
                @if can_resume {
                    form method="post" action=(format!("{}/resume", device_href(&d.id))) {
                        input type="hidden" name="csrf" value=(csrf);
                        button.secondary type="submit" { "Resume" }
                    }
                }
            }
        }
        h2 { "Certificates (" (view.certificates.len()) ")" }
        @if view.certificates.is_empty() {
            p.muted { "No certificate has been issued to this device." }
        } @else {
            table.stack {
                thead { tr { th { "Serial" } th { "State" } th { "Issued" } th { "Valid until" } th { "Renewed from" } } }
                tbody {
                    @for c in view.certificates {
                        tr {
                            td.mono data-label="Serial" { (c.serial) }
                            td data-label="State" { (certificate_state(c, now)) }
                            td.when data-label="Issued" { (format_time(c.issued_at)) }
                            td.when data-label="Valid until" { (format_time(c.not_after)) }
                            td.mono data-label="Renewed from" { (c.renewed_from.as_deref().unwrap_or("—")) }
                        }
                    }
                }
            }
        }
        h2 { "Audit trail" }
        (audit_table(view.audit, false))
    };
    layout(
        &format!("Device {}", d.id),
        Section::Devices,
        Some(who),
        body,
    )
}

/// The revoke confirmation: the reason, and what will happen.
pub fn revoke(who: &Principal, device: &Device, problem: Option<&str>) -> Markup {
    let csrf = who.session().map(csrf_token).unwrap_or_default();
    let reasons = [
        (RevokeReason::Lost, "Lost", "Nobody knows where it is."),
        (RevokeReason::Stolen, "Stolen", "Someone took it."),
        (
            RevokeReason::Compromised,
            "Tampered with or hacked",
            "Its key may be known to someone else.",
        ),
        (
            RevokeReason::Retired,
            "Retired",
            "Taken out of service for good (the device becomes retired).",
        ),
        (
            RevokeReason::Superseded,
            "Replaced",
            "Another device took its place.",
        ),
    ];
    let body = html! {
        h1 { "Revoke device " span.mono { (device.id) } }
        @if let Some(problem) = problem {
            p.notice.error role="alert" { (problem) }
        }
        div.card {
            dl.facts {
                dt { "Label" } dd { (device.label.as_deref().unwrap_or("—")) }
                dt { "Site" } dd { (device.site) }
                dt { "Owner" } dd { (device.owner) }
                dt { "Status" } dd { (status_badge(device.status)) }
            }
        }
        form method="post" action=(format!("{}/revoke", device_href(&device.id))) {
            input type="hidden" name="csrf" value=(csrf);
            fieldset {
                legend { "Why is it revoked?" }
                @for (reason, title, help) in reasons {
                    div.choice {
                        input type="radio" name="reason" id=(format!("reason-{reason}")) value=(reason.as_str()) required;
                        label for=(format!("reason-{reason}")) {
                            (title)
                            small { (help) " Recorded as " span.mono { (reason.crl_reason()) } "." }
                        }
                    }
                }
            }
            div.notice.warn {
                strong { "What will happen:" }
                ul.consequences {
                    li { "The device is cut off within a second: its open connections are closed and new ones are refused." }
                    li { "Its certificates are revoked (published in the CRL and OCSP). It cannot renew." }
                    li { "This cannot be undone. To come back, the device must be registered again as a new device and re-enrolled." }
                }
            }
            div.actions {
                button.danger type="submit" { "Revoke " (device.id) }
                a.button.secondary href=(device_href(&device.id)) { "Cancel" }
            }
        }
    };
    layout(
        &format!("Revoke {}", device.id),
        Section::Devices,
        Some(who),
        body,
    )
}

/// The batches.
pub fn batches(who: &Principal, batches: &[BatchSummary]) -> Markup {
    let body = html! {
        h1 { "Batches" }
        @if batches.is_empty() {
            p.muted { "No batch has been imported (" span.mono { "idgate batch import" } ")." }
        } @else {
            table.stack {
                thead { tr { th { "Batch" } th { "Imported" } th { "Site" } th { "Owner" } th { "Model" } th { "Registered" } th { "Enrolled" } th { "Pending" } th { "Failed" } } }
                tbody {
                    @for b in batches.iter().rev() {
                        tr {
                            td data-label="Batch" { a.mono href=(format!("/batches/{}", encode(&b.id))) { (b.id) } }
                            td data-label="Imported" { (format_time(b.created_at)) }
                            td data-label="Site" { (b.site) }
                            td data-label="Owner" { (b.owner) }
                            td data-label="Model" { (b.model.as_deref().unwrap_or("")) }
                            td data-label="Registered" { (b.registered) }
                            td data-label="Enrolled" { (b.enrolled) }
                            td data-label="Pending" { (b.pending) }
                            td data-label="Failed" { (b.failed) }
                        }
                    }
                }
            }
        }
    };
    layout("Batches", Section::Batches, Some(who), body)
}

/// One batch and a page of its devices.
pub fn batch(
    who: &Principal,
    summary: &BatchSummary,
    page: &DevicePage,
    page_number: i64,
    per_page: i64,
    now: i64,
) -> Markup {
    let shown = (page_number - 1) * per_page + page.devices.len() as i64;
    let href = |n: i64| format!("/batches/{}?page={n}", encode(&summary.id));
    let body = html! {
        h1 { "Batch " span.mono { (summary.id) } }
        div.card {
            dl.facts {
                dt { "Imported" } dd { (format_time(summary.created_at)) " by " (summary.created_by) }
                dt { "Site" } dd { (summary.site) }
                dt { "Owner" } dd { (summary.owner) }
                dt { "Model" } dd { (summary.model.as_deref().unwrap_or("—")) }
                dt { "Devices" } dd {
                    (summary.registered) " registered, " (summary.enrolled) " enrolled, "
                    (summary.pending) " pending, " (summary.failed) " failed"
                }
            }
        }
        h2 { "Devices" }
        (device_table(&page.devices, now))
        div.pager {
            @if page_number > 1 { a.button.secondary href=(href(page_number - 1)) rel="prev" { "Previous" } }
            @if shown < page.total { a.button.secondary href=(href(page_number + 1)) rel="next" { "Next" } }
        }
    };
    layout(
        &format!("Batch {}", summary.id),
        Section::Batches,
        Some(who),
        body,
    )
}

/// The audit log, newest first.
pub fn audit(who: &Principal, query: &str, entries: &[AuditEntry], older: Option<&str>) -> Markup {
    let body = html! {
        h1 { "Audit log" }
        form.search role="search" method="get" action="/audit" {
            label for="q" { "Filter by who, action or device" }
            input #q type="search" name="q" value=(query);
            button type="submit" { "Filter" }
        }
        (audit_table(entries, true))
        @if let Some(older) = older {
            div.pager {
                a.button.secondary rel="next" href=(format!("/audit?q={}&before={}", encode(query), encode(older))) { "Older entries" }
            }
        }
    };
    layout("Audit log", Section::Audit, Some(who), body)
}

fn audit_table(entries: &[AuditEntry], with_device: bool) -> Markup {
    html! {
        @if entries.is_empty() {
            p.muted { "Nothing recorded." }
        } @else {
            table.stack {
                thead { tr {
                    th { "When" } th { "Who" } th { "What" }
                    @if with_device { th { "Device" } }
                    th { "Outcome" } th { "Detail" }
                } }
                tbody {
                    @for e in entries {
                        tr {
                            td.when data-label="When" { (format_time(e.at)) }
                            td data-label="Who" { (e.actor) }
                            td data-label="What" { (e.action) }
                            @if with_device {
                                td data-label="Device" {
                                    @if let Some(id) = &e.device_id { a.mono href=(device_href(id)) { (id) } }
                                }
                            }
                            td data-label="Outcome" { (e.outcome) }
                            td data-label="Detail" { (e.detail) }
                        }
                    }
                }
            }
        }
    }
}

fn status_badge(status: DeviceStatus) -> Markup {
    html! { span class=(format!("status status-{status}")) { (status) } }
}

fn certificate_state(c: &CertificateRecord, now: i64) -> Markup {
    let (class, text) = match (c.revoked_at, c.revocation_reason.as_deref()) {
        (Some(_), Some("certificateHold")) => ("on-hold", "on hold".to_owned()),
        (Some(at), reason) => (
            "revoked",
            format!(
                "revoked {} ({})",
                format_time(at),
                reason.unwrap_or("unspecified")
            ),
        ),
        (None, _) if c.not_after <= now => ("expired", "expired".to_owned()),
        (None, _) => ("valid", "valid".to_owned()),
    };
    html! { span class=(format!("status status-{class}")) { (text) } }
}

fn last_seen(at: Option<i64>, now: i64) -> Markup {
    match at {
        Some(at) => time_and_ago(at, now),
        None => html! { span.muted { "never" } },
    }
}

fn time_and_ago(at: i64, now: i64) -> Markup {
    html! { time datetime=(format_time_iso(at)) { (format_time(at)) } " " span.muted { "(" (ago(at, now)) ")" } }
}

/// `2026-05-04 13:07 UTC`.
pub fn format_time(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| at.to_string())
}

fn format_time_iso(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `5 min ago`, `in 3 h`, `2 days ago`.
pub fn ago(at: i64, now: i64) -> String {
    let delta = now.saturating_sub(at);
    let span = delta.unsigned_abs();
    let amount = match span {
        0..60 => return "just now".to_owned(),
        60..3600 => format!("{} min", span / 60),
        3600..172_800 => format!("{} h", span / 3600),
        _ => format!("{} days", span / 86_400),
    };
    if delta >= 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

fn days(n: i64) -> String {
    if n == 1 {
        "1 day".to_owned()
    } else {
        format!("{n} days")
    }
}

/// The path of a device's page.
pub fn device_href(id: &str) -> String {
    format!("/devices/{}", encode(id))
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a
/// path segment or a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::Via;

    fn viewer() -> Principal {
        Principal {
            name: "vera".into(),
            role: Role::Viewer,
            via: Via::Token,
        }
    }

    fn hostile_device() -> Device {
        Device {
            id: "th-1".into(),
            owner: "<script>alert(1)</script>@x.io".into(),
            site: "\"><img src=x onerror=alert(2)>".into(),
            model: Some("<b>bold</b>".into()),
            status: DeviceStatus::Active,
            created_by: "cli:<i>".into(),
            created_at: 0,
            updated_at: 0,
            renew_counter: 0,
            label: Some("a&b".into()),
            last_seen_at: None,
        }
    }

    #[test]
    fn device_fields_are_escaped_everywhere() {
        let hostile = hostile_device();
        let audit = [AuditEntry::new(1, "user:<svg onload=x>", "device.add")
            .device("th-1")
            .detail("owner=<script>alert(3)</script>")];
        let view = DeviceView {
            device: &hostile,
            batch: Some("<batch>"),
            certificates: &[],
            audit: &audit,
            done: None,
        };
        let pages = [
            device(&viewer(), &view, 10).into_string(),
            revoke(&viewer(), &hostile, Some("<em>problem</em>")).into_string(),
            device_table(std::slice::from_ref(&hostile), 10).into_string(),
            audit_table(&audit, true).into_string(),
        ];
        for page in pages {
            for raw in ["<script", "<img", "<b>", "<svg", "<i>", "<em>", "<batch>"] {
                assert!(!page.contains(raw), "{raw} unescaped in {page}");
            }
        }
        let page = device(&viewer(), &view, 10).into_string();
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;@x.io"));
        assert!(page.contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
        assert!(page.contains("a&amp;b"));
    }

    #[test]
    fn a_viewer_gets_no_action_buttons() {
        let hostile = hostile_device();
        let view = DeviceView {
            device: &hostile,
            batch: None,
            certificates: &[],
            audit: &[],
            done: None,
        };
        let page = device(&viewer(), &view, 10).into_string();
        assert!(!page.contains("Revoke"));
        assert!(!page.contains("/suspend"));
        assert!(!page.contains("/edit"));
        let operator = Principal {
            role: Role::Operator,
            ..viewer()
        };
        let page = device(&operator, &view, 10).into_string();
        assert!(page.contains("/devices/th-1/revoke"));
        assert!(page.contains("/devices/th-1/suspend"));
        assert!(page.contains("/devices/th-1/edit"));
        assert!(!page.contains("/devices/th-1/resume"));
    }

    #[test]
    fn encoding_and_times() {
        assert_eq!(encode("a b&c/d?é"), "a%20b%26c%2Fd%3F%C3%A9");
        assert_eq!(encode("th-1.x_y~"), "th-1.x_y~");
        assert_eq!(format_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(ago(100, 100), "just now");
        assert_eq!(ago(0, 7200), "2 h ago");
        assert_eq!(ago(86_400 * 3, 0), "in 3 days");
        assert_eq!(ago(0, 600), "10 min ago");
    }
}
