//! `cargo xtask bench --server --scaling`: does the server scale out? One API process and 1, 2
//! and 3 worker processes on one PostgreSQL database (a throwaway cluster), the same
//! concurrency in each, push to 100,000 devices through an emulator that waits 20 ms before
//! each answer, so the work is bound by waiting, not by CPU. Reports each run's rate, its
//! ratio to one process, and what the database spent (its processes' CPU time) per batch.
//! Not part of CI.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench_server::{ADMIN, DEVICE, http};

/// The devices of each push.
const DEVICES: u64 = 100_000;
/// The devices of each batch job (the server's default).
const BATCH: u64 = 1_000;
/// Each worker process's sends at once.
const CONCURRENCY: &str = "64";
/// Each worker process's batch jobs at once.
const WORKERS: &str = "2";
/// How long the emulator waits before each answer.
const LATENCY_MS: &str = "20";

/// A `c2dm serve` process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn serve(
    bin: &Path,
    database: &str,
    send_url: &str,
    args: &[&str],
    port_file: Option<&Path>,
) -> Result<Process, String> {
    let mut command = Command::new(bin.join("c2dm"));
    command
        .args(["--token", "BENCH", "--send-url", send_url, "serve"])
        .args(["--database", database, "--no-daily-budget"])
        .args(args)
        .env("C2DM_SERVER_ADMIN_TOKEN", ADMIN)
        .env("C2DM_SERVER_DEVICE_KEY", DEVICE)
        .env("C2DM_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(file) = port_file {
        command.arg("--port-file").arg(file);
    }
    command
        .spawn()
        .map(Process)
        .map_err(|e| format!("c2dm serve: {e}"))
}

/// The CPU time (user and system) of every process named `postgres` so far: the throwaway
/// cluster's, the only one on a bench machine.
fn database_cpu() -> Duration {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "postgres") {
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            let fields: Vec<&str> = stat
                .rsplit_once(") ")
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            for i in [11, 12] {
                ticks += fields
                    .get(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    // Clock ticks of 1/100 s on Linux.
    Duration::from_millis(ticks * 10)
}

/// One push to [`DEVICES`] fresh devices with `processes` worker processes: (messages/s,
/// database CPU per batch).
fn run_once(
    bin: &Path,
    dir: &Path,
    cluster: &c2dm_server::throwaway::PostgresCluster,
    send_url: &str,
    processes: usize,
) -> Result<(f64, Duration), String> {
    let database = cluster
        .create_database_blocking("scaling")
        .map_err(|e| e.to_string())?;
    let port_file = dir.join(format!("scaling-{processes}.port"));
    let _ = std::fs::remove_file(&port_file);
    let api = serve(
        bin,
        &database,
        send_url,
        &["--no-workers", "--listen", "127.0.0.1:0"],
        Some(&port_file),
    )?;
    let port = crate::wait_for_port(&port_file, Duration::from_secs(60), "the API process")?;
    let psql = cluster.program("psql");
    let insert = format!(
        "INSERT INTO devices (registration_id, state, created_at, updated_at, state_changed_at) \
         SELECT 'device-' || lpad(value::text, 8, '0'), 'active', 0, 0, 0 \
         FROM generate_series(0, {}) AS g(value);",
        DEVICES - 1
    );
    let status = Command::new(&psql)
        .args(["-q", "-v", "ON_ERROR_STOP=1", &database, "-c", &insert])
        .status()
        .map_err(|e| format!("psql: {e}"))?;
    if !status.success() {
        return Err(format!("inserting devices: {status}"));
    }
    let workers = (0..processes)
        .map(|_| {
            serve(
                bin,
                &database,
                send_url,
                &[
                    "--no-api",
                    "--workers",
                    WORKERS,
                    "--concurrency",
                    CONCURRENCY,
                ],
                None,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cpu_before = database_cpu();
    let body = r#"{"to": "all", "collapse_key": "k", "data": {"message": "scaling"}}"#;
    let started = Instant::now();
    let (status, answer, _) = http(port, "POST", "/v1/messages", ADMIN, Some(body))?;
    if status != 202 {
        return Err(format!("POST /v1/messages: {status} {answer}"));
    }
    let id = crate::bench::json_string(&answer, "id").ok_or("no id")?;
    let done = loop {
        let (_, status, _) = http(
            port,
            "GET",
            &format!("/v1/messages/{id}?wait=60"),
            ADMIN,
            None,
        )?;
        if status.contains(r#""state":"done""#) {
            break status;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("not done within half an hour: {status}"));
        }
    };
    let elapsed = started.elapsed();
    let database_spent = database_cpu().saturating_sub(cpu_before);
    let accepted = crate::bench::json_number(&done, "accepted").unwrap_or(0.0) as u64;
    if accepted != DEVICES {
        return Err(format!("{accepted} of {DEVICES} accepted: {done}"));
    }
    drop(workers);
    drop(api);
    Ok((
        DEVICES as f64 / elapsed.as_secs_f64(),
        database_spent / u32::try_from(DEVICES / BATCH).unwrap_or(1),
    ))
}

/// `cargo xtask bench --server --scaling [--write]`.
pub fn run(root: &Path, args: &[&str]) -> Result<(), String> {
    let bin = crate::build_release(root, &["--bins"])?;
    let dir = std::env::temp_dir().join(format!("c2dm-bench-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let emulator =
        crate::bench::Emulator::start_with(&bin, &dir, false, true, &["--latency-ms", LATENCY_MS])?;
    let send_url = emulator.send_url();
    let cluster = c2dm_server::throwaway::PostgresCluster::start().map_err(|e| e.to_string())?;
    let mut rows = vec![
        format!(
            "| worker processes | rate (msg/s) | × one process | database CPU per batch of {BATCH} |"
        ),
        "|---:|---:|---:|---:|".to_owned(),
    ];
    let mut one = None;
    let mut result = Ok(());
    for processes in 1..=3 {
        match run_once(&bin, &dir, &cluster, &send_url, processes) {
            Ok((rate, per_batch)) => {
                let base = *one.get_or_insert(rate);
                let row = format!(
                    "| {processes} | {rate:.0} | {:.2} | {:.1} ms |",
                    rate / base,
                    per_batch.as_secs_f64() * 1e3
                );
                eprintln!("{row}");
                rows.push(row);
            }
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    drop(emulator);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let report = format!(
        "{DEVICES} devices, an emulator waiting {LATENCY_MS} ms before each answer, each worker \
         process `--workers {WORKERS} --concurrency {CONCURRENCY}`, one API process, PostgreSQL \
         (a throwaway cluster on this machine), {}:\n\n{}\n",
        crate::bench::machine(),
        rows.join("\n")
    );
    println!("{report}");
    if args.contains(&"--write") {
        crate::bench::write_between(root, "scaling", &report)?;
    }
    Ok(())
}
