//! `c2dm broadcast`: one message to every id of a list, with a progress bar, a journal that
//! survives a crash, resume, and a list of ids to remove.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::num::NonZeroU32;
use std::path::Path;
use std::process::ExitCode;

use c2dm_core::{BroadcastOptions, DeliveryReport, Message, RegistrationId, Sender};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::{BroadcastArgs, Global};
use crate::journal::{self, JournalLine, LineWriter};
use crate::setup::{self, CliError};

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

/// Where the ids come from: a file (read twice: checked first, then streamed) or standard
/// input (read into memory, as it cannot be read twice).
pub enum Ids {
    File(std::path::PathBuf),
    Memory(Vec<RegistrationId>),
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

/// Streams the ids not in `skip`, read on a blocking thread.
fn stream_ids(
    ids: Ids,
    skip: HashSet<String>,
) -> impl futures::Stream<Item = RegistrationId> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<RegistrationId>>(4);
    tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(BATCH);
        let push = |id: RegistrationId, batch: &mut Vec<RegistrationId>| {
            if skip.contains(id.as_str()) {
                return true;
            }
            batch.push(id);
            if batch.len() == BATCH {
                return tx
                    .blocking_send(std::mem::replace(batch, Vec::with_capacity(BATCH)))
                    .is_ok();
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
            Ids::File(path) => {
                let Ok(file) = std::fs::File::open(&path) else {
                    return;
                };
                let streamed = for_each_line(
                    file,
                    |e| CliError::Failure(e.to_string()),
                    |n, line| match id_of_line(line, n)? {
                        Some(id) => Ok(push(id, &mut batch)),
                        None => Ok(true),
                    },
                );
                if let Err(err) = streamed {
                    // Checked before: a line that no longer reads is the file changing under us.
                    tracing::error!(%err, "the ids file changed during the broadcast");
                    return;
                }
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(batch);
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
    pub skipped: u64,
}

/// Runs the broadcast of `template` to the given ids with the journal and remove list.
pub async fn broadcast(
    sender: &Sender,
    template: &Message,
    args: &BroadcastArgs,
    ids: Ids,
    total: u64,
) -> Result<Run, CliError> {
    let skip = match (&args.journal, args.resume) {
        (Some(path), true) => journal::done_ids(path)?,
        _ => HashSet::new(),
    };
    let mut journal = match &args.journal {
        Some(path) => Some(LineWriter::open("--journal", path, !args.resume)?),
        None => None,
    };
    let mut remove_list = match &args.remove_list {
        Some(path) => Some(LineWriter::open("--remove-list", path, false)?),
        None => None,
    };
    let skipped = skip.len() as u64;
    let mut options = BroadcastOptions::default().concurrency(args.concurrency as usize);
    if let Some(rate) = args.rate.and_then(NonZeroU32::new) {
        options = options.rate_per_second(rate);
    }
    let mut deliveries = sender
        .broadcast_to(stream_ids(ids, skip), template, options)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let cancel = deliveries.cancel_handle();
    let interrupt = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "interrupted: finishing the sends under way, journaling the rest as not attempted (Ctrl-C again to stop at once)"
            );
            cancel.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                // The journal is flushed line by line: what it holds stays true; --resume
                // sends whatever it does not show as done.
                std::process::exit(130);
            }
        }
    });
    let bar = progress_bar(total);
    bar.set_position(skipped.min(total));
    let mut report = DeliveryReport::new();
    let mut written = 0u64;
    while let Some(delivery) = deliveries.next().await {
        report.record(&delivery);
        if let Some(journal) = &mut journal {
            journal.write_line(&JournalLine::of(&delivery).to_json())?;
            written += 1;
            if args.abort_after == Some(written) {
                // A crash, as far as the journal can tell: no summary, sends under way lost.
                std::process::exit(101);
            }
        }
        if delivery.should_remove() {
            if let Some(list) = &mut remove_list {
                list.write_line(delivery.registration_id().as_str())?;
            }
        }
        bar.inc(1);
    }
    interrupt.abort();
    bar.finish_and_clear();
    report.finish();
    Ok(Run { report, skipped })
}

/// Prints the summary: human text, or one JSON object with `--json`.
pub fn print_summary(global: &Global, run: &Run) {
    let report = &run.report;
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
            "elapsed_secs": report.elapsed().as_secs_f64(),
            "rate": report.rate(),
        });
        println!("{summary}");
    } else {
        if run.skipped > 0 {
            println!("{} ids skipped: already done in the journal", run.skipped);
        }
        println!("{report}");
    }
}

/// `c2dm broadcast`.
pub async fn run(global: &Global, args: BroadcastArgs) -> Result<ExitCode, CliError> {
    // Everything that can be wrong with the input is found before anything is sent.
    let template = setup::message(&args.message, "template")?;
    let (ids, total) = if args.ids == "-" {
        let ids = read_all(std::io::stdin().lock())?;
        let total = ids.len() as u64;
        (Ids::Memory(ids), total)
    } else {
        let path = std::path::PathBuf::from(&args.ids);
        let total = check_file(&path)?;
        (Ids::File(path), total)
    };
    let sender = setup::sender(global)?;
    let run = broadcast(&sender, &template, &args, ids, total).await?;
    print_summary(global, &run);
    Ok(if run.report.all_final() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
