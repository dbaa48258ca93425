//! Editing a device's owner, site and label from the console
//! (`/devices/{id}/edit`): the form, and its post, which applies the same
//! checks as the API's `PATCH /api/v1/devices/{id}` ([`check_edit`]) and
//! records the change in the device's audit trail under the account.

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use tracing::info;

use super::pages::{self, Section, device_href};
use super::{Page, Refusal, Staff, internal, require, unknown_device};
use crate::api::auth::{Principal, Role, csrf_token};
use crate::api::devices::{EditProblem, check_edit};
use crate::api::state::AdminState;
use crate::registry::{Device, DeviceEdit, now};

/// What the form shows in its fields: the stored values, or what was typed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub(super) struct EditForm {
    #[serde(default)]
    owner: String,
    #[serde(default)]
    site: String,
    #[serde(default)]
    label: String,
}

impl EditForm {
    fn from_device(device: &Device) -> EditForm {
        EditForm {
            owner: device.owner.clone(),
            site: device.site.clone(),
            label: device.label.clone().unwrap_or_default(),
        }
    }

    /// The edit this form asks for. Surrounding spaces (a phone keyboard's
    /// habit) are dropped; an empty label removes the label.
    fn edit(&self) -> DeviceEdit {
        let label = self.label.trim();
        DeviceEdit {
            owner: Some(self.owner.trim().to_owned()),
            site: Some(self.site.trim().to_owned()),
            label: Some((!label.is_empty()).then(|| label.to_owned())),
        }
    }
}

async fn device_or_404(state: &AdminState, who: &Principal, id: &str) -> Result<Device, Refusal> {
    state
        .registry
        .device(id)
        .await
        .map_err(|e| internal(who, e))?
        .ok_or_else(|| unknown_device(who, id))
}

/// `GET /devices/{id}/edit`: the form with the current values.
pub(super) async fn edit_form(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
) -> Page {
    require(&who, Role::Operator, "edit devices")?;
    let device = device_or_404(&state, &who, &id).await?;
    Ok(page(&who, &device, &EditForm::from_device(&device), None))
}

/// `POST /devices/{id}/edit` (the CSRF token is checked before this runs):
/// the device page after a change, or the form again saying what is wrong.
pub(super) async fn edit(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
    Form(form): Form<EditForm>,
) -> Result<Response, Refusal> {
    require(&who, Role::Operator, "edit devices")?;
    let before = device_or_404(&state, &who, &id).await?;
    let edit = form.edit();
    if let Err(problem) = check_edit(&edit) {
        return Ok((
            StatusCode::BAD_REQUEST,
            page(&who, &before, &form, Some(&problem)),
        )
            .into_response());
    }
    let after = state
        .registry
        .edit_device(&id, &edit, &who.actor(), now())
        .await
        .map_err(|e| internal(&who, e))?
        .ok_or_else(|| unknown_device(&who, &id))?;
    let done = if after == before {
        "unchanged"
    } else {
        info!(device_id = %id, actor = %who.actor(), "device edited from the console");
        "edited"
    };
    Ok(Redirect::to(&format!("{}?done={done}", device_href(&id))).into_response())
}

/// The edit form: owner, site and label, with the problem of the last post
/// above it and on the field it concerns.
fn page(
    who: &Principal,
    device: &Device,
    values: &EditForm,
    problem: Option<&EditProblem>,
) -> Markup {
    let csrf = who.session().map(csrf_token).unwrap_or_default();
    let invalid = |field: &str| problem.is_some_and(|p| p.field == field).then_some("true");
    let body = html! {
        h1 { "Edit device " span.mono { (device.id) } }
        @if let Some(problem) = problem {
            p.notice.error #problem role="alert" { (problem.message) }
        }
        form.edit method="post" action=(format!("{}/edit", device_href(&device.id))) {
            input type="hidden" name="csrf" value=(csrf);
            label for="owner" { "Owner (email address)" }
            input #owner type="text" name="owner" value=(values.owner) required
                inputmode="email" autocomplete="off" autocapitalize="none" spellcheck="false"
                aria-invalid=[invalid("owner")]
                aria-describedby=[invalid("owner").map(|_| "problem")];
            label for="site" { "Site" }
            input #site type="text" name="site" value=(values.site) required
                aria-invalid=[invalid("site")]
                aria-describedby=[invalid("site").map(|_| "problem")];
            label for="label" { "Label on the case" }
            input #label type="text" name="label" value=(values.label)
                aria-invalid=[invalid("label")]
                aria-describedby=(if invalid("label").is_some() { "label-help problem" } else { "label-help" });
            small #label-help { "Leave empty to remove the label." }
            p.muted { "The change is recorded in the device's audit trail under your name (" (who.actor()) ")." }
            div.actions {
                button type="submit" { "Save changes" }
                a.button.secondary href=(device_href(&device.id)) { "Cancel" }
            }
        }
    };
    pages::layout(
        &format!("Edit {}", device.id),
        Section::Devices,
        Some(who),
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::Via;
    use crate::registry::DeviceStatus;

    fn device() -> Device {
        Device {
            id: "th-1".into(),
            owner: "a@x.io".into(),
            site: "\"><script>alert(1)</script>".into(),
            model: None,
            status: DeviceStatus::Active,
            created_by: "cli:test".into(),
            created_at: 0,
            updated_at: 0,
            renew_counter: 0,
            label: None,
            last_seen_at: None,
        }
    }

    #[test]
    fn the_form_trims_and_an_empty_label_removes_it() {
        let form = EditForm {
            owner: " b@x.io ".into(),
            site: "paris\t".into(),
            label: "  ".into(),
        };
        assert_eq!(
            form.edit(),
            DeviceEdit {
                owner: Some("b@x.io".into()),
                site: Some("paris".into()),
                label: Some(None),
            }
        );
    }

    #[test]
    fn every_input_has_a_label_and_values_are_escaped() {
        let who = Principal {
            name: "olga".into(),
            role: Role::Operator,
            via: Via::Token,
        };
        let device = device();
        let problem = EditProblem {
            field: "owner",
            code: "invalid_owner",
            message: "owner must be an email address, got \"<b>\"".into(),
        };
        let html = page(
            &who,
            &device,
            &EditForm::from_device(&device),
            Some(&problem),
        )
        .into_string();
        for id in ["owner", "site", "label"] {
            assert!(html.contains(&format!("<label for=\"{id}\">")), "{id}");
            assert!(html.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert!(!html.contains("<script>") && !html.contains("<b>"));
        assert!(html.contains("value=\"&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert!(html.contains("aria-invalid=\"true\""));
    }
}
