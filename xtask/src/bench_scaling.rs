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
/// Each worker process's batch jobs at once, and sends at once within each batch, unless
/// `--workers` and `--concurrency` say otherwise: 2 × 16 sends waiting 20 ms make at most
/// 1,600 messages a second a process, so that three processes, the emulator and the
/// database fit on two cores with room to spare and the run measures the sharing of work,
/// not the machine's CPU.
const SHAPE: Shape = Shape {
    workers: 2,
    concurrency: 16,
};

/// How each worker process runs its batches.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Batch jobs at once (`--workers`).
    workers: u32,
    /// Sends at once within each batch (`--concurrency`).
    concurrency: u32,
}

impl Shape {
    /// Sends at once in one process.
    fn sends(self) -> u32 {
        self.workers * self.concurrency
    }

    /// The shape of the arguments: [`SHAPE`] with `--workers N` and `--concurrency N`.
    fn from_args(args: &crate::BenchArgs) -> Self {
        Self {
            workers: args.workers.unwrap_or(SHAPE.workers),
            concurrency: args.concurrency.unwrap_or(SHAPE.concurrency),
        }
    }
}
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

/// The machine's CPU time so far, busy and idle, in clock ticks: the first line of
/// `/proc/stat`.
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    let all: u64 = ticks.iter().take(8).sum();
    (all.saturating_sub(idle), idle)
}

/// One push to [`DEVICES`] fresh devices with `processes` worker processes.
fn run_once(
    bin: &Path,
    dir: &Path,
    cluster: &c2dm_testkit::PostgresCluster,
    send_url: &str,
    processes: usize,
    shape: Shape,
) -> Result<Run, String> {
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
    psql_run(&psql, &database, &insert)?;
    // The planner's statistics, as a table that grew over time would have them: without
    // them it walks the audience by sorting every device for each page of 1,000.
    psql_run(&psql, &database, "ANALYZE devices")?;
    let workers = (0..processes)
        .map(|_| {
            serve(
                bin,
                &database,
                send_url,
                &[
                    "--no-api",
                    "--workers",
                    &shape.workers.to_string(),
                    "--concurrency",
                    &shape.concurrency.to_string(),
                ],
                None,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    psql_run(
        &psql,
        &database,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset();",
    )?;
    let cpu_before = database_cpu();
    let machine_before = machine_cpu();
    let body = r#"{"to": "all", "collapse_key": "k", "data": {"message": "scaling"}}"#;
    let started = Instant::now();
    let (status, answer, _) = http(port, "POST", "/v1/pushes", ADMIN, Some(body))?;
    if status != 202 {
        return Err(format!("POST /v1/pushes: {status} {answer}"));
    }
    let id = crate::bench::json_string(&answer, "/id").ok_or("no id")?;
    let done = loop {
        let (_, status, _) = http(
            port,
            "GET",
            &format!("/v1/pushes/{id}?wait=60"),
            ADMIN,
            None,
        )?;
        if crate::bench::json_string(&status, "/state").as_deref() == Some("done") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("not done within half an hour: {status}"));
        }
    };
    let elapsed = started.elapsed();
    let database_spent = database_cpu().saturating_sub(cpu_before);
    let machine_after = machine_cpu();
    let busy = machine_after.0.saturating_sub(machine_before.0) as f64;
    let idle = machine_after.1.saturating_sub(machine_before.1) as f64;
    let accepted = crate::bench::json_number(&done, "/counts/accepted").unwrap_or(0.0) as u64;
    if accepted != DEVICES {
        return Err(format!("{accepted} of {DEVICES} accepted: {done}"));
    }
    drop(workers);
    drop(api);
    let statements = statements(&psql, &database)?;
    Ok(Run {
        rate: DEVICES as f64 / elapsed.as_secs_f64(),
        cpu_per_batch: database_spent / u32::try_from(DEVICES / BATCH).unwrap_or(1),
        busy: busy / (busy + idle).max(1.0),
        statements,
    })
}

/// What one push with some number of worker processes measured.
struct Run {
    /// Messages a second, from the POST to the status saying done.
    rate: f64,
    /// The database processes' CPU time during the push, per batch.
    cpu_per_batch: Duration,
    /// How busy the machine's cores were during the push, 0 to 1.
    busy: f64,
    /// Where the database's time went: a Markdown table of the statements that took most.
    statements: String,
}

/// Runs `sql` in `database` through `psql`, stopping at the first error; returns what it
/// printed (unaligned, tab-separated, no headers).
fn psql_run(psql: &Path, database: &str, sql: &str) -> Result<String, String> {
    let output = Command::new(psql)
        .args(["-q", "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"])
        .args([database, "-c", sql])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !output.status.success() {
        return Err(format!("psql: {}: {sql}", output.status));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The statements on which the database spent most time since the last reset, summed over
/// every database of the cluster and shown per batch: a Markdown table.
fn statements(psql: &Path, database: &str) -> Result<String, String> {
    let batches = DEVICES / BATCH;
    let sql = format!(
        "SELECT calls, round(total_exec_time::numeric, 1), \
         round((calls::numeric / {batches}), 2), \
         round((total_exec_time / {batches})::numeric, 2), \
         left(regexp_replace(query, '\\s+', ' ', 'g'), 90) \
         FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12"
    );
    let mut rows = vec![
        "| calls | total ms | calls per batch | ms per batch | statement |".to_owned(),
        "|---:|---:|---:|---:|---|".to_owned(),
    ];
    for line in psql_run(psql, database, &sql)?.lines() {
        let cells: Vec<String> = line.split('\t').map(|c| c.replace('|', "\\|")).collect();
        if cells.len() == 5 {
            rows.push(format!(
                "| {} | {} | {} | {} | `{}` |",
                cells[0], cells[1], cells[2], cells[3], cells[4]
            ));
        }
    }
    let total = psql_run(
        psql,
        database,
        &format!(
            "SELECT round(sum(total_exec_time)::numeric, 1), \
             round((sum(total_exec_time) / {batches})::numeric, 2) FROM pg_stat_statements"
        ),
    )?;
    let total: Vec<&str> = total.trim().split('\t').collect();
    rows.push(format!(
        "| | {} | | {} | all statements |",
        total.first().unwrap_or(&"?"),
        total.get(1).unwrap_or(&"?")
    ));
    Ok(rows.join("\n"))
}

/// The messages a second that `processes` processes of `shape` could make if every send
/// only waited for the emulator.
fn allowed(processes: usize, shape: Shape) -> f64 {
    let latency: f64 = LATENCY_MS.parse().unwrap_or(20.0);
    processes as f64 * f64::from(shape.sends()) * 1000.0 / latency
}

/// `cargo xtask bench --server --scaling [--workers N] [--concurrency N] [--write]`.
pub fn run(root: &Path, args: &crate::BenchArgs) -> Result<(), String> {
    let shape = Shape::from_args(args);
    let bin = crate::build_dist(root, &["--bins"])?;
    let dir = std::env::temp_dir().join(format!("c2dm-bench-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let emulator =
        crate::bench::Emulator::start_with(&bin, &dir, false, true, &["--latency-ms", LATENCY_MS])?;
    let send_url = emulator.send_url();
    let cluster = c2dm_testkit::PostgresCluster::start_with(&[
        ("shared_preload_libraries", "pg_stat_statements"),
        ("pg_stat_statements.track", "all"),
    ])
    .map_err(|e| e.to_string())?;
    let mut rows = vec![
        format!(
            "| worker processes | rate (msg/s) | × one process | of what the sends allow | database CPU per batch of {BATCH} | cores busy |"
        ),
        "|---:|---:|---:|---:|---:|---:|".to_owned(),
    ];
    let mut one = None;
    let mut result = Ok(());
    let mut spent = Vec::new();
    for processes in 1..=3 {
        match run_once(&bin, &dir, &cluster, &send_url, processes, shape) {
            Ok(run) => {
                let base = *one.get_or_insert(run.rate);
                let row = format!(
                    "| {processes} | {:.0} | {:.2} | {:.0} % | {:.1} ms | {:.0} % |",
                    run.rate,
                    run.rate / base,
                    run.rate / allowed(processes, shape) * 100.0,
                    run.cpu_per_batch.as_secs_f64() * 1e3,
                    run.busy * 100.0
                );
                eprintln!("{row}\n{}", run.statements);
                rows.push(row);
                spent.push(format!(
                    "Where the database's time went with {processes} worker process{} \
                     (`pg_stat_statements`, execution time only):\n\n{}",
                    if processes == 1 { "" } else { "es" },
                    run.statements
                ));
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
         process `--workers {} --concurrency {}`, one API process, PostgreSQL \
         (a throwaway cluster on this machine), {}:\n\n{}\n\n{}\n",
        shape.workers,
        shape.concurrency,
        crate::bench::machine(),
        rows.join("\n"),
        spent.join("\n\n")
    );
    println!("{report}");
    if args.write {
        crate::bench::write_between(root, "scaling", &report)?;
    }
    Ok(())
}
