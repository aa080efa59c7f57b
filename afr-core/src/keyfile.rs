//! Reading the keys file only whole: a read that raced a writer is refused.
//!
//! The nginx module re-reads `keys.toml` when its [`FileStamp`] (mtime, size,
//! inode) changes. A file written in place (`cat > keys.toml`, an editor
//! that truncates then writes) can be read half-written, and a prefix of a
//! keys file is often a valid keys file with fewer keys (or none). So a read
//! counts only if the stamp is the same after the read as the one taken
//! before it ([`load_stable`]); otherwise the caller tries again on its next
//! tick. Kept here, beside the parser, so the race is tested under
//! `cargo test` with real threads and a real file.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::keys::{KeyFileError, KeyTable};

/// What identifies one version of the keys file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    // No 128-bit fields: nginx pools align to 8 bytes only, and the module
    // keeps a stamp in its pool-allocated main conf.
    mtime_s: i64,
    mtime_ns: i64,
    size: u64,
    ino: u64,
}

impl FileStamp {
    /// The stamp of `path` now, `None` when it cannot be stat'ed.
    pub fn of(path: &Path) -> Option<FileStamp> {
        Self::stat(path).ok()
    }

    /// The stamp of `path` now, or why it cannot be stat'ed.
    pub fn stat(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            mtime_s: m.mtime(),
            mtime_ns: m.mtime_nsec(),
            size: m.size(),
            ino: m.ino(),
        })
    }
}

/// Why a keys file could not be turned into a table.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read (permissions, gone): worth retrying every
    /// tick, since a `chmod` changes no part of the stamp.
    #[error("cannot read keys file \"{path}\": {source}")]
    Io {
        /// The file, as shown in logs.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file changed while it was read: retried on the next tick.
    #[error("keys file \"{0}\" changed while it was read")]
    Unstable(String),
    /// The file was read whole and is invalid: logged once per version.
    #[error(transparent)]
    Invalid(#[from] KeyFileError),
}

/// Reads and parses the keys file whose stamp was `before`, accepting the
/// read only if the stamp is still `before` afterwards.
pub fn load_stable(path: &Path, before: FileStamp) -> Result<KeyTable, LoadError> {
    load_stable_with(path, before, |p| std::fs::read_to_string(p))
}

/// [`load_stable`] with the read itself passed in, so a test can put a
/// writer exactly in the middle of it.
fn load_stable_with(
    path: &Path,
    before: FileStamp,
    read: impl FnOnce(&Path) -> std::io::Result<String>,
) -> Result<KeyTable, LoadError> {
    let shown = || path.display().to_string();
    let io = |source| LoadError::Io {
        path: shown(),
        source,
    };
    let text = read(path).map_err(io)?;
    if FileStamp::stat(path).map_err(io)? != before {
        return Err(LoadError::Unstable(shown()));
    }
    Ok(KeyTable::parse(&shown(), &text)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    const HEADER: &str = "[defaults]\nrpm = 60\n\n";

    /// A keys file of `n` entries of one length, ids `{prefix}00`, `{prefix}01`, …
    fn keys_file(prefix: char, n: usize) -> String {
        let mut s = String::from(HEADER);
        for i in 0..n {
            s.push_str(&format!(
                "[[key]]\nid = \"{prefix}{i:02}\"\nname = \"key\"\nhash = \"sha256:{:064x}\"\n\n",
                i + 1
            ));
        }
        s
    }

    fn ids(t: &KeyTable) -> Vec<String> {
        (0..t.len() as u32)
            .filter_map(|i| t.get(i).map(|k| k.id.clone()))
            .collect()
    }

    /// A writer rewrites the file in place while it is being read: the first
    /// half of the read sees the old version, the second half the new one.
    /// The torn text is itself a valid keys file (old keys a00–a04, new keys
    /// b05–b10: a table no one wrote), so only the stamp check stands between
    /// it and the workers.
    #[test]
    fn a_read_torn_by_an_in_place_writer_is_refused() {
        let dir = std::env::temp_dir().join(format!("afr-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        let (old, new) = (keys_file('a', 10), keys_file('b', 11));
        let entry = (old.len() - HEADER.len()) / 10;
        let cut = HEADER.len() + 5 * entry;
        std::fs::write(&path, &old).unwrap();
        let before = FileStamp::of(&path).unwrap();

        let mut torn = String::new();
        let result = load_stable_with(&path, before, |p| {
            let mut f = std::fs::File::open(p)?;
            let mut head = vec![0; cut];
            f.read_exact(&mut head)?;
            // `cat new > keys.toml` runs now, between the reader's two reads.
            let mut w = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(p)?;
            w.write_all(new.as_bytes())?;
            f.seek(SeekFrom::Start(cut as u64))?;
            let mut tail = String::new();
            f.read_to_string(&mut tail)?;
            torn = String::from_utf8(head).unwrap() + &tail;
            Ok(torn.clone())
        });
        std::fs::remove_dir_all(&dir).ok();

        let served = KeyTable::parse("keys.toml", &torn).expect("the torn text parses");
        let mixed: Vec<String> = (0..5)
            .map(|i| format!("a{i:02}"))
            .chain((5..11).map(|i| format!("b{i:02}")))
            .collect();
        assert_eq!(ids(&served), mixed);
        assert!(
            matches!(result, Err(LoadError::Unstable(_))),
            "a torn read was accepted: {:?}",
            result.map(|t| ids(&t))
        );
    }

    #[test]
    fn an_untouched_file_loads() {
        let dir = std::env::temp_dir().join(format!("afr-whole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(&path, keys_file('a', 3)).unwrap();
        let before = FileStamp::of(&path).unwrap();
        let table = load_stable(&path, before);
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(ids(&table.unwrap()), ["a00", "a01", "a02"]);
    }
}
