//! The station's tokens: the `id,token` file `idgate batch import` wrote, and
//! a journal beside it so that an id handed to one device is never handed to
//! another, even across station restarts (the device holds that token now;
//! if its unit failed, the same device comes back and reports its id).
//!
//! A token leaves the pool only for an id the station itself assigned
//! (journaled `assigned`), that has not passed, and that no other fixture is
//! working on right now: whatever id a board on the fixture claims, it cannot
//! collect the batch's other tokens (docs/threat-model.md).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use idgate_pki::protocol::check_device_id;

/// The tokens file or the journal could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokensError {
    /// Reading or writing failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A line of the tokens file is not `id,token`.
    #[error("{0}: line {1}: {2}")]
    Format(PathBuf, usize, String),
}

/// Why a unit that reports an id is not given that id's token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The id is not in the tokens file.
    #[error("the device claims id {0:?}, which is not in this station's tokens file")]
    NotInFile(String),
    /// The station never gave this id to a unit.
    #[error("the device claims id {0:?}, which this station never assigned to a unit")]
    NeverAssigned(String),
    /// A unit with this id passed already.
    #[error("the device claims id {0:?}, which has passed already")]
    Passed(String),
    /// Another fixture is running a unit with this id.
    #[error("the device claims id {0:?}, which another fixture is working on")]
    InUse(String),
}

/// Where a device's id comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The device id.
    pub device_id: String,
    /// Its one-time enrollment token.
    pub token: String,
}

/// The token pool of one station run, shared by its fixtures.
#[derive(Debug)]
pub struct TokenPool {
    /// In file order.
    ids: Vec<String>,
    tokens: HashMap<String, String>,
    state: Mutex<PoolState>,
    journal_path: PathBuf,
}

#[derive(Debug)]
struct PoolState {
    next: usize,
    /// Ids given to a unit (journaled `assigned`), this run or before.
    assigned: HashSet<String>,
    /// Ids whose unit passed (journaled `pass`).
    passed: HashSet<String>,
    /// Ids a unit is running with right now.
    active: HashSet<String>,
    journal: Option<std::fs::File>,
}

impl TokenPool {
    /// Reads `tokens` (`id,token` lines, header `id,token`) and the journal
    /// (default: the tokens file's name + `.journal`), creating it if needed.
    pub fn open(tokens: &Path, journal: Option<&Path>) -> Result<TokenPool, TokensError> {
        let text =
            std::fs::read_to_string(tokens).map_err(|e| TokensError::Io(tokens.to_owned(), e))?;
        let mut ids = Vec::new();
        let mut map = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim_end_matches('\r');
            if line.is_empty() || (number == 1 && line == "id,token") {
                continue;
            }
            let bad = |why: &str| TokensError::Format(tokens.to_owned(), number, why.to_owned());
            let (id, token) = line
                .split_once(',')
                .ok_or_else(|| bad("expected `id,token`"))?;
            check_device_id(id).map_err(|e| bad(&format!("device id {e}")))?;
            if token.is_empty() || token.len() > idgate_pki::link::MAX_TOKEN || token.contains(',')
            {
                return Err(bad("the token is empty, too long or has a comma"));
            }
            if map.insert(id.to_owned(), token.to_owned()).is_some() {
                return Err(bad("device id listed twice"));
            }
            ids.push(id.to_owned());
        }
        let journal_path = journal.map(Path::to_owned).unwrap_or_else(|| {
            let mut name = tokens.as_os_str().to_owned();
            name.push(".journal");
            PathBuf::from(name)
        });
        let mut assigned = HashSet::new();
        let mut passed = HashSet::new();
        match std::fs::read_to_string(&journal_path) {
            Ok(text) => {
                // Only the station's own `assigned` lines give an id out;
                // `fail` and `skip` lines name whatever id a unit reported.
                for line in text.lines() {
                    let mut fields = line.split(',');
                    match (fields.next(), fields.next()) {
                        (Some("assigned"), Some(id)) => {
                            assigned.insert(id.to_owned());
                        }
                        (Some("pass"), Some(id)) => {
                            passed.insert(id.to_owned());
                        }
                        _ => {}
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TokensError::Io(journal_path, e)),
        }
        let journal = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&journal_path)
                .map_err(|e| TokensError::Io(journal_path.clone(), e))?
        };
        Ok(TokenPool {
            ids,
            tokens: map,
            state: Mutex::new(PoolState {
                next: 0,
                assigned,
                passed,
                active: HashSet::new(),
                journal: Some(journal),
            }),
            journal_path,
        })
    }

    /// Ids in the file that no device has been given yet.
    pub fn remaining(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.ids
            .iter()
            .filter(|id| !state.assigned.contains(*id))
            .count()
    }

    /// All ids of the file.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the file had no ids.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The journal's path.
    pub fn journal_path(&self) -> &Path {
        &self.journal_path
    }

    /// The next id no device has had, journaled as assigned before it is
    /// returned, and held for the caller until [`TokenPool::release`].
    /// `Ok(None)` when every id is taken.
    pub fn assign_next(&self) -> Result<Option<Assignment>, TokensError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.next < self.ids.len() {
            let id = self.ids[state.next].clone();
            state.next += 1;
            if state.assigned.contains(&id) {
                continue;
            }
            self.journal(&mut state, &format!("assigned,{id}"))?;
            state.assigned.insert(id.clone());
            state.active.insert(id.clone());
            let token = self.tokens.get(&id).cloned().unwrap_or_default();
            return Ok(Some(Assignment {
                device_id: id,
                token,
            }));
        }
        Ok(None)
    }

    /// The token of a unit that reports it holds `device_id` already (it
    /// lost power or its unit failed after the station gave it that id):
    /// given only if this station assigned the id, no unit with it passed,
    /// and no other fixture holds it now. Held for the caller until
    /// [`TokenPool::release`].
    pub fn reclaim(&self, device_id: &str) -> Result<Assignment, Refusal> {
        let Some(token) = self.tokens.get(device_id) else {
            return Err(Refusal::NotInFile(device_id.to_owned()));
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.assigned.contains(device_id) {
            return Err(Refusal::NeverAssigned(device_id.to_owned()));
        }
        if state.passed.contains(device_id) {
            return Err(Refusal::Passed(device_id.to_owned()));
        }
        if !state.active.insert(device_id.to_owned()) {
            return Err(Refusal::InUse(device_id.to_owned()));
        }
        Ok(Assignment {
            device_id: device_id.to_owned(),
            token: token.clone(),
        })
    }

    /// Ends the hold [`TokenPool::assign_next`] or [`TokenPool::reclaim`]
    /// took on `device_id` (its unit is over; record its outcome first).
    pub fn release(&self, device_id: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.active.remove(device_id);
    }

    /// Records a unit's outcome in the journal.
    pub fn record(&self, device_id: &str, outcome: &str, detail: &str) -> Result<(), TokensError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let detail = detail.replace(['\n', '\r', ','], " ");
        self.journal(&mut state, &format!("{outcome},{device_id},{detail}"))?;
        if outcome == "pass" {
            state.passed.insert(device_id.to_owned());
        }
        Ok(())
    }

    fn journal(&self, state: &mut PoolState, line: &str) -> Result<(), TokensError> {
        let Some(file) = state.journal.as_mut() else {
            return Ok(());
        };
        writeln!(file, "{line}")
            .and_then(|()| file.sync_data())
            .map_err(|e| TokensError::Io(self.journal_path.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_are_handed_out_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("b.tokens.csv");
        std::fs::write(&tokens, "id,token\na-1,tok1\na-2,tok2\na-3,tok3\n").unwrap();
        let pool = TokenPool::open(&tokens, None).unwrap();
        assert_eq!(pool.assign_next().unwrap().unwrap().device_id, "a-1");
        pool.record("a-1", "pass", "0abc").unwrap();
        pool.release("a-1");
        drop(pool);
        let pool = TokenPool::open(&tokens, None).unwrap();
        assert_eq!(pool.remaining(), 2);
        assert_eq!(pool.assign_next().unwrap().unwrap().device_id, "a-2");
        assert_eq!(pool.assign_next().unwrap().unwrap().device_id, "a-3");
        assert_eq!(pool.assign_next().unwrap(), None);
    }

    #[test]
    fn a_token_goes_only_to_an_id_the_station_assigned_and_not_passed() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("b.tokens.csv");
        std::fs::write(&tokens, "id,token\na-1,tok1\na-2,tok2\na-3,tok3\n").unwrap();
        let pool = TokenPool::open(&tokens, None).unwrap();
        // Claims of ids nobody was given, or not in the file at all.
        assert_eq!(
            pool.reclaim("a-3"),
            Err(Refusal::NeverAssigned("a-3".into()))
        );
        assert_eq!(pool.reclaim("zz-9"), Err(Refusal::NotInFile("zz-9".into())));
        // The unit given a-1 is still running: nobody else gets its token.
        assert_eq!(pool.assign_next().unwrap().unwrap().device_id, "a-1");
        assert_eq!(pool.reclaim("a-1"), Err(Refusal::InUse("a-1".into())));
        // It failed; the same device comes back and gets its token again.
        pool.record("a-1", "fail", "timed out").unwrap();
        pool.release("a-1");
        assert_eq!(pool.reclaim("a-1").unwrap().token, "tok1");
        // Once it passed, the id's token is never handed out again.
        pool.record("a-1", "pass", "0abc").unwrap();
        pool.release("a-1");
        assert_eq!(pool.reclaim("a-1"), Err(Refusal::Passed("a-1".into())));
        // A refused claim is journaled as a failure but gives nothing away:
        // after a restart a-3 is still unassigned, a-1 still passed.
        pool.record("a-3", "fail", "never assigned").unwrap();
        pool.record("a-2", "skip", "already enrolled").unwrap();
        drop(pool);
        let pool = TokenPool::open(&tokens, None).unwrap();
        assert_eq!(pool.remaining(), 2);
        assert_eq!(
            pool.reclaim("a-3"),
            Err(Refusal::NeverAssigned("a-3".into()))
        );
        assert_eq!(pool.reclaim("a-1"), Err(Refusal::Passed("a-1".into())));
        assert_eq!(pool.assign_next().unwrap().unwrap().device_id, "a-2");
    }

    #[test]
    fn bad_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("t.csv");
        for (text, line) in [
            ("id,token\na-1\n", 2),
            ("id,token\na/1,x\n", 2),
            ("id,token\na-1,x\na-1,y\n", 3),
            ("id,token\na-1,\n", 2),
        ] {
            std::fs::write(&tokens, text).unwrap();
            match TokenPool::open(&tokens, None) {
                Err(TokensError::Format(_, n, _)) => assert_eq!(n, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }
}
