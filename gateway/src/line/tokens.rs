//! The station's tokens: the `id,token` file `idgate batch import` wrote, and
//! a journal beside it so that an id handed to one device is never handed to
//! another, even across station restarts (the device holds that token now;
//! if its unit failed, the same device comes back and reports its id).

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
    assigned: HashSet<String>,
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
        match std::fs::read_to_string(&journal_path) {
            Ok(text) => {
                for line in text.lines() {
                    if let Some(id) = line.split(',').nth(1) {
                        assigned.insert(id.to_owned());
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
    /// returned. `Ok(None)` when every id is taken.
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
            let token = self.tokens.get(&id).cloned().unwrap_or_default();
            return Ok(Some(Assignment {
                device_id: id,
                token,
            }));
        }
        Ok(None)
    }

    /// The token of a device that already holds an id (it reported it).
    pub fn token_for(&self, device_id: &str) -> Option<Assignment> {
        self.tokens.get(device_id).map(|token| Assignment {
            device_id: device_id.to_owned(),
            token: token.clone(),
        })
    }

    /// Records a unit's outcome in the journal.
    pub fn record(&self, device_id: &str, outcome: &str, detail: &str) -> Result<(), TokensError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.assigned.insert(device_id.to_owned());
        let detail = detail.replace(['\n', '\r', ','], " ");
        self.journal(&mut state, &format!("{outcome},{device_id},{detail}"))
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
        assert_eq!(pool.token_for("a-3").unwrap().token, "tok3");
        drop(pool);
        let pool = TokenPool::open(&tokens, None).unwrap();
        assert_eq!(pool.remaining(), 2);
        assert_eq!(pool.assign_next().unwrap().unwrap().device_id, "a-2");
        assert_eq!(pool.assign_next().unwrap().unwrap().device_id, "a-3");
        assert_eq!(pool.assign_next().unwrap(), None);
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
