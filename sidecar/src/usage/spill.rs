//! The last resort at shutdown: records SQLite refused to the end (its write
//! lock held by another process, say) go to `<db>-unwritten.jsonl`, one
//! [`UsageRecord`] per line, and the next [`super::Store::open`] imports them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use afr_core::usage::UsageRecord;

/// Where the records refused at shutdown wait for the next start.
pub fn spill_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-unwritten.jsonl");
    PathBuf::from(name)
}

/// Appends `records` to the spill file and syncs it.
pub(super) fn spill(db: &Path, records: &[UsageRecord]) -> io::Result<PathBuf> {
    let path = spill_path(db);
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    let mut text = String::new();
    for rec in records {
        text.push_str(&serde_json::to_string(rec).map_err(io::Error::other)?);
        text.push('\n');
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(path)
}

/// The records of a spill file left by an earlier shutdown (none when there
/// is no file). A line that does not parse is logged and skipped.
pub(super) fn read_spilled(db: &Path) -> io::Result<Vec<UsageRecord>> {
    let path = spill_path(db);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(rec) => records.push(rec),
            Err(e) => tracing::error!(
                file = %path.display(),
                line = n + 1,
                error = %e,
                "usage store: skipping an unreadable spilled record"
            ),
        }
    }
    Ok(records)
}

/// Removes the spill file once its records are in the database.
pub(super) fn remove_spilled(db: &Path) -> io::Result<()> {
    match fs::remove_file(spill_path(db)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
