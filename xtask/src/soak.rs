//! `cargo xtask soak`: a long broadcast over TLS with every fault on at once, checked afterwards
//! against the emulator's record; prints the figures. Through C2DM by default, or through FCM
//! HTTP v1 (`--fcm`: HTTP/2, a service account's tokens, renewed as they near their expiry).
//! The small version of both runs in `cargo test` (c2dm-emulator/tests/soak.rs).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The registration id of generated device `i`: 2 in 100 gone (`NotRegistered`), 1 invalid,
/// 1 over its device quota for its first sends, as [`DEVICE_FAULTS`] tells the emulator.
pub(crate) fn id(i: u64) -> String {
    match i % 100 {
        7 | 57 => format!("gone-{i:07}"),
        13 => format!("bad-{i:07}"),
        21 => format!("busy-{i:07}"),
        _ => format!("device-{i:07}"),
    }
}

/// `cargo xtask soak`: the ids, the emulator, the broadcast, the emulator's record, the checks,
/// the figures.
pub fn run(root: &Path, n: u64, fcm: bool) -> Result<(), String> {
    let bin = crate::build_dist(root, &["--bins"])?;
    let dir = std::env::temp_dir().join(format!("c2dm-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let files = Files {
        cert: dir.join("cert.pem"),
        stats: dir.join("stats.json"),
        ids: dir.join("ids"),
        journal: dir.join("journal.jsonl"),
        fcm_key: fcm.then(|| dir.join("service-account.json")),
    };
    write_ids(&files.ids, n, fcm)?;
    let (mut emulator, base) = start_emulator(&bin, &files)?;
    let protocol = if fcm {
        "FCM HTTP v1 over HTTP/2"
    } else {
        "C2DM"
    };
    eprintln!("soak: {n} messages through {protocol} over TLS against {base}");
    let run = broadcast(&bin, &files, &base)?;
    let stats = stop_emulator(&mut emulator, &files.stats)?;
    let checked = check(&files.journal, &stats, n, fcm)?;
    print_figures(n, &run, &stats, &checked, fcm);
    let _ = std::fs::remove_dir_all(&dir);
    verdict("soak: every check holds", &checked.problems)
}

/// Prints `holds` if there are no problems; else the first 20, and an error that counts them.
pub(crate) fn verdict(holds: &str, problems: &[String]) -> Result<(), String> {
    if problems.is_empty() {
        println!("{holds}");
        return Ok(());
    }
    for problem in problems.iter().take(20) {
        println!("  PROBLEM: {problem}");
    }
    Err(format!("{} problems", problems.len()))
}

/// Where the run keeps its files.
struct Files {
    cert: PathBuf,
    stats: PathBuf,
    ids: PathBuf,
    journal: PathBuf,
    /// With `--fcm`: the emulator's service-account key file, which the broadcast sends as.
    fcm_key: Option<PathBuf>,
}

/// `n` generated ids, one per line. Through FCM, none is over its device quota: FCM's
/// `QUOTA_EXCEEDED` asks for a wait of a minute at least, which the emulator's tests check
/// apart (c2dm-emulator/tests/fcm.rs).
fn write_ids(path: &Path, n: u64, fcm: bool) -> Result<(), String> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| e.to_string())?);
    for i in 0..n {
        let id = id(i);
        let id = if fcm {
            id.replace("busy-", "device-")
        } else {
            id
        };
        writeln!(out, "{id}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

/// The emulator's flags that make [`id`]'s devices gone, invalid and over their quota.
pub(crate) const DEVICE_FAULTS: [&str; 6] = [
    "--not-registered-prefix",
    "gone-",
    "--invalid-prefix",
    "bad-",
    "--device-quota-prefix",
    "busy-",
];

/// The emulator's flags for the faults both soaks inject at the same rates: a 500 every
/// 1,500th send, a dropped connection every 1,700th, a rotated token every 1,000th.
pub(crate) const SERVICE_FAULTS: [&str; 6] = [
    "--server-error-every",
    "1500",
    "--drop-every",
    "1700",
    "--rotate-token-every",
    "1000",
];

/// The emulator over TLS with every fault on, writing its record on Ctrl-C; and its base URL.
fn start_emulator(bin: &Path, files: &Files) -> Result<(Child, String), String> {
    let mut emulator = Command::new(bin.join("c2dm-emulator"));
    emulator
        .arg("--tls")
        .args(DEVICE_FAULTS)
        .args(SERVICE_FAULTS)
        .args([
            "--unavailable-every",
            "2000",
            "--retry-after-secs",
            "1",
            "--token-lifetime-sends",
            "5000",
            "--seed",
            "42",
            "--cert-out",
        ])
        .arg(&files.cert)
        .arg("--stats-out")
        .arg(&files.stats);
    if let Some(key) = &files.fcm_key {
        // Tokens of 8 s: each renewed a quarter of that before it expires, several times a run.
        emulator
            .arg("--fcm-key-out")
            .arg(key)
            .args(["--fcm-token-lifetime", "8"]);
    }
    let mut emulator = emulator
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("c2dm-emulator: {e}"))?;
    let mut lines = BufReader::new(emulator.stdout.take().ok_or("no stdout")?).lines();
    let first = lines
        .next()
        .and_then(Result::ok)
        .ok_or("the emulator did not start")?;
    // Keep reading what it prints, so it never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let base = first.rsplit(' ').next().unwrap_or_default().to_owned();
    Ok((emulator, base))
}

/// What the broadcast did: its exit, its time, its memory over time, its summary.
struct Run {
    status: std::process::ExitStatus,
    elapsed: Duration,
    rss_samples: Vec<u64>,
    summary: String,
}

/// `c2dm broadcast` of the ids with a journal, sampling its memory as it goes.
fn broadcast(bin: &Path, files: &Files, base: &str) -> Result<Run, String> {
    let start = Instant::now();
    let mut sender = Command::new(bin.join("c2dm"));
    sender
        .args([
            "broadcast",
            "--json",
            "--collapse-key",
            "soak",
            "-d",
            "message=test",
            "--ids",
        ])
        .arg(&files.ids)
        .arg("--journal")
        .arg(&files.journal)
        .arg("--ca-cert")
        .arg(&files.cert)
        .args([
            "--send-url",
            &format!("{base}/c2dm/send"),
            "--login-url",
            &format!("{base}/accounts/ClientLogin"),
        ])
        .env("C2DM_EMAIL", "sender@example.com")
        .env("C2DM_PASSWORD", "emulator-password");
    if let Some(key) = &files.fcm_key {
        sender.arg("--fcm").arg(key).args(["--fcm-url", base]);
    }
    let mut sender = sender
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("c2dm: {e}"))?;
    let mut rss_samples = Vec::new();
    let status = loop {
        if let Some(status) = sender.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if let Some(rss) = crate::rss_kib(sender.id()) {
            rss_samples.push(rss);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let elapsed = start.elapsed();
    let mut summary = String::new();
    if let Some(mut out) = sender.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut out, &mut summary);
    }
    Ok(Run {
        status,
        elapsed,
        rss_samples,
        summary,
    })
}

/// Stops the emulator with Ctrl-C, so it writes its record, and reads that record.
fn stop_emulator(emulator: &mut Child, stats: &Path) -> Result<Value, String> {
    // SAFETY: sending SIGINT to our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(emulator.id() as libc::pid_t, libc::SIGINT);
    }
    emulator.wait().map_err(|e| e.to_string())?;
    serde_json::from_slice(&std::fs::read(stats).map_err(|e| format!("stats: {e}"))?)
        .map_err(|e| format!("stats: {e}"))
}

/// What the checks found, with the counts the figures quote.
struct Checked {
    problems: Vec<String>,
    lines: usize,
    accepted: u64,
    rejected: u64,
    duplicates_reported: u64,
    duplicated: u64,
}

/// The journal against the emulator's record: one line per id, every accepted message in its
/// inbox, no unreported duplicate, no send after a permanent rejection; one login per expiry
/// (C2DM), or tokens issued and none refused (FCM).
fn check(journal: &Path, stats: &Value, n: u64, fcm: bool) -> Result<Checked, String> {
    let mut problems = Vec::new();
    let journal = std::fs::read_to_string(journal).map_err(|e| e.to_string())?;
    let mut lines: HashMap<String, Value> = HashMap::new();
    for line in journal.lines() {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("journal: {e}"))?;
        let id = v["registration_id"].as_str().unwrap_or_default().to_owned();
        if lines.insert(id.clone(), v).is_some() {
            problems.push(format!("{id}: two journal lines"));
        }
    }
    if lines.len() as u64 != n {
        problems.push(format!("{} journal lines for {n} ids", lines.len()));
    }
    let inbox = stats["inbox"].as_object().cloned().unwrap_or_default();
    let (mut accepted, mut rejected, mut duplicates_reported, mut duplicated) =
        (0u64, 0u64, 0u64, 0u64);
    for (id, line) in &lines {
        let messages = inbox
            .get(id)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let possible = line["possible_duplicates"].as_u64().unwrap_or(0);
        duplicates_reported += possible;
        if messages.len() > 1 {
            duplicated += 1;
            if possible == 0 {
                problems.push(format!(
                    "{id}: {} messages, no duplicate reported",
                    messages.len()
                ));
            }
        }
        match line["outcome"].as_str() {
            Some("accepted") => {
                accepted += 1;
                let name = line["message_id"].as_str().unwrap_or_default();
                // FCM names the message `projects/<project>/messages/<id>`.
                let mid = name.rsplit('/').next().unwrap_or_default();
                if (fcm && !name.starts_with("projects/")) || (!fcm && mid != name) {
                    problems.push(format!(
                        "{id}: accepted as {name:?}, not a name of its protocol"
                    ));
                }
                if !messages.iter().any(|m| m["message_id"] == mid) {
                    problems.push(format!("{id}: accepted {mid} is not in its inbox"));
                }
            }
            Some("rejected") => {
                rejected += 1;
                if !messages.is_empty() {
                    problems.push(format!("{id}: rejected yet delivered"));
                }
            }
            other => problems.push(format!("{id}: not final: {other:?}")),
        }
    }
    let count = |key: &str| stats[key].as_u64().unwrap_or(0);
    let (errors, gone_codes) = if fcm {
        (
            &stats["fcm"]["errors"],
            ["UNREGISTERED", "INVALID_ARGUMENT"],
        )
    } else {
        (&stats["errors"], ["NotRegistered", "InvalidRegistration"])
    };
    let gone_answers = gone_codes
        .iter()
        .map(|c| errors[c].as_u64().unwrap_or(0))
        .sum::<u64>();
    if gone_answers != rejected {
        problems.push(format!("{gone_answers} {} answers for {rejected} rejected ids: a send after a permanent rejection", gone_codes.join("/")));
    }
    if fcm {
        let tokens = stats["fcm"]["tokens"].as_u64().unwrap_or(0);
        let refused = stats["fcm"]["token_refusals"].as_u64().unwrap_or(0);
        if tokens == 0 || refused > 0 {
            problems.push(format!("{tokens} FCM tokens issued, {refused} refused"));
        }
        let http2 = stats["fcm"]["http2"].as_u64().unwrap_or(0);
        if http2 != count("sends") {
            problems.push(format!(
                "{http2} of {} FCM sends over HTTP/2",
                count("sends")
            ));
        }
    } else if count("logins") != count("expiries") + 1 {
        problems.push(format!(
            "{} logins for {} expiries",
            count("logins"),
            count("expiries")
        ));
    }
    Ok(Checked {
        problems,
        lines: lines.len(),
        accepted,
        rejected,
        duplicates_reported,
        duplicated,
    })
}

/// The figures docs/RELIABILITY.md quotes.
fn print_figures(n: u64, run: &Run, stats: &Value, checked: &Checked, fcm: bool) {
    let count = |key: &str| stats[key].as_u64().unwrap_or(0);
    let samples = &run.rss_samples;
    let (min_rss, max_rss) = (
        samples
            .iter()
            .skip(samples.len() / 10)
            .min()
            .copied()
            .unwrap_or(0),
        samples.iter().max().copied().unwrap_or(0),
    );
    println!(
        "soak: {n} messages in {:.1} s ({:.0}/s), exit {}",
        run.elapsed.as_secs_f64(),
        n as f64 / run.elapsed.as_secs_f64(),
        run.status
    );
    println!(
        "  journal: {} accepted, {} rejected (removed), {} lines",
        checked.accepted, checked.rejected, checked.lines
    );
    if fcm {
        println!(
            "  faults survived: {} x 503 with Retry-After, {} x 500, {} dropped connections, {} x 401 ({} access tokens); {} sends over HTTP/2",
            count("unavailable"),
            count("server_errors"),
            count("dropped"),
            count("unauthorized"),
            stats["fcm"]["tokens"].as_u64().unwrap_or(0),
            stats["fcm"]["http2"].as_u64().unwrap_or(0),
        );
    } else {
        println!(
            "  faults survived: {} x 503 with Retry-After, {} x 500, {} dropped connections, {} rotations, {} expiries ({} logins), {} x DeviceQuotaExceeded",
            count("unavailable"),
            count("server_errors"),
            count("dropped"),
            count("rotations"),
            count("expiries"),
            count("logins"),
            stats["errors"]["DeviceQuotaExceeded"].as_u64().unwrap_or(0)
        );
    }
    println!(
        "  sends seen by the emulator: {}; possible duplicates reported: {}; devices that got a message twice: {}",
        count("sends"),
        checked.duplicates_reported,
        checked.duplicated
    );
    println!(
        "  sender RSS: {:.1} MiB after warm-up, {:.1} MiB at most ({} samples)",
        min_rss as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        samples.len()
    );
    println!("  summary: {}", run.summary.trim());
}
