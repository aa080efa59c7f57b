//! Where records go when SQLite will not take them: `<db>-unwritten.jsonl`,
//! one [`UsageRecord`] per line, appended to while the database refuses
//! writes (locked, disk full) or the writer's queue is past its bound, and
//! imported into the database once it takes writes again or at the next
//! [`super::Store::open`].
//!
//! Exactly once: the import commits with `INSERT OR IGNORE` against the
//! unique `request_id` index, and the file is removed only after that commit,
//! under the same lock appenders take; a crash between the two re-imports
//! rows the database already has, which the index ignores.
//!
//! Bounded: past `max_bytes` records are dropped, counted and logged at most
//! once a minute ([`DropLog`]), so a database that never comes back cannot
//! fill the disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use afr_core::usage::UsageRecord;

/// Shortest time between two "records dropped" log lines.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Where records SQLite refused wait for the database.
pub fn spill_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-unwritten.jsonl");
    PathBuf::from(name)
}

/// Rate limit for the "records dropped" log line: at most one per interval,
/// carrying how many were dropped since the last one. Takes the time as a
/// parameter so tests need no clock.
#[derive(Debug)]
pub struct DropLog {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl DropLog {
    /// A limiter allowing one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        DropLog {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts `n` records dropped at `now`; returns how many to report when a
    /// line is due (the first drop, then at most once per interval).
    pub fn note(&mut self, n: u64, now: Instant) -> Option<u64> {
        self.unlogged += n;
        if self.unlogged == 0 {
            return None;
        }
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// What one [`Spill::append`] did with its records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Records now in the spill file.
    pub spilled: u64,
    /// Records dropped: the file is at its cap or cannot be written.
    pub dropped: u64,
}

/// The spill file, shared by the writer thread and recorders that find the
/// queue past its bound.
#[derive(Debug)]
pub struct Spill {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Open for appending; `None` until the first append or after an import.
    file: Option<File>,
    /// Bytes in the file.
    size: u64,
    /// Records in the file as far as this process knows (appended or read).
    records: u64,
    drops: DropLog,
}

impl Spill {
    /// The spill file of database `db`, holding at most `max_bytes`.
    pub fn new(db: &Path, max_bytes: u64) -> Spill {
        Spill {
            path: spill_path(db),
            max_bytes,
            inner: Mutex::new(Inner {
                file: None,
                size: 0,
                records: 0,
                drops: DropLog::new(DROP_LOG_INTERVAL),
            }),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records known to be waiting in the file.
    pub fn records(&self) -> u64 {
        self.lock().records
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the state consistent (a failed write reopens
        // the file), so a poisoned lock is still sound.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records` (syncing the file when `sync`), dropping those past
    /// the cap; drops are logged at most once a minute, as of `now`.
    pub fn append(&self, records: &[UsageRecord], sync: bool, now: Instant) -> Appended {
        let mut inner = self.lock();
        let mut out = Appended::default();
        let mut text = String::new();
        let mut reason = "the spill file is at its cap";
        match inner.open(&self.path) {
            Ok(()) => {
                for rec in records {
                    let line = match serde_json::to_string(rec) {
                        Ok(line) => line,
                        Err(_) => {
                            out.dropped += 1;
                            continue;
                        }
                    };
                    let size = inner.size + text.len() as u64 + line.len() as u64 + 1;
                    if size > self.max_bytes {
                        out.dropped += 1;
                        continue;
                    }
                    text.push_str(&line);
                    text.push('\n');
                    out.spilled += 1;
                }
                if let Err(e) = inner.write(text.as_bytes(), sync) {
                    tracing::error!(file = %self.path.display(), error = %e, "usage store: cannot write the spill file");
                    reason = "the spill file cannot be written";
                    out.dropped += out.spilled;
                    out.spilled = 0;
                }
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "usage store: cannot open the spill file");
                reason = "the spill file cannot be opened";
                out.dropped = records.len() as u64;
            }
        }
        inner.records += out.spilled;
        if let Some(n) = inner.drops.note(out.dropped, now) {
            tracing::error!(
                dropped = n,
                file = %self.path.display(),
                max_bytes = self.max_bytes,
                "usage store: usage records dropped: the database refuses writes and {reason} \
                 (logged at most once a minute; total in afr_usage_dropped_total)"
            );
        }
        out
    }

    /// Syncs what was appended without syncing.
    pub fn sync(&self) -> io::Result<()> {
        match &self.lock().file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Reads the file and hands its records to `commit`; removes the file
    /// only once `commit` succeeded. Appenders wait meanwhile, so no record
    /// lands in a file about to be removed. Returns how many were imported.
    pub fn import<E: std::fmt::Display>(
        &self,
        commit: impl FnOnce(&[UsageRecord]) -> Result<(), E>,
    ) -> Result<usize, String> {
        let mut inner = self.lock();
        // Flush our handle's view first: reading goes through a new one.
        inner.file = None;
        let records = read_spilled(&self.path).map_err(|e| format!("reading it: {e}"))?;
        inner.records = records.len() as u64;
        if !records.is_empty() {
            commit(&records).map_err(|e| e.to_string())?;
        }
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(format!("removing it: {e}"));
            }
            _ => {}
        }
        inner.size = 0;
        inner.records = 0;
        Ok(records.len())
    }
}

impl Inner {
    /// Opens the file for appending once, ending a torn last line (a crash
    /// mid-write) so the next record starts on a line of its own.
    fn open(&mut self, path: &Path) -> io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let mut size = file.metadata()?.len();
        if size > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                size += 1;
            }
        }
        self.size = size;
        self.file = Some(file);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("spill file not open"));
        };
        let written = file
            .write_all(bytes)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.size += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of it may be there: reopen (and end the torn line) next time.
                self.file = None;
                Err(e)
            }
        }
    }
}

/// The records of a spill file (none when there is no file). A line that
/// does not parse is logged and skipped.
pub(super) fn read_spilled(path: &Path) -> io::Result<Vec<UsageRecord>> {
    let file = match File::open(path) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use afr_core::usage::TokenSource;

    fn rec(i: u64) -> UsageRecord {
        UsageRecord {
            ts_ms: 1,
            request_id: format!("req-{i}"),
            key_id: "k".into(),
            model: "m".into(),
            provider: "p".into(),
            upstream_model: "u".into(),
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
            token_source: TokenSource::Provider,
            latency_ms: 4,
            ttft_ms: None,
            status: 200,
            stream: false,
            truncated: false,
            cost_nanos: None,
            ..UsageRecord::default()
        }
    }

    #[test]
    fn drop_log_speaks_at_most_once_a_minute_with_the_count_since() {
        let t0 = Instant::now();
        let mut log = DropLog::new(DROP_LOG_INTERVAL);
        assert_eq!(log.note(0, t0), None, "nothing dropped, nothing said");
        assert_eq!(log.note(3, t0), Some(3), "the first drop is logged at once");
        assert_eq!(log.note(2, t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(5, t0 + Duration::from_secs(59)), None);
        assert_eq!(log.note(1, t0 + Duration::from_secs(60)), Some(8));
        assert_eq!(log.note(0, t0 + Duration::from_secs(200)), None);
        assert_eq!(log.note(1, t0 + Duration::from_secs(200)), Some(1));
    }

    #[test]
    fn past_the_cap_records_are_dropped_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("u.db");
        let line = serde_json::to_string(&rec(0)).expect("json").len() as u64 + 1;
        let spill = Spill::new(&db, line * 3);
        let records: Vec<_> = (0..5).map(rec).collect();
        let now = Instant::now();
        assert_eq!(
            spill.append(&records, true, now),
            Appended {
                spilled: 3,
                dropped: 2
            }
        );
        assert_eq!(
            spill.append(&records[..1], false, now),
            Appended {
                spilled: 0,
                dropped: 1
            }
        );
        assert_eq!(spill.records(), 3);
        assert!(fs::metadata(spill.path()).expect("file").len() <= line * 3);
        assert_eq!(read_spilled(spill.path()).expect("read").len(), 3);
    }

    #[test]
    fn import_removes_the_file_only_after_the_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("u.db");
        let spill = Spill::new(&db, u64::MAX);
        spill.append(&[rec(1), rec(2)], true, Instant::now());
        let failed = spill.import(|_| Err("database is locked"));
        assert_eq!(failed, Err("database is locked".to_owned()));
        assert!(spill.path().exists(), "kept for the next attempt");
        let mut seen = Vec::new();
        let n = spill
            .import(|records| {
                seen.extend(records.iter().map(|r| r.request_id.clone()));
                Ok::<_, String>(())
            })
            .expect("import");
        assert_eq!((n, seen.len()), (2, 2));
        assert!(!spill.path().exists());
        // Appending again starts a new file.
        spill.append(&[rec(3)], true, Instant::now());
        assert_eq!(read_spilled(spill.path()).expect("read").len(), 1);
    }

    #[test]
    fn a_torn_last_line_does_not_swallow_the_next_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("u.db");
        let path = spill_path(&db);
        let whole = serde_json::to_string(&rec(1)).expect("json");
        // A crash mid-write left half a record without its newline.
        fs::write(&path, format!("{whole}\n{}", &whole[..whole.len() / 2])).expect("write");
        let spill = Spill::new(&db, u64::MAX);
        spill.append(&[rec(2)], true, Instant::now());
        let ids: Vec<_> = read_spilled(&path)
            .expect("read")
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(ids, ["req-1", "req-2"]);
    }
}
