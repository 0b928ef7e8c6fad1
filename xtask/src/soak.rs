//! `cargo xtask soak`: a long broadcast over TLS with every fault on at once, checked afterwards
//! against the emulator's record; prints the figures. The small version runs in `cargo test`
//! (c2dm-emulator/tests/soak.rs).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn id(i: u64) -> String {
    match i % 100 {
        7 | 57 => format!("gone-{i:07}"),
        13 => format!("bad-{i:07}"),
        21 => format!("busy-{i:07}"),
        _ => format!("device-{i:07}"),
    }
}

pub fn run(root: &Path, args: &[&str]) -> Result<(), String> {
    let n: u64 = match args {
        [] => 100_000,
        ["--messages", n] => n.parse().map_err(|_| "--messages N")?,
        _ => return Err("usage: cargo xtask soak [--messages N]".into()),
    };
    let bin = crate::build_release(root, &["--bins"])?;
    let dir = std::env::temp_dir().join(format!("c2dm-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (cert, stats_path, ids_path, journal_path) = (
        dir.join("cert.pem"),
        dir.join("stats.json"),
        dir.join("ids"),
        dir.join("journal.jsonl"),
    );
    {
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(&ids_path).map_err(|e| e.to_string())?);
        for i in 0..n {
            writeln!(out, "{}", id(i)).map_err(|e| e.to_string())?;
        }
    }
    let mut emulator = Command::new(bin.join("c2dm-emulator"))
        .args([
            "--tls",
            "--not-registered-prefix",
            "gone-",
            "--invalid-prefix",
            "bad-",
            "--device-quota-prefix",
            "busy-",
            "--unavailable-every",
            "2000",
            "--retry-after-secs",
            "1",
            "--server-error-every",
            "1500",
            "--drop-every",
            "1700",
            "--rotate-token-every",
            "1000",
            "--token-lifetime-sends",
            "5000",
            "--seed",
            "42",
            "--cert-out",
        ])
        .arg(&cert)
        .arg("--stats-out")
        .arg(&stats_path)
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
    eprintln!("soak: {n} messages over TLS against {base}");
    let start = Instant::now();
    let mut sender = Command::new(bin.join("c2dm"))
        .args([
            "broadcast",
            "--json",
            "--collapse-key",
            "soak",
            "-d",
            "message=test",
            "--ids",
        ])
        .arg(&ids_path)
        .arg("--journal")
        .arg(&journal_path)
        .arg("--ca-cert")
        .arg(&cert)
        .args([
            "--send-url",
            &format!("{base}/c2dm/send"),
            "--login-url",
            &format!("{base}/accounts/ClientLogin"),
        ])
        .env("C2DM_EMAIL", "sender@example.com")
        .env("C2DM_PASSWORD", "emulator-password")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("c2dm: {e}"))?;
    let mut samples = Vec::new();
    let status = loop {
        if let Some(status) = sender.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if let Some(rss) = crate::rss_kib(sender.id()) {
            samples.push(rss);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let elapsed = start.elapsed();
    let mut summary = String::new();
    if let Some(mut out) = sender.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut out, &mut summary);
    }
    // Stop the emulator with Ctrl-C, so it writes its record.
    // SAFETY: sending SIGINT to our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(emulator.id() as libc::pid_t, libc::SIGINT);
    }
    emulator.wait().map_err(|e| e.to_string())?;
    let stats: Value =
        serde_json::from_slice(&std::fs::read(&stats_path).map_err(|e| format!("stats: {e}"))?)
            .map_err(|e| format!("stats: {e}"))?;

    let mut problems = Vec::new();
    let journal = std::fs::read_to_string(&journal_path).map_err(|e| e.to_string())?;
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
                let mid = line["message_id"].as_str().unwrap_or_default();
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
    let gone_answers = ["NotRegistered", "InvalidRegistration"]
        .iter()
        .map(|c| stats["errors"][c].as_u64().unwrap_or(0))
        .sum::<u64>();
    if gone_answers != rejected {
        problems.push(format!("{gone_answers} NotRegistered/InvalidRegistration answers for {rejected} rejected ids: a send after a permanent rejection"));
    }
    if count("logins") != count("expiries") + 1 {
        problems.push(format!(
            "{} logins for {} expiries",
            count("logins"),
            count("expiries")
        ));
    }
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
        "soak: {n} messages in {:.1} s ({:.0}/s), exit {status}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  journal: {accepted} accepted, {rejected} rejected (removed), {} lines",
        lines.len()
    );
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
    println!(
        "  sends seen by the emulator: {}; possible duplicates reported: {duplicates_reported}; devices that got a message twice: {duplicated}",
        count("sends")
    );
    println!(
        "  sender RSS: {:.1} MiB after warm-up, {:.1} MiB at most ({} samples)",
        min_rss as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        samples.len()
    );
    println!("  summary: {}", summary.trim());
    let _ = std::fs::remove_dir_all(&dir);
    if problems.is_empty() {
        println!("soak: every check holds");
        Ok(())
    } else {
        for p in problems.iter().take(20) {
            println!("  PROBLEM: {p}");
        }
        Err(format!("{} problems", problems.len()))
    }
}
