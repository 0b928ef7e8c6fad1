//! The broadcast journal: one JSON line per final delivery, flushed as it is written.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use c2dm_core::{Delivery, SendError, Sent};
use serde::{Deserialize, Serialize};

use crate::setup::CliError;

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalLine {
    pub registration_id: String,
    /// `accepted`, `rejected`, `failed` or `not_attempted`.
    pub outcome: String,
    pub message_id: Option<String>,
    pub error: Option<String>,
    pub remove: bool,
    pub attempts: u32,
    #[serde(default)]
    pub possible_duplicates: u32,
}

impl JournalLine {
    pub fn of(delivery: &Delivery) -> Self {
        Self {
            registration_id: delivery.registration_id().to_string(),
            outcome: delivery.outcome().kind().to_owned(),
            message_id: delivery.message_id().map(ToString::to_string),
            error: delivery.error_text(),
            remove: delivery.should_remove(),
            attempts: delivery.attempts(),
            possible_duplicates: delivery.possible_duplicates(),
        }
    }

    pub fn of_send(to: &str, result: &Result<Sent, SendError>) -> Self {
        match result {
            Ok(sent) => Self {
                registration_id: to.to_owned(),
                outcome: "accepted".into(),
                message_id: Some(sent.message_id.to_string()),
                error: None,
                remove: false,
                attempts: sent.attempts,
                possible_duplicates: sent.possible_duplicates,
            },
            Err(failure) => {
                let rejected = failure.error.code().is_some_and(|c| !c.is_retryable());
                Self {
                    registration_id: to.to_owned(),
                    outcome: if rejected { "rejected" } else { "failed" }.into(),
                    message_id: None,
                    error: Some(match failure.error.code() {
                        Some(code) => code.to_string(),
                        None => failure.error.to_string(),
                    }),
                    remove: failure.should_remove_registration(),
                    attempts: failure.attempts,
                    possible_duplicates: failure.possible_duplicates,
                }
            }
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a journal line always serialises")
    }

    /// Whether this id needs no more sending: accepted or permanently rejected.
    pub fn is_final(&self) -> bool {
        matches!(self.outcome.as_str(), "accepted" | "rejected")
    }
}

/// The ids a journal already shows accepted or rejected. Lines that do not read as journal
/// lines (torn by a crash while writing) are skipped with a warning: their ids are sent again,
/// which may duplicate but never loses a message.
pub fn done_ids(path: &Path) -> Result<HashSet<String>, CliError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => {
            return Err(CliError::Usage(format!(
                "--journal: cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let mut done = HashSet::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| CliError::Usage(format!("--journal: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<JournalLine>(&line) {
            Ok(entry) if entry.is_final() => {
                done.insert(entry.registration_id);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(line = n + 1, %e, "skipping an unreadable journal line");
            }
        }
    }
    Ok(done)
}

/// Appends lines, flushing each one, so a crash loses at most what was in flight.
pub struct LineWriter {
    out: BufWriter<File>,
    needs_newline: bool,
}

impl LineWriter {
    /// Opens `path` for appending (creating it); with `fresh`, an existing non-empty file is
    /// an error, so two runs are never mixed up by accident.
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
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
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

    fn line(id: &str, outcome: &str) -> String {
        JournalLine {
            registration_id: id.into(),
            outcome: outcome.into(),
            message_id: None,
            error: None,
            remove: false,
            attempts: 1,
            possible_duplicates: 0,
        }
        .to_json()
    }

    #[test]
    fn done_ids_are_accepted_or_rejected_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let text = format!(
            "{}\n{}\n{}\n{}\n{{\"registration_id\":\"e\",\"outc",
            line("a", "accepted"),
            line("b", "rejected"),
            line("c", "failed"),
            line("d", "not_attempted")
        );
        std::fs::write(&path, text).unwrap();
        let done = done_ids(&path).unwrap();
        assert_eq!(done, HashSet::from(["a".to_string(), "b".to_string()]));
        // Appending after a torn line starts on a new line.
        let mut w = LineWriter::open("--journal", &path, false).unwrap();
        w.write_line(&line("e", "accepted")).unwrap();
        let done = done_ids(&path).unwrap();
        assert_eq!(done.len(), 3, "the torn line is skipped, the new one read");
        assert!(done.contains("e"));
    }

    #[test]
    fn a_fresh_journal_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        std::fs::write(&path, line("a", "accepted") + "\n").unwrap();
        assert!(matches!(
            LineWriter::open("--journal", &path, true),
            Err(CliError::Usage(_))
        ));
        assert!(LineWriter::open("--journal", &path, false).is_ok());
    }
}
