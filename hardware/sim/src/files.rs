//! The simulated device's flash: its key, certificates and renewal counter as
//! files in one directory. Every file is replaced atomically (a temporary file
//! in the same directory, fsync, rename, fsync of the directory), so a crash
//! leaves either the old or the new contents of each file, never a torn one.

use std::io::{self, Write};
use std::path::Path;

/// The renewal counter file in a device directory.
pub const COUNTER_FILE: &str = "counter";

/// Replaces `path` with `contents` atomically. With `private`, the file is
/// readable by its owner only (0600) from the moment it exists.
pub fn replace_file(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut temporary = name.to_owned();
    temporary.push(format!(".tmp{}", std::process::id()));
    let temporary = dir.join(temporary);

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if private { 0o600 } else { 0o644 });
    let written = (|| {
        let mut file = options.open(&temporary)?;
        // A leftover temporary keeps its old mode through open(); set it again.
        #[cfg(unix)]
        if private {
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written?;
    sync_directory(dir)
}

/// Makes a rename in `dir` durable.
fn sync_directory(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The renewal counter stored in `dir`: a decimal number; 0 if there is no
/// counter file yet.
pub fn read_counter(dir: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(dir.join(COUNTER_FILE)) {
        Ok(text) => text.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{COUNTER_FILE} holds {:?}, not a number", text.trim()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Stores `counter` in `dir`, durably, before it is used: the gateway takes a
/// counter that does not grow for a clone, so it must never go back, whatever
/// happens to the renewal that uses it.
pub fn write_counter(dir: &Path, counter: u64) -> io::Result<()> {
    replace_file(
        &dir.join(COUNTER_FILE),
        format!("{counter}\n").as_bytes(),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        replace_file(&path, b"old", true).unwrap();
        replace_file(&path, b"new", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(replace_file(&dir.path().join("missing/key.pem"), b"x", true).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn counters_start_at_zero_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_counter(dir.path()).unwrap(), 0);
        write_counter(dir.path(), 41).unwrap();
        assert_eq!(read_counter(dir.path()).unwrap(), 41);
        std::fs::write(dir.path().join(COUNTER_FILE), "  7\n").unwrap();
        assert_eq!(read_counter(dir.path()).unwrap(), 7);
        std::fs::write(dir.path().join(COUNTER_FILE), "-1").unwrap();
        assert_eq!(
            read_counter(dir.path()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
