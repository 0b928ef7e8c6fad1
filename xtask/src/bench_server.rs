//! `cargo xtask bench --server`: the application server end to end, against the emulator, on
//! SQLite and on PostgreSQL (a throwaway cluster), beside `c2dm broadcast` of the same ids in
//! the same run: a push's rate, the POST's latency, the process's peak memory at two audience
//! sizes, and device registrations per second under wrk. Not part of CI.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const ADMIN: &str = "bench-admin-token";
pub(crate) const DEVICE: &str = "bench-device-key";

/// One HTTP/1.1 exchange on a fresh connection: (status, body, time to the whole answer).
pub(crate) fn http(
    port: u16,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> Result<(u16, String, Duration), String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let elapsed = started.elapsed();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body, elapsed))
}

/// A `c2dm serve` process.
pub(crate) struct Server {
    child: Child,
    port: u16,
}

impl Server {
    pub(crate) fn start(
        bin: &Path,
        dir: &Path,
        database: &str,
        send_url: &str,
    ) -> Result<Self, String> {
        Self::start_with(bin, dir, database, send_url, &[])
    }

    /// [`Server::start`] with `extra` options (`--no-workers`; `--no-api` with
    /// `--metrics-listen`, whose port then goes to the port file).
    pub(crate) fn start_with(
        bin: &Path,
        dir: &Path,
        database: &str,
        send_url: &str,
        extra: &[&str],
    ) -> Result<Self, String> {
        let port_file = dir.join(format!("server-port-{}", extra.join("")));
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new(bin.join("c2dm"))
            .args(["--token", "BENCH", "--send-url", send_url, "serve"])
            .args(["--database", database])
            .args(if extra.contains(&"--no-api") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .arg("--port-file")
            .arg(&port_file)
            .arg("--no-daily-budget")
            .args(extra)
            .args(
                std::env::var("BENCH_EXTRA")
                    .unwrap_or_else(|_| "--workers 4 --concurrency 64".into())
                    .split_whitespace(),
            )
            .env("C2DM_SERVER_ADMIN_TOKEN", ADMIN)
            .env("C2DM_SERVER_DEVICE_KEY", DEVICE)
            .env("C2DM_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("c2dm serve: {e}"))?;
        let port = crate::wait_for_port(&port_file, Duration::from_secs(60), "c2dm serve")?;
        Ok(Self { child, port })
    }

    /// The port its API listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// CPU time (user and system) so far.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // After the command's name in parentheses: fields 14 and 15 are utime and stime.
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // Clock ticks of 1/100 s on Linux.
        Duration::from_millis((ticks(11) + ticks(12)) * 10)
    }

    /// The peak resident memory so far.
    fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Where the devices are kept.
enum Database {
    Sqlite(PathBuf),
    Postgres(String, PathBuf),
}

impl Database {
    fn url(&self) -> String {
        match self {
            Self::Sqlite(file) => format!("sqlite://{}", file.display()),
            Self::Postgres(url, _) => url.clone(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "SQLite",
            Self::Postgres(..) => "PostgreSQL",
        }
    }

    /// Registers devices `device-00000000` … straight into the table (registering a million
    /// over HTTP is measured apart, by wrk): one statement; then the planner's statistics, as
    /// a table that grew over time would have them (PostgreSQL, without them, sorts every
    /// device for each page of the push's walk).
    fn insert_devices(&self, n: u64) -> Result<(), String> {
        let sql = format!(
            "{wait}INSERT INTO devices (registration_id, state, created_at, updated_at, state_changed_at) \
             SELECT {id}, 'active', 0, 0, 0 FROM {series}; ANALYZE devices;",
            // The server's workers write to the file too: wait for the lock, as they do.
            wait = match self {
                Self::Sqlite(_) => ".timeout 30000\n",
                Self::Postgres(..) => "",
            },
            id = match self {
                Self::Sqlite(_) => "printf('device-%08d', value)",
                Self::Postgres(..) => "'device-' || lpad(value::text, 8, '0')",
            },
            series = match self {
                Self::Sqlite(_) => format!(
                    "(WITH RECURSIVE s(value) AS (SELECT 0 UNION ALL SELECT value + 1 FROM s \
                     WHERE value + 1 < {n}) SELECT value FROM s)"
                ),
                Self::Postgres(..) => format!("generate_series(0, {}) AS g(value)", n - 1),
            },
        );
        let mut command = match self {
            Self::Sqlite(file) => {
                let mut c = Command::new("sqlite3");
                c.arg(file);
                c
            }
            Self::Postgres(url, psql) => {
                let mut c = Command::new(psql);
                c.args(["-q", "-v", "ON_ERROR_STOP=1"]).arg(url);
                c
            }
        };
        let mut child = command
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{command:?}: {e}"))?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(sql.as_bytes())
            .map_err(|e| e.to_string())?;
        let status = child.wait().map_err(|e| e.to_string())?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("inserting devices failed: {status}"))
    }
}

/// One push to `n` fresh devices through a fresh server.
struct Push {
    /// Messages per second, from the POST to done.
    rate: f64,
    /// The POST's answer time.
    latency: Duration,
    /// The server's peak RSS, KiB.
    rss_kib: u64,
    /// The server's CPU time per message during the push, µs.
    cpu_us: f64,
}

/// One push to `n` fresh devices through a fresh server.
fn push(
    bin: &Path,
    dir: &Path,
    database: &Database,
    send_url: &str,
    n: u64,
) -> Result<Push, String> {
    let server = Server::start(bin, dir, &database.url(), send_url)?;
    database.insert_devices(n)?;
    let cpu_before = server.cpu();
    let body = r#"{"to": "all", "collapse_key": "k", "data": {"message": "test", "sound": "t"}}"#;
    let started = Instant::now();
    let (status, answer, latency) = http(server.port, "POST", "/v1/pushes", ADMIN, Some(body))?;
    if status != 202 {
        return Err(format!("POST /v1/pushes: {status} {answer}"));
    }
    let id = crate::bench::json_string(&answer, "/id").ok_or("no id")?;
    let done = loop {
        let path = format!("/v1/pushes/{id}?wait=60");
        let (_, status, _) = http(server.port, "GET", &path, ADMIN, None)?;
        if crate::bench::json_string(&status, "/state").as_deref() == Some("done") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err(format!("not done within an hour: {status}"));
        }
    };
    let elapsed = started.elapsed();
    let accepted = crate::bench::json_number(&done, "/counts/accepted").unwrap_or(0.0) as u64;
    if accepted != n {
        return Err(format!("{accepted} of {n} accepted: {done}"));
    }
    Ok(Push {
        rate: n as f64 / elapsed.as_secs_f64(),
        latency,
        rss_kib: server.peak_rss_kib(),
        cpu_us: (server.cpu() - cpu_before).as_secs_f64() * 1e6 / n as f64,
    })
}

/// Pushes to one device, one after another, each timed from its POST to its status saying
/// done (`GET ?wait=`, which answers as soon as it is): `count` of them, after three not
/// counted. Returns (median, p99) in milliseconds.
fn one_device(api: u16, count: usize) -> Result<(f64, f64), String> {
    let body = r#"{"to": {"registration_ids": ["device-00000000"]}, "collapse_key": "chat", "data": {"message": "hi"}}"#;
    let mut took = Vec::with_capacity(count);
    for i in 0..count + 3 {
        let started = Instant::now();
        let (status, answer, _) = http(api, "POST", "/v1/pushes", ADMIN, Some(body))?;
        if status != 202 {
            return Err(format!("POST /v1/pushes: {status} {answer}"));
        }
        let id = crate::bench::json_string(&answer, "/id").ok_or("no id")?;
        let (_, status, _) = http(api, "GET", &format!("/v1/pushes/{id}?wait=10"), ADMIN, None)?;
        if crate::bench::json_string(&status, "/state").as_deref() != Some("done") {
            return Err(format!("a push to one device not done in 10 s: {status}"));
        }
        if i >= 3 {
            took.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    took.sort_by(f64::total_cmp);
    let p99 = took[(took.len() * 99).div_ceil(100).saturating_sub(1)];
    Ok((crate::bench::median(took.iter().copied()), p99))
}

/// The latency table: a push to one device, POST to done, on SQLite and PostgreSQL with the
/// API and the workers in one process, and on PostgreSQL in two.
fn latency_rows(
    bin: &Path,
    dir: &Path,
    cluster: &c2dm_testkit::PostgresCluster,
    send_url: &str,
    count: usize,
) -> Result<Vec<String>, String> {
    let mut rows = vec![
        format!("| a push to one device, POST to done ({count} in a row) | median | p99 |"),
        "|---|---:|---:|".to_owned(),
    ];
    let sqlite = Database::Sqlite(dir.join("latency.db"));
    let postgres = || -> Result<Database, String> {
        Ok(Database::Postgres(
            cluster
                .create_database_blocking("latency")
                .map_err(|e| e.to_string())?,
            cluster.program("psql"),
        ))
    };
    for (database, split) in [(sqlite, false), (postgres()?, false), (postgres()?, true)] {
        let url = database.url();
        let (api, workers) = if split {
            let api = Server::start_with(bin, dir, &url, send_url, &["--no-workers"])?;
            let workers = Server::start_with(
                bin,
                dir,
                &url,
                send_url,
                &["--no-api", "--metrics-listen", "127.0.0.1:0"],
            )?;
            (api, Some(workers))
        } else {
            (Server::start(bin, dir, &url, send_url)?, None)
        };
        database.insert_devices(1)?;
        let (median, p99) = one_device(api.port(), count)?;
        let how = if split {
            "API and workers in two processes"
        } else {
            "API and workers in one process"
        };
        eprintln!(
            "   {}, {how}: median {median:.1} ms, p99 {p99:.1} ms",
            database.name()
        );
        rows.push(format!(
            "| {}, {how} | {median:.1} ms | {p99:.1} ms |",
            database.name()
        ));
        drop(workers);
        drop(api);
    }
    Ok(rows)
}

const REGISTER_SCRIPT: &str = r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-device-key"
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/v1/devices", nil, '{"registration_id": "wrk-device-' .. counter .. '", "user_id": "u' .. (counter % 1000) .. '", "tags": ["news"]}')
end
"#;

/// Registrations per second over HTTP on SQLite with `wrk -t1 -c16`, and the p99 latency
/// in ms.
fn registrations(
    bin: &Path,
    dir: &Path,
    send_url: &str,
    seconds: u32,
) -> Result<(f64, f64), String> {
    let database = Database::Sqlite(dir.join("registrations.db"));
    let server = Server::start(bin, dir, &database.url(), send_url)?;
    let script = dir.join("register.lua");
    std::fs::write(&script, REGISTER_SCRIPT).map_err(|e| e.to_string())?;
    let out = Command::new("wrk")
        .args(["-t1", "-c16", &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/", server.port))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains("Non-2xx") {
        return Err(format!("registrations failed:\n{text}"));
    }
    let rate = crate::bench::wrk_rate(&text)?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .and_then(parse_wrk_duration)
        .ok_or_else(|| format!("no p99 from wrk:\n{text}"))?;
    Ok((rate, p99))
}

/// wrk's `1.23ms`, `456.00us` or `1.02s`, in milliseconds.
fn parse_wrk_duration(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let value: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(value / 1000.0),
        "ms" => Some(value),
        "s" => Some(value * 1000.0),
        "m" => Some(value * 60_000.0),
        _ => None,
    }
}

/// `cargo xtask bench --server [--quick] [--rounds N] [--write]`.
pub fn run(root: &Path, args: &crate::BenchArgs) -> Result<(), String> {
    let quick = args.quick;
    let big: u64 = if quick { 100_000 } else { 1_000_000 };
    let small: u64 = 10_000;
    let bin = crate::build_dist(root, &["--bins"])?;
    let dir = std::env::temp_dir().join(format!("c2dm-bench-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let emulator = crate::bench::Emulator::start(&bin, &dir, false, true)?;
    let send_url = emulator.send_url();
    let cluster = c2dm_testkit::PostgresCluster::start().map_err(|e| e.to_string())?;
    let latency = latency_rows(
        &bin,
        &dir,
        &cluster,
        &send_url,
        if quick { 30 } else { 100 },
    )?;
    let latency = format!(
        "Measured by `cargo xtask bench --server{}` on {}: pushes to one device one after \
         another, each from its POST to the status request (`?wait=10`) answering done, against \
         the emulator; three more before them not counted; the programs were built with the \
         `dist` profile.\n\n{}\n",
        if args.latency { " --latency" } else { "" },
        crate::bench::machine(),
        latency.join("\n")
    );
    println!("{latency}");
    if args.write {
        crate::bench::write_between(root, "latency", &latency)?;
    }
    if args.latency {
        drop(emulator);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    // Registrations before the big pushes: after them, PostgreSQL's autovacuum works through
    // their million rows for a while, and the registrations' p99 went from 7 ms to 100.
    let registered = if crate::bench::have("wrk") {
        Some(registrations(
            &bin,
            &dir,
            &send_url,
            if quick { 3 } else { 10 },
        )?)
    } else {
        eprintln!("note: wrk is not installed (apt-get install -y wrk): no registration figures");
        None
    };

    let rounds = args.rounds();
    let mut rows = vec![
        "| path | devices | rate (msg/s) | rate / `c2dm broadcast` | POST answered in | peak RSS | CPU µs/msg |"
            .to_owned(),
        "|---|---:|---:|---:|---:|---:|---:|".to_owned(),
    ];
    for size in [small, big] {
        // Round by round, `c2dm broadcast` and then a push on each database, so that each
        // ratio is taken within a round: the machine's speed moves from minute to minute.
        let mut broadcasts = Vec::with_capacity(rounds);
        let mut broadcast_rss = 0;
        // Each database's name, with its pushes of every round.
        let mut pushes: Vec<(&str, Vec<Push>)> = Vec::new();
        for round in 1..=rounds {
            let (rate, cpu, rss) = crate::bench::broadcast(
                crate::bench::Protocol::C2dm,
                &bin,
                &dir,
                &emulator,
                size,
                64,
            )?;
            broadcasts.push(crate::bench::Sample { rate, cpu });
            broadcast_rss = broadcast_rss.max(rss);
            let file = dir.join(format!("push-{size}-{round}.db"));
            let databases = [
                Database::Sqlite(file.clone()),
                Database::Postgres(
                    cluster
                        .create_database_blocking("bench")
                        .map_err(|e| e.to_string())?,
                    cluster.program("psql"),
                ),
            ];
            for (k, database) in databases.iter().enumerate() {
                eprintln!(
                    "== round {round} of {rounds}: a push to {size} devices on {}",
                    database.name()
                );
                let result = push(&bin, &dir, database, &send_url, size)?;
                // Each round's figures, to three places: the table rounds its median to two.
                eprintln!(
                    "   {:.0} msg/s, {:.3} of `c2dm broadcast`'s {rate:.0}; {:.1} µs of CPU a message",
                    result.rate,
                    result.rate / rate,
                    result.cpu_us
                );
                match pushes.get_mut(k) {
                    Some((_, results)) => results.push(result),
                    None => pushes.push((database.name(), vec![result])),
                }
            }
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
        let median = |values: &mut dyn Iterator<Item = f64>| crate::bench::median(values);
        rows.push(format!(
            "| `c2dm broadcast` | {size} | {:.0} | 1.00 | | {:.1} MiB | {:.1} |",
            median(&mut broadcasts.iter().map(|b| b.rate)),
            broadcast_rss as f64 / 1024.0,
            median(&mut broadcasts.iter().map(|b| b.cpu)),
        ));
        for (name, results) in &pushes {
            let samples: Vec<crate::bench::Sample> = results
                .iter()
                .map(|p| crate::bench::Sample {
                    rate: p.rate,
                    cpu: p.cpu_us,
                })
                .collect();
            rows.push(format!(
                "| `c2dm serve`, {name} (4 batches × 64 sends) | {size} | {:.0} | {} | {:.1} ms | {:.1} MiB | {:.1} |",
                median(&mut samples.iter().map(|p| p.rate)),
                crate::bench::ratios(&samples, &broadcasts, |x| x.rate),
                median(&mut results.iter().map(|p| p.latency.as_secs_f64() * 1000.0)),
                results.iter().map(|p| p.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
                median(&mut samples.iter().map(|p| p.cpu)),
            ));
        }
    }
    let mut report = format!(
        "Measured by `cargo xtask bench --server{}` on {}: medians of {rounds} round{}, each \
         ratio taken within a round (median, and lowest-highest), the highest peak RSS; the \
         push's rate runs from the POST to the status saying done; the devices were written \
         straight into the table; the programs were built with the `dist` profile.\n\n",
        if quick { " --quick" } else { "" },
        crate::bench::machine(),
        if rounds == 1 { "" } else { "s" },
    );
    report.push_str(&rows.join("\n"));
    if let Some((rate, p99)) = registered {
        report.push_str(&format!(
            "\n\n| registrations over HTTP, SQLite, `wrk -t1 -c16` | value |\n|---|---:|\n\
             | registrations per second | {rate:.0} |\n| p99 latency | {p99:.2} ms |\n"
        ));
    }
    println!("{report}");
    drop(emulator);
    let _ = std::fs::remove_dir_all(&dir);
    if args.write {
        crate::bench::write_between(root, "server", &report)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_wrk_durations() {
        use super::parse_wrk_duration;
        assert_eq!(parse_wrk_duration("1.50ms"), Some(1.5));
        assert_eq!(parse_wrk_duration("250.00us"), Some(0.25));
        assert_eq!(parse_wrk_duration("1.02s"), Some(1020.0));
        assert_eq!(parse_wrk_duration("fast"), None);
    }
}
