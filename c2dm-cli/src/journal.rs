//! The broadcast journal: one JSON line per final delivery, flushed as it is written, and what
//! a resumed run learns from it.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use c2dm_core::{Delivery, OutcomeKind};
use serde::{Deserialize, Serialize};

use crate::error::CliError;

/// One line of the journal: what became of the message to one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalLine {
    pub registration_id: String,
    pub outcome: OutcomeKind,
    pub message_id: Option<String>,
    pub error: Option<String>,
    pub remove: bool,
    pub attempts: u32,
    /// Sends of this message (in this run and, after `--resume`, in earlier ones) that may
    /// have reached the device without an answer saying so: each may be one more copy.
    #[serde(default)]
    pub possible_duplicates: u32,
}

impl JournalLine {
    pub fn of(delivery: &Delivery) -> Self {
        Self {
            registration_id: delivery.registration_id().to_string(),
            outcome: delivery.outcome().kind(),
            message_id: delivery.message_id().map(ToString::to_string),
            error: delivery.error_text(),
            remove: delivery.should_remove(),
            attempts: delivery.attempts(),
            possible_duplicates: delivery.possible_duplicates(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a journal line always serialises")
    }
}

/// A line about the run rather than one device: the ids could not all be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEvent {
    /// `ids_read_error`.
    pub event: String,
    pub error: String,
    /// How many ids were read before it.
    pub ids_read: u64,
}

impl JournalEvent {
    pub fn ids_read_error(error: &str, ids_read: u64) -> Self {
        Self {
            event: "ids_read_error".into(),
            error: error.to_owned(),
            ids_read,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a journal event always serialises")
    }
}

/// What an earlier run's journal says, for `--resume`.
#[derive(Debug, Default)]
pub struct Resume {
    /// Ids accepted or rejected for good: not sent again.
    pub done: HashSet<String>,
    /// Ids not done whose earlier sends may have reached the device, with how many times:
    /// sending them again may deliver a second copy, so their new lines carry the count on.
    pub maybe_sent: HashMap<String, u32>,
}

/// Reads a journal for `--resume`. Lines that do not read as journal lines (torn by a crash
/// while writing) are skipped with a warning: their ids are sent again, which may duplicate but
/// never loses a message. Event lines are skipped.
pub fn resume_from(path: &Path) -> Result<Resume, CliError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Resume::default()),
        Err(e) => {
            return Err(CliError::Usage(format!(
                "--journal: cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let mut resume = Resume::default();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| CliError::Usage(format!("--journal: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<JournalLine>(&line) {
            Ok(entry) if entry.outcome.is_final() => {
                resume.maybe_sent.remove(&entry.registration_id);
                resume.done.insert(entry.registration_id);
            }
            Ok(entry) => {
                if entry.possible_duplicates > 0 {
                    // The latest line of an id carries the earlier counts on already.
                    resume
                        .maybe_sent
                        .insert(entry.registration_id, entry.possible_duplicates);
                }
            }
            Err(_) if serde_json::from_str::<JournalEvent>(&line).is_ok() => {}
            Err(e) => {
                tracing::warn!(line = n + 1, %e, "skipping an unreadable journal line");
            }
        }
    }
    Ok(resume)
}

/// Appends lines, flushing each one, so a crash loses at most what was in flight. The file is
/// created readable by its owner only: registration ids identify people's devices.
pub struct LineWriter {
    out: BufWriter<File>,
    needs_newline: bool,
}

impl LineWriter {
    /// Opens `path` for appending (creating it, mode 0600); with `fresh`, an existing non-empty
    /// file is an error, so two runs are never mixed up by accident.
    pub fn open(flag: &str, path: &Path, fresh: bool) -> Result<Self, CliError> {
        let existing = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if fresh && existing > 0 {
            return Err(CliError::Usage(format!(
                "{flag}: {} already exists; use --resume to continue it, or remove it",
                path.display()
            )));
        }
        // A torn last line (no newline at the end) gets one, so appended lines stay whole.
        let needs_newline = existing > 0 && !ends_with_newline(path);
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|e| {
            CliError::Usage(format!("{flag}: cannot write {}: {e}", path.display()))
        })?;
        Ok(Self {
            out: BufWriter::new(file),
            needs_newline,
        })
    }

    pub fn write_line(&mut self, line: &str) -> Result<(), CliError> {
        let io = |e: std::io::Error| CliError::Failure(format!("writing the journal: {e}"));
        if std::mem::take(&mut self.needs_newline) {
            self.out.write_all(b"\n").map_err(io)?;
        }
        self.out.write_all(line.as_bytes()).map_err(io)?;
        self.out.write_all(b"\n").map_err(io)?;
        self.out.flush().map_err(io)
    }
}

fn ends_with_newline(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = File::open(path) else {
        return true;
    };
    let mut last = [0u8; 1];
    file.seek(SeekFrom::End(-1)).is_ok() && file.read_exact(&mut last).is_ok() && last[0] == b'\n'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, outcome: OutcomeKind, possible_duplicates: u32) -> String {
        JournalLine {
            registration_id: id.into(),
            outcome,
            message_id: None,
            error: None,
            remove: false,
            attempts: 1,
            possible_duplicates,
        }
        .to_json()
    }

    #[test]
    fn outcomes_are_written_as_the_documented_words() {
        let text = line("a", OutcomeKind::NotAttempted, 0);
        assert!(text.contains(r#""outcome":"not_attempted""#), "{text}");
        assert!(
            serde_json::from_str::<JournalLine>(&text.replace("not_attempted", "lost")).is_err()
        );
    }

    #[test]
    fn done_ids_are_accepted_or_rejected_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let text = format!(
            "{}\n{}\n{}\n{}\n{}\n{{\"registration_id\":\"e\",\"outc",
            line("a", OutcomeKind::Accepted, 0),
            line("b", OutcomeKind::Rejected, 0),
            line("c", OutcomeKind::Failed, 2),
            line("d", OutcomeKind::NotAttempted, 0),
            JournalEvent::ids_read_error("broken pipe", 4).to_json(),
        );
        std::fs::write(&path, text).unwrap();
        let resume = resume_from(&path).unwrap();
        assert_eq!(
            resume.done,
            HashSet::from(["a".to_string(), "b".to_string()])
        );
        assert_eq!(resume.maybe_sent, HashMap::from([("c".to_string(), 2)]));
        // Appending after a torn line starts on a new line.
        let mut w = LineWriter::open("--journal", &path, false).unwrap();
        w.write_line(&line("e", OutcomeKind::Accepted, 0)).unwrap();
        w.write_line(&line("c", OutcomeKind::Accepted, 2)).unwrap();
        let resume = resume_from(&path).unwrap();
        assert_eq!(
            resume.done.len(),
            4,
            "the torn line is skipped, the new ones read"
        );
        assert!(resume.done.contains("e"));
        assert!(resume.maybe_sent.is_empty(), "c is done now");
    }

    #[test]
    fn a_fresh_journal_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        std::fs::write(&path, line("a", OutcomeKind::Accepted, 0) + "\n").unwrap();
        assert!(matches!(
            LineWriter::open("--journal", &path, true),
            Err(CliError::Usage(_))
        ));
        assert!(LineWriter::open("--journal", &path, false).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn journals_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        LineWriter::open("--journal", &path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
