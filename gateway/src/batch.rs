//! Manufacturing batch files: a CSV of device ids, one per row, with optional
//! per-row owner, site, model and label, checked completely before anything is
//! registered so that a bad file is refused with its line number and nothing
//! is half-imported.
//!
//! The format: a header row naming the columns (`id`, or `serial` for the
//! same thing; optional `owner`, `site`, `model`, `label`, in any order), then one row
//! per device. A UTF-8 byte order mark is skipped (spreadsheets write one);
//! cells are trimmed; blank lines are skipped.

use std::collections::HashMap;

use idgate_pki::protocol::check_device_id;

/// Largest batch file accepted: about a million rows of typical length, and
/// small enough to hold in memory while it is checked.
pub const MAX_FILE_BYTES: u64 = 50 * 1024 * 1024;
/// Most devices in one batch: one transaction must stay reasonable.
pub const MAX_ROWS: usize = 1_000_000;

/// What a row gets when it has no owner, site or model cell of its own.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Owner email (already checked).
    pub owner: String,
    /// Site (already checked).
    pub site: String,
    /// Model (already checked).
    pub model: Option<String>,
}

/// One checked row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRow {
    /// Line in the file (1 is the header).
    pub line: u64,
    /// Device id.
    pub id: String,
    /// Owner email.
    pub owner: String,
    /// Site.
    pub site: String,
    /// Model.
    pub model: Option<String>,
    /// The label on the device's case (no default: each case has its own).
    pub label: Option<String>,
}

/// The file cannot be imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchFileError {
    /// A line is wrong.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The file as a whole is wrong.
    #[error("{0}")]
    File(String),
}

fn at(line: u64, reason: impl Into<String>) -> BatchFileError {
    BatchFileError::Line {
        line,
        reason: reason.into(),
    }
}

/// Checks an owner: an email address, one `@`, no spaces or control characters.
pub fn check_owner(owner: &str) -> Result<(), String> {
    let mut parts = owner.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "owner must be an email address (one '@'), got {owner:?}"
        ));
    };
    if local.is_empty()
        || domain.is_empty()
        || owner.len() > 254
        || owner.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("owner must be an email address, got {owner:?}"));
    }
    Ok(())
}

/// Checks a free-text label (site, model): 1–128 printable characters.
pub fn check_label(what: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() || value.len() > 128 || value.chars().any(char::is_control) {
        return Err(format!(
            "{what} must be 1–128 printable characters, got {value:?}"
        ));
    }
    Ok(())
}

/// Checks a batch id: the same syntax as a device id.
pub fn check_batch_id(id: &str) -> Result<(), String> {
    check_device_id(id).map_err(|e| format!("batch id {id:?} {e}"))
}

/// A fresh batch id, `b-YYYYMMDD-HHMMSS-xxxx`: sorts by time, and the random
/// tail keeps two imports in the same second apart.
pub fn new_batch_id(now: i64) -> String {
    let stamp = time::OffsetDateTime::from_unix_timestamp(now)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year][month][day]-[hour][minute][second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| now.to_string());
    format!("b-{stamp}-{:04x}", rand::random::<u16>())
}

#[derive(Clone, Copy)]
enum Column {
    Id,
    Owner,
    Site,
    Model,
    Label,
}

/// Parses and checks a whole batch file. Every row is checked (device id
/// syntax, owner, site, model, duplicates within the file) before any is
/// returned; the first problem is reported with its line.
pub fn parse(bytes: &[u8], defaults: &Defaults) -> Result<Vec<BatchRow>, BatchFileError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(BatchFileError::File(format!(
            "the file is {} bytes; a batch file may be at most {} MB (split it)",
            bytes.len(),
            MAX_FILE_BYTES / (1024 * 1024)
        )));
    }
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(at(
            1,
            "the file is UTF-16; save it as CSV UTF-8 (comma-separated)",
        ));
    }
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(BatchFileError::File(
            "the file is empty (expected a header row `id[,owner,site,model]` and one row per device)"
                .into(),
        ));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let mut records = reader.records();
    let header = next_record(&mut records)?.ok_or_else(|| {
        BatchFileError::File("the file has no header row (expected `id[,owner,site,model]`)".into())
    })?;
    let header_line = line_of(bytes, &header);
    let mut columns = Vec::with_capacity(header.len());
    let mut seen = [false; 5];
    for name in header.iter() {
        let (column, slot) = match name.to_ascii_lowercase().as_str() {
            "id" | "serial" | "device_id" => (Column::Id, 0),
            "owner" => (Column::Owner, 1),
            "site" => (Column::Site, 2),
            "model" => (Column::Model, 3),
            "label" => (Column::Label, 4),
            _ => {
                return Err(at(
                    header_line,
                    format!(
                        "unknown column {name:?} in the header (columns: id, owner, site, model, label)"
                    ),
                ));
            }
        };
        if seen[slot] {
            return Err(at(
                header_line,
                format!("column {name:?} appears twice in the header"),
            ));
        }
        seen[slot] = true;
        columns.push(column);
    }
    if !seen[0] {
        return Err(at(
            header_line,
            "the header has no `id` column (expected a header row like `id,owner,site,model`)",
        ));
    }
    let mut rows: Vec<BatchRow> = Vec::new();
    let mut lines_of: HashMap<String, u64> = HashMap::new();
    while let Some(record) = next_record(&mut records)? {
        let line = line_of(bytes, &record);
        if record.iter().all(str::is_empty) {
            continue;
        }
        if record.len() != columns.len() {
            return Err(at(
                line,
                format!(
                    "{} cells, but the header names {} columns",
                    record.len(),
                    columns.len()
                ),
            ));
        }
        if rows.len() == MAX_ROWS {
            return Err(at(
                line,
                format!("more than {MAX_ROWS} devices in one batch (split the file)"),
            ));
        }
        let mut row = BatchRow {
            line,
            id: String::new(),
            owner: defaults.owner.clone(),
            site: defaults.site.clone(),
            model: defaults.model.clone(),
            label: None,
        };
        for (column, cell) in columns.iter().zip(record.iter()) {
            match column {
                Column::Id => row.id = cell.to_owned(),
                // An empty cell takes the default: a sheet may fill owners
                // for some rows only.
                _ if cell.is_empty() => {}
                Column::Owner => {
                    check_owner(cell).map_err(|e| at(line, e))?;
                    row.owner = cell.to_owned();
                }
                Column::Site => {
                    check_label("site", cell).map_err(|e| at(line, e))?;
                    row.site = cell.to_owned();
                }
                Column::Model => {
                    check_label("model", cell).map_err(|e| at(line, e))?;
                    row.model = Some(cell.to_owned());
                }
                Column::Label => {
                    check_label("label", cell).map_err(|e| at(line, e))?;
                    row.label = Some(cell.to_owned());
                }
            }
        }
        if row.id.is_empty() {
            return Err(at(line, "the device id is empty"));
        }
        check_device_id(&row.id).map_err(|e| at(line, format!("device id {:?} {e}", row.id)))?;
        if let Some(first) = lines_of.insert(row.id.clone(), line) {
            return Err(at(
                line,
                format!("device id {:?} is also on line {first}", row.id),
            ));
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(BatchFileError::File(
            "the file has a header but no devices".into(),
        ));
    }
    Ok(rows)
}

fn next_record(
    records: &mut csv::StringRecordsIter<'_, &[u8]>,
) -> Result<Option<csv::StringRecord>, BatchFileError> {
    match records.next() {
        None => Ok(None),
        Some(Ok(record)) => Ok(Some(record)),
        Some(Err(e)) => {
            let line = e.position().map_or(0, csv::Position::line);
            let reason = match e.kind() {
                csv::ErrorKind::Utf8 { .. } => {
                    "not UTF-8 text (is this a CSV file? save it as CSV UTF-8)".to_owned()
                }
                _ => e.to_string(),
            };
            Err(at(line, reason))
        }
    }
}

/// The line a record starts on, counted from its byte offset: the reader's
/// own line count lags by one after a CRLF or a skipped blank line.
fn line_of(bytes: &[u8], record: &csv::StringRecord) -> u64 {
    let mut offset = record
        .position()
        .map_or(0, |p| usize::try_from(p.byte()).unwrap_or(usize::MAX))
        .min(bytes.len());
    // The offset may point at the line end before the record.
    while offset < bytes.len() && matches!(bytes[offset], b'\r' | b'\n') {
        offset += 1;
    }
    1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            owner: "line@example.com".into(),
            site: "plant-1".into(),
            model: None,
        }
    }

    fn error(text: &[u8]) -> String {
        match parse(text, &defaults()) {
            Ok(rows) => panic!("accepted: {rows:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rows_take_defaults_and_their_own_cells() {
        let rows = parse(
            b"\xef\xbb\xbfid,owner,model\r\nsn-1,,\r\n\r\nsn-2, a@x.io ,th-2\r\n",
            &defaults(),
        )
        .expect("valid file");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "sn-1");
        assert_eq!(rows[0].owner, "line@example.com");
        assert_eq!(rows[0].model, None);
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[1].line, 4);
        assert_eq!(rows[1].owner, "a@x.io");
        assert_eq!(rows[1].site, "plant-1");
        assert_eq!(rows[1].model.as_deref(), Some("th-2"));
    }

    #[test]
    fn labels_come_from_their_column_only() {
        let rows = parse(b"label,id\nB7-F2-014,sn-1\n,sn-2\n", &defaults()).expect("valid file");
        assert_eq!(rows[0].label.as_deref(), Some("B7-F2-014"));
        assert_eq!(rows[1].label, None);
        assert!(error(b"id,label\nsn-1,a\tb\n").contains("line 2: label must be"));
        assert!(error(b"id,label,label\nsn-1,a,b\n").contains("appears twice"));
    }

    #[test]
    fn bad_files_name_the_line() {
        assert_eq!(
            error(b"id\nsn-1\nsn-2\nsn-1\n"),
            "line 4: device id \"sn-1\" is also on line 2"
        );
        assert!(error(b"id\nsn-1\nsn 2\n").starts_with("line 3: device id \"sn 2\""));
        assert!(error(b"id\nsn-1\nsn/2\n").starts_with("line 3: "));
        assert!(error(b"id,owner\nsn-1,nobody\n").starts_with("line 2: owner must be"));
        assert!(error(b"id,site\nsn-1\n").starts_with("line 2: 1 cells, but the header"));
        assert!(error(b"owner,site\na@x.io,s\n").starts_with("line 1: the header has no `id`"));
        assert!(error(b"id,colour\nsn-1,red\n").starts_with("line 1: unknown column"));
        assert!(error(b"id,id\nsn-1,sn-2\n").starts_with("line 1: column"));
        assert_eq!(error(b"id,site\n,s\n"), "line 2: the device id is empty");
        assert!(error(b"id\nsn-1\n\xff\xfe\n").starts_with("line 3: not UTF-8"));
        assert!(error(b"\xff\xfei\0d\0").starts_with("line 1: the file is UTF-16"));
        assert!(error(b"").contains("empty"));
        assert!(error(b"id\n").contains("no devices"));
    }

    #[test]
    fn garbage_is_refused_quickly() {
        // 10 MB of bytes that are no CSV: refused at the first line.
        let garbage: Vec<u8> = (0..10_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        assert!(error(&garbage).starts_with("line "));
        let too_big = vec![b'a'; MAX_FILE_BYTES as usize + 1];
        assert!(error(&too_big).contains("at most 50 MB"));
    }

    #[test]
    fn batch_ids_are_checked_and_made() {
        let id = new_batch_id(1_700_000_000);
        assert!(id.starts_with("b-20231114-221320-"), "{id}");
        assert!(check_batch_id(&id).is_ok());
        assert!(check_batch_id("bad id").is_err());
    }
}
