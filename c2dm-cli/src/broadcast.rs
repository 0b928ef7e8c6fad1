//! `c2dm broadcast`: one message to every id of a list, with a progress bar, a journal that
//! survives a crash, resume, and a list of ids to remove.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::num::NonZeroU32;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use c2dm_core::{BroadcastOptions, DeliveryReport, Protocol, RegistrationId, Sender};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::{BroadcastArgs, Global};
use crate::client;
use crate::error::CliError;
use crate::journal::{self, JournalEvent, JournalLine, LineWriter, Resume};

/// Reads one line of an ids list: `None` for blank lines and comments.
fn id_of_line(line: &str, n: usize) -> Result<Option<RegistrationId>, CliError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    RegistrationId::new(line)
        .map(Some)
        .map_err(|e| CliError::Usage(format!("--ids line {n}: {e}")))
}

/// Where the ids come from. A regular file is checked whole before anything is sent, then
/// streamed (so memory stays flat however long it is); anything that can be read only once (a
/// pipe, a FIFO, `-` for standard input, `<(...)`) is read once, into memory, and checked there.
pub enum Ids {
    File {
        path: std::path::PathBuf,
        /// How many ids the check found: the streaming pass must find as many.
        expected: u64,
    },
    Memory(Vec<RegistrationId>),
}

impl Ids {
    /// Reads and checks `--ids`: every line, before anything is sent.
    pub fn open(arg: &str) -> Result<Self, CliError> {
        if arg == "-" {
            return Ok(Self::Memory(read_all(std::io::stdin().lock())?));
        }
        let path = std::path::PathBuf::from(arg);
        let cannot = |e: std::io::Error| {
            CliError::Usage(format!("--ids: cannot read {}: {e}", path.display()))
        };
        let meta = std::fs::metadata(&path).map_err(cannot)?;
        if meta.is_file() {
            let expected = check_file(&path)?;
            Ok(Self::File { path, expected })
        } else {
            let file = std::fs::File::open(&path).map_err(cannot)?;
            Ok(Self::Memory(read_all(file)?))
        }
    }

    /// How many ids there are.
    pub fn len(&self) -> u64 {
        match self {
            Self::File { expected, .. } => *expected,
            Self::Memory(ids) => ids.len() as u64,
        }
    }
}

/// What the reading side of a broadcast saw: how many ids it handed over, and the error that
/// stopped it, if one did.
#[derive(Default)]
pub struct IdsRead {
    handed_over: std::sync::atomic::AtomicU64,
    error: std::sync::Mutex<Option<String>>,
}

impl IdsRead {
    fn fail(&self, error: String) {
        tracing::error!(%error, "reading the ids failed");
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
    }

    /// Ids handed to the broadcast (those skipped by `--resume` are not).
    pub fn handed_over(&self) -> u64 {
        self.handed_over.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Why reading stopped before the end, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Calls `each` with every line of `reader` (without its line ending) and its number, from 1,
/// through one buffer; stops at the first error, or when `each` says so (`Ok(false)`). A read
/// error (one that is not UTF-8, say) becomes `read_error(error)`.
fn for_each_line<E>(
    reader: impl Read,
    read_error: impl Fn(std::io::Error) -> E,
    mut each: impl FnMut(usize, &str) -> Result<bool, E>,
) -> Result<(), E> {
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    for n in 1.. {
        line.clear();
        if reader.read_line(&mut line).map_err(&read_error)? == 0 {
            break;
        }
        if !each(n, line.trim_end_matches(['\n', '\r']))? {
            break;
        }
    }
    Ok(())
}

fn read_all(reader: impl Read) -> Result<Vec<RegistrationId>, CliError> {
    let mut ids = Vec::new();
    for_each_line(
        reader,
        |e| CliError::Usage(format!("--ids: {e}")),
        |n, line| {
            ids.extend(id_of_line(line, n)?);
            Ok(true)
        },
    )?;
    Ok(ids)
}

/// Checks every line before anything is sent; returns how many ids there are.
fn check_file(path: &Path) -> Result<u64, CliError> {
    let file = std::fs::File::open(path)
        .map_err(|e| CliError::Usage(format!("--ids: cannot read {}: {e}", path.display())))?;
    let mut count = 0;
    for_each_line(
        file,
        |e| CliError::Usage(format!("--ids: {}: {e}", path.display())),
        |n, line| {
            if id_of_line(line, n)?.is_some() {
                count += 1;
            }
            Ok(true)
        },
    )?;
    Ok(count)
}

/// How many ids travel together from the reading thread: one hand-over (and one wake-up) per
/// batch instead of per id.
const BATCH: usize = 512;

/// Streams the ids not in `skip`, read on a blocking thread; what happened on the way is
/// kept in `read`.
fn stream_ids(
    ids: Ids,
    skip: HashSet<String>,
    read: Arc<IdsRead>,
) -> impl futures::Stream<Item = RegistrationId> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<RegistrationId>>(4);
    tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(BATCH);
        let mut seen = 0u64;
        let mut push = |id: RegistrationId, batch: &mut Vec<RegistrationId>| {
            seen += 1;
            if skip.contains(id.as_str()) {
                return true;
            }
            batch.push(id);
            if batch.len() == BATCH {
                let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
                let len = full.len() as u64;
                if tx.blocking_send(full).is_err() {
                    return false;
                }
                read.handed_over
                    .fetch_add(len, std::sync::atomic::Ordering::SeqCst);
            }
            true
        };
        match ids {
            Ids::Memory(ids) => {
                for id in ids {
                    if !push(id, &mut batch) {
                        return;
                    }
                }
            }
            Ids::File { path, expected } => {
                let streamed = std::fs::File::open(&path)
                    .map_err(|e| CliError::Failure(format!("--ids: {}: {e}", path.display())))
                    .and_then(|file| {
                        for_each_line(
                            file,
                            |e| CliError::Failure(format!("--ids: {}: {e}", path.display())),
                            |n, line| match id_of_line(line, n)? {
                                Some(id) => Ok(push(id, &mut batch)),
                                None => Ok(true),
                            },
                        )
                    });
                match streamed {
                    Err(err) => read.fail(format!("{err} (the file changed during the broadcast?)")),
                    Ok(()) if seen != expected && !tx.is_closed() => read.fail(format!(
                        "--ids: {} changed during the broadcast: {seen} ids read, {expected} checked",
                        path.display()
                    )),
                    Ok(()) => {}
                }
            }
        }
        if !batch.is_empty() {
            let len = batch.len() as u64;
            if tx.blocking_send(batch).is_ok() {
                read.handed_over
                    .fetch_add(len, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|batch| (batch, rx))
    })
    .flat_map(futures::stream::iter)
}

pub fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// What a broadcast run did, besides the report.
pub struct Run {
    pub report: DeliveryReport,
    /// Ids skipped because the journal shows them done.
    pub skipped: u64,
    /// Ids sent again after `--resume` whose earlier sends may have reached the device: each
    /// may now have a second copy.
    pub resent_maybe_twice: u64,
    /// Ids handed to the broadcast.
    pub handed_over: u64,
    /// Why reading the ids stopped early, if it did.
    pub read_error: Option<String>,
    /// Whether a Ctrl-C stopped the run.
    pub interrupted: bool,
}

impl Run {
    /// Whether every id read got a final delivery: accepted or rejected for good, one each.
    pub fn complete(&self) -> bool {
        self.read_error.is_none()
            && self.report.all_final()
            && self.report.total() == self.handed_over
    }
}

/// Runs the broadcast of `template` to the given ids with the journal and remove list.
pub async fn broadcast<P: Protocol>(
    sender: &Sender<P>,
    template: &P::Message,
    args: &BroadcastArgs,
    ids: Ids,
) -> Result<Run, CliError> {
    let total = ids.len();
    let resume = match (&args.journal, args.resume) {
        (Some(path), true) => journal::resume_from(path)?,
        _ => Resume::default(),
    };
    let mut journal = match &args.journal {
        Some(path) => Some(LineWriter::open("--journal", path, !args.resume)?),
        None => None,
    };
    let mut remove_list = match &args.remove_list {
        Some(path) => Some(LineWriter::open("--remove-list", path, false)?),
        None => None,
    };
    let skipped = resume.done.len() as u64;
    let mut options = BroadcastOptions::default().concurrency(args.concurrency as usize);
    if let Some(rate) = args
        .rate
        .or(sender.protocol().default_rate())
        .and_then(NonZeroU32::new)
    {
        options = options.rate_per_second(rate);
    }
    let read = Arc::new(IdsRead::default());
    let mut deliveries = sender
        .broadcast_to(
            stream_ids(ids, resume.done, Arc::clone(&read)),
            template,
            options,
        )
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let cancel = deliveries.cancel_handle();
    let interrupt = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "interrupted: no new sends; sends waiting to retry stop now; every id gets a journal line (Ctrl-C again to stop at once)"
                );
                cancel.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    // The journal is flushed line by line: what it holds stays true; --resume
                    // sends whatever it does not show as done.
                    std::process::exit(130);
                }
            }
        }
    });
    let bar = progress_bar(total);
    bar.set_position(skipped.min(total));
    let mut report = DeliveryReport::new();
    let mut resent_maybe_twice = 0;
    #[cfg(debug_assertions)]
    let mut written = 0u64;
    while let Some(delivery) = deliveries.next().await {
        report.record(&delivery);
        let mut line = JournalLine::of(&delivery);
        if let Some(earlier) = resume.maybe_sent.get(line.registration_id.as_str()) {
            line.possible_duplicates += earlier;
            if delivery.attempts() > 0 {
                resent_maybe_twice += 1;
            }
        }
        if let Some(journal) = &mut journal {
            journal.write_line(&line.to_json())?;
            #[cfg(debug_assertions)]
            {
                written += 1;
                if args.abort_after == Some(written) {
                    // A crash, as far as the journal can tell: no summary, sends under way lost.
                    std::process::exit(101);
                }
            }
        }
        if delivery.should_remove()
            && let Some(list) = &mut remove_list
        {
            list.write_line(delivery.registration_id().as_str())?;
        }
        bar.inc(1);
    }
    interrupt.abort();
    bar.finish_and_clear();
    report.finish();
    let read_error = read.error();
    if let (Some(error), Some(journal)) = (&read_error, &mut journal) {
        journal.write_line(&JournalEvent::ids_read_error(error, read.handed_over()).to_json())?;
    }
    Ok(Run {
        report,
        skipped,
        resent_maybe_twice,
        handed_over: read.handed_over(),
        read_error,
        interrupted: cancel.is_cancelled(),
    })
}

/// Prints the summary: human text, or one JSON object with `--json`.
pub fn print_summary(global: &Global, run: &Run) {
    let report = &run.report;
    let lost = run.handed_over.saturating_sub(report.total());
    if global.json {
        let summary = serde_json::json!({
            "total": report.total() + run.skipped,
            "accepted": report.accepted(),
            "rejected": report.rejected(),
            "failed": report.failed(),
            "not_attempted": report.not_attempted(),
            "skipped": run.skipped,
            "by_code": report.by_code(),
            "to_remove": report.to_remove().len(),
            "possible_duplicates": report.possible_duplicates(),
            "resent_maybe_twice": run.resent_maybe_twice,
            "ids_read_error": run.read_error,
            "without_delivery": lost,
            "interrupted": run.interrupted,
            "complete": run.complete(),
            "elapsed_secs": report.elapsed().as_secs_f64(),
            "rate": report.rate(),
        });
        println!("{summary}");
    } else {
        if run.skipped > 0 {
            println!("{} ids skipped: already done in the journal", run.skipped);
        }
        println!("{report}");
        if run.resent_maybe_twice > 0 {
            println!(
                "{} resumed sends went to devices an earlier run may already have reached: each may be a second copy",
                run.resent_maybe_twice
            );
        }
        if let Some(error) = &run.read_error {
            println!("the ids could not all be read: {error}");
        }
        if lost > 0 {
            println!("{lost} ids read got no delivery");
        }
        if run.interrupted {
            println!("interrupted: run again with --resume to send the rest");
        }
    }
}

/// `c2dm broadcast`.
pub async fn run(global: &Global, args: BroadcastArgs) -> Result<ExitCode, CliError> {
    // Everything that can be wrong with the input is found before anything is sent.
    let run = match client::fcm_sender(global, None, args.concurrency as usize)? {
        Some(sender) => {
            let template = client::fcm_message(&args.message, "template")?;
            let ids = Ids::open(&args.ids)?;
            broadcast(&sender, &template, &args, ids).await?
        }
        None => {
            let template = client::message(&args.message, "template")?;
            let ids = Ids::open(&args.ids)?;
            let sender = client::sender(global, None, args.concurrency as usize)?;
            broadcast(&sender, &template, &args, ids).await?
        }
    };
    print_summary(global, &run);
    Ok(if run.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that changes between the check and the sending pass (here: it loses lines):
    /// the run is a failure, and the summary and the journal say so.
    #[tokio::test]
    async fn a_file_that_changes_during_the_broadcast_fails_the_run() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("ids");
        std::fs::write(&ids, "a\nb\nc\nd\n").unwrap();
        let checked = Ids::open(ids.to_str().unwrap()).unwrap();
        assert_eq!(checked.len(), 4);
        std::fs::write(&ids, "a\nb\n").unwrap();
        let journal = dir.path().join("j.jsonl");
        let cli = crate::args::Cli::try_parse_from([
            "c2dm",
            "broadcast",
            "--ids",
            ids.to_str().unwrap(),
            "--collapse-key",
            "k",
            "--journal",
            journal.to_str().unwrap(),
        ])
        .unwrap();
        let crate::args::Command::Broadcast(args) = cli.command else {
            unreachable!()
        };
        let fake = c2dm_mock::RecordingTransport::new();
        let sender = Sender::new(
            fake.clone(),
            c2dm_core::StaticToken::new(c2dm_core::AuthToken::new("t").unwrap()),
        );
        let template = client::message(&args.message, "template").unwrap();
        let run = broadcast(&sender, &template, &args, checked).await.unwrap();
        assert_eq!(run.report.accepted(), 2);
        assert!(!run.complete(), "two ids were never read");
        assert!(run.read_error.as_deref().unwrap().contains("changed"));
        let text = std::fs::read_to_string(&journal).unwrap();
        assert!(
            text.lines().last().unwrap().contains("ids_read_error"),
            "{text}"
        );
    }

    #[test]
    fn ids_are_read_line_by_line_whatever_the_line_endings() {
        let ids = read_all("# list\r\ndev-1\r\n\n  dev-2  \ndev-3".as_bytes()).unwrap();
        let ids: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
        assert_eq!(ids, ["dev-1", "dev-2", "dev-3"]);
    }

    #[test]
    fn a_bad_id_is_named_by_its_line_number() {
        let err = read_all("dev-1\n\nhas space\n".as_bytes()).unwrap_err();
        assert!(err.to_string().contains("--ids line 3"), "{err}");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_a_read_error() {
        let err = read_all(&b"dev-1\n\xff\xfe\n"[..]).unwrap_err();
        assert!(err.to_string().starts_with("--ids: "), "{err}");
    }

    #[test]
    fn reading_stops_when_asked() {
        let mut seen = Vec::new();
        for_each_line(
            "a\nb\nc\n".as_bytes(),
            |e| e,
            |n, line| {
                seen.push((n, line.to_owned()));
                Ok(n < 2)
            },
        )
        .unwrap();
        assert_eq!(seen, [(1, "a".to_owned()), (2, "b".to_owned())]);
    }
}
