//! `cargo xtask soak --server`: the application server under every fault, checked afterwards
//! against the emulator's record of every send (its arrivals journal).
//!
//! - On PostgreSQL (the default): one API process and 3 worker processes sharing a throwaway
//!   cluster; 200,000 devices; 5 pushes to all, one after another, the third cancelled half
//!   way; one worker killed with SIGKILL at a random moment of each push and started again;
//!   a budget below the total, over short periods so that it runs out and comes back within
//!   the run. `--runs N` repeats it on fresh databases (different seeds).
//! - On SQLite (`--sqlite`): one `c2dm serve` process for 30 minutes (`--minutes M`), a push
//!   to all every 10 seconds; every push must finish.
//!
//! The checks (see [`check`]): one row per device and push; each accepted message seen once,
//! except sends in flight at a kill, each such copy counted in its row; no send to a device
//! after C2DM called it gone; none after a cancel took effect; none while any worker was
//! paused by a 503; the budget never exceeded. Not part of CI.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::arrivals::Arrival;
use serde_json::Value;

use crate::bench_server::{ADMIN, DEVICE, http};
use crate::soak::{DEVICE_FAULTS, SERVICE_FAULTS};

mod check;

use check::{Budget, Checked, PushRun, Row, check};

/// The sender account the emulator knows, and its password.
const EMAIL: &str = "soak@example.com";
const PASSWORD: &str = "soak-password";
/// splitmix64: the run's seeded choices.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A fraction in `[low, high)`.
    fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A `c2dm serve` process: SIGTERM and a wait when dropped.
struct Serve(Child);

impl Serve {
    /// SIGKILL, as a crash would; the process is reaped (its drop then finds it gone).
    fn kill(&mut self) -> Result<(), String> {
        self.0.kill().map_err(|e| format!("kill: {e}"))?;
        self.0.wait().map_err(|e| e.to_string())?;
        Ok(())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
}

/// How the run's `c2dm serve` processes are started.
struct Setup {
    bin: PathBuf,
    dir: PathBuf,
    database: String,
    send_url: String,
    login_url: String,
    cert: PathBuf,
    /// Options every process gets.
    common: Vec<String>,
    started: std::cell::Cell<u32>,
}

impl Setup {
    fn serve(&self, args: &[&str]) -> Result<Serve, String> {
        let n = self.started.get() + 1;
        self.started.set(n);
        let log = std::fs::File::create(self.dir.join(format!("serve-{n}.log")))
            .map_err(|e| e.to_string())?;
        Command::new(self.bin.join("c2dm"))
            .args(["--send-url", &self.send_url, "--login-url", &self.login_url])
            .arg("--ca-cert")
            .arg(&self.cert)
            .args(["--email", EMAIL, "--password-file"])
            .arg(self.dir.join("password"))
            .args(["serve", "--database", &self.database])
            .args(&self.common)
            .args(args)
            .env("C2DM_SERVER_ADMIN_TOKEN", ADMIN)
            .env("C2DM_SERVER_DEVICE_KEY", DEVICE)
            .env("C2DM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Serve)
            .map_err(|e| format!("c2dm serve: {e}"))
    }

    /// The API process, and its port.
    fn api(&self, workers: bool) -> Result<(Serve, u16), String> {
        let port_file = self.dir.join("api.port");
        let _ = std::fs::remove_file(&port_file);
        let port_arg = port_file.to_string_lossy().into_owned();
        let mut args = vec!["--listen", "127.0.0.1:0", "--port-file", &port_arg];
        if !workers {
            args.push("--no-workers");
        }
        let api = self.serve(&args)?;
        let port = crate::wait_for_port(&port_file, Duration::from_secs(60), "the API process")?;
        Ok((api, port))
    }
}

/// An answer's JSON, or why there is none.
fn call(port: u16, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value), String> {
    let (status, text, _) = http(port, method, path, ADMIN, body)?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok((status, json))
}

/// Starts a push to all with collapse key `key`; its id.
fn push(port: u16, key: &str) -> Result<String, String> {
    let body = format!(r#"{{"to": "all", "collapse_key": "{key}", "data": {{"push": "{key}"}}}}"#);
    let (status, answer) = call(port, "POST", "/v1/pushes", Some(&body))?;
    match (status, answer["id"].as_str()) {
        (202, Some(id)) => Ok(id.to_owned()),
        _ => Err(format!("POST /v1/pushes: {status} {answer}")),
    }
}

/// A push's state and how many of its devices have their row.
fn progress(port: u16, id: &str) -> Result<(String, u64), String> {
    let (status, answer) = call(port, "GET", &format!("/v1/pushes/{id}"), None)?;
    if status != 200 {
        return Err(format!("GET /v1/pushes/{id}: {status} {answer}"));
    }
    let tally = &answer["tally"];
    let rows = ["accepted", "rejected", "failed", "not_attempted"]
        .iter()
        .map(|k| tally[k].as_u64().unwrap_or(0))
        .sum();
    Ok((answer["state"].as_str().unwrap_or("").to_owned(), rows))
}

fn finished(state: &str) -> bool {
    matches!(state, "done" | "cancelled")
}

/// Calls `each` on every item of the paged list at `path` (under `key`), page after page.
fn each_item(
    port: u16,
    path: &str,
    key: &str,
    mut each: impl FnMut(&Value) -> Result<(), String>,
) -> Result<(), String> {
    let mut after = String::new();
    loop {
        let page_path = format!("{path}?limit=1000{after}");
        let (status, page) = call(port, "GET", &page_path, None)?;
        if status != 200 {
            return Err(format!("GET {page_path}: {status} {page}"));
        }
        for item in page[key].as_array().into_iter().flatten() {
            each(item)?;
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return Ok(()),
        }
    }
}

/// Every row of push `id`, by device (a second row for a device is an error).
fn rows(port: u16, id: &str) -> Result<HashMap<String, Row>, String> {
    let mut rows = HashMap::new();
    let path = format!("/v1/pushes/{id}/deliveries");
    each_item(port, &path, "deliveries", |row| {
        let device = row["registration_id"].as_str().unwrap_or("").to_owned();
        let text = |k: &str| row[k].as_str().map(str::to_owned);
        let row = Row {
            outcome: text("outcome").unwrap_or_default(),
            error: text("error"),
            message_id: text("message_id"),
            possible_duplicates: row["possible_duplicates"].as_u64().unwrap_or(0),
        };
        match rows.insert(device.clone(), row) {
            Some(_) => Err(format!("push {id}: two rows for {device}")),
            None => Ok(()),
        }
    })?;
    Ok(rows)
}

/// Every device's state, by registration id.
fn device_states(port: u16) -> Result<HashMap<String, String>, String> {
    let mut states = HashMap::new();
    each_item(port, "/v1/devices", "devices", |d| {
        let id = d["registration_id"].as_str().unwrap_or("").to_owned();
        states.insert(id, d["state"].as_str().unwrap_or("").to_owned());
        Ok(())
    })?;
    Ok(states)
}

/// The emulator's arrivals journal.
fn arrivals(path: &Path) -> Result<Vec<Arrival>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut all = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        all.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?,
        );
    }
    all.sort_by_key(|a: &Arrival| a.at_us);
    Ok(all)
}

/// The emulator of a soak: TLS, every fault, an account to log in with, and its arrivals.
fn emulator(
    bin: &Path,
    dir: &Path,
    seed: u64,
    unavailable_every: u64,
) -> Result<crate::bench::Emulator, String> {
    let account = format!("{EMAIL}:{PASSWORD}");
    let arrivals = dir.join("arrivals.jsonl").to_string_lossy().into_owned();
    let seed = seed.to_string();
    let unavailable_every = unavailable_every.to_string();
    let mut args = vec!["--account", &account];
    args.extend(DEVICE_FAULTS);
    args.extend(SERVICE_FAULTS);
    args.extend([
        "--unavailable-every",
        &unavailable_every,
        "--retry-after-secs",
        "3",
        "--token-lifetime-sends",
        "20000",
        "--seed",
        &seed,
        "--arrivals-out",
        &arrivals,
    ]);
    crate::bench::Emulator::start_with(bin, dir, true, true, &args)
}

fn setup(
    bin: &Path,
    dir: &Path,
    emulator: &crate::bench::Emulator,
    database: String,
    common: &[&str],
) -> Result<Setup, String> {
    let password = dir.join("password");
    std::fs::write(&password, PASSWORD).map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
    }
    Ok(Setup {
        bin: bin.to_owned(),
        dir: dir.to_owned(),
        database,
        send_url: emulator.send_url(),
        login_url: emulator.login_url(),
        cert: emulator.cert().ok_or("the emulator has no certificate")?,
        common: common.iter().map(|s| (*s).to_owned()).collect(),
        started: std::cell::Cell::new(0),
    })
}

/// Prints what a run found; an error if it found problems.
fn report(name: &str, started: Instant, checked: &Checked) -> Result<(), String> {
    println!("{name}: {:.0} s", started.elapsed().as_secs_f64());
    for figure in &checked.figures {
        println!("  {figure}");
    }
    crate::soak::verdict("  every check holds", &checked.problems)
        .map_err(|e| format!("{name}: {e}"))
}

/// Options of the PostgreSQL soak.
struct Soak {
    devices: u64,
    pushes: usize,
    cancel: usize,
    workers: usize,
    budget: Budget,
}

/// One run of the PostgreSQL soak on a fresh database.
fn postgres_run(
    bin: &Path,
    dir: &Path,
    cluster: &c2dm_testkit::PostgresCluster,
    soak: &Soak,
    seed: u64,
) -> Result<(), String> {
    let started = Instant::now();
    let mut rng = Rng(seed);
    let emulator = emulator(bin, dir, seed, 40_000)?;
    let database = cluster
        .create_database_blocking("soak")
        .map_err(|e| e.to_string())?;
    let limit = soak.budget.limit.to_string();
    let period = soak.budget.period.as_secs().to_string();
    let setup = setup(
        bin,
        dir,
        &emulator,
        database.clone(),
        &[
            "--daily-budget",
            &limit,
            "--budget-period",
            &period,
            "--heartbeat",
            "1",
        ],
    )?;
    let (api, port) = setup.api(false)?;
    let insert = format!(
        "INSERT INTO devices (registration_id, state, created_at, updated_at, state_changed_at) \
         SELECT CASE WHEN g % 100 IN (7, 57) THEN 'gone-' WHEN g % 100 = 13 THEN 'bad-' \
         WHEN g % 100 = 21 THEN 'busy-' ELSE 'device-' END || lpad(g::text, 7, '0'), \
         'active', 0, 0, 0 FROM generate_series(0, {}) AS g; ANALYZE devices;",
        soak.devices - 1
    );
    let status = Command::new(cluster.program("psql"))
        .args(["-q", "-v", "ON_ERROR_STOP=1", &database, "-c", &insert])
        .status()
        .map_err(|e| format!("psql: {e}"))?;
    if !status.success() {
        return Err(format!("inserting devices: {status}"));
    }
    let devices: Vec<String> = (0..soak.devices).map(crate::soak::id).collect();
    let worker_args = ["--no-api", "--workers", "2", "--concurrency", "64"];
    let mut workers = (0..soak.workers)
        .map(|_| setup.serve(&worker_args))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "soak: {} devices, {} worker processes, seed {seed}",
        soak.devices, soak.workers
    );
    let mut pushes = Vec::new();
    for n in 1..=soak.pushes {
        let key = format!("soak-{seed}-{n}");
        let id = push(port, &key)?;
        let cancel = n == soak.cancel;
        let kill_at = rng.between(0.05, if cancel { 0.45 } else { 0.95 });
        let kill_rows = (kill_at * soak.devices as f64) as u64;
        let victim = usize::try_from(rng.next_u64() % soak.workers as u64).unwrap_or(0);
        let mut run = PushRun {
            key,
            id,
            posted: Instant::now(),
            took: None,
            killed: None,
            cancelled_at_us: None,
            rows: HashMap::new(),
        };
        let mut last_rows = 0;
        loop {
            let (state, rows) = progress(port, &run.id)?;
            if finished(&state) {
                run.took = Some(run.posted.elapsed());
                break;
            }
            if run.killed.is_none() && rows >= kill_rows {
                let at = now_us();
                workers[victim].kill()?;
                workers[victim] = setup.serve(&worker_args)?;
                run.killed = Some((at, rows));
            }
            // Half way, and while rows are being written (the workers send in bursts, when
            // a budget period opens, and idle once it is spent): the cancel must stop sends
            // under way.
            let growing = rows >= last_rows + 100;
            last_rows = rows;
            if cancel && run.cancelled_at_us.is_none() && rows >= soak.devices / 2 && growing {
                let path = format!("/v1/pushes/{}/cancel", run.id);
                let asked = now_us();
                let (status, answer) = call(port, "POST", &path, None)?;
                if status != 200 && status != 202 {
                    return Err(format!("POST {path}: {status} {answer}"));
                }
                run.cancelled_at_us = Some((asked, now_us()));
            }
            if run.posted.elapsed() > Duration::from_secs(1800) {
                return Err(format!("push {} not done within half an hour", run.key));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "soak: push {} finished in {:.1} s (worker {victim} killed at {} rows)",
            run.key,
            run.took.unwrap_or_default().as_secs_f64(),
            run.killed.map_or(0, |(_, rows)| rows)
        );
        pushes.push(run);
    }
    for push in &mut pushes {
        push.rows = rows(port, &push.id)?;
    }
    let states = device_states(port)?;
    drop(workers);
    drop(api);
    emulator.interrupt()?;
    let arrivals = arrivals(&dir.join("arrivals.jsonl"))?;
    let mut checked = check(&devices, &states, &pushes, &arrivals, Some(soak.budget));
    for push in &pushes {
        let count = |outcome: &str| push.rows.values().filter(|r| r.outcome == outcome).count();
        checked.figures.insert(
            0,
            format!(
                "push {}: {:.1} s, worker killed at {} rows; {} accepted, {} rejected, {} failed, {} not attempted",
                push.key,
                push.took.unwrap_or_default().as_secs_f64(),
                push.killed.map_or(0, |(_, rows)| rows),
                count("accepted"),
                count("rejected"),
                count("failed"),
                count("not_attempted"),
            ),
        );
    }
    checked
        .figures
        .push(format!("emulator: {} send requests", arrivals.len()));
    report(
        &format!("soak on PostgreSQL, seed {seed}"),
        started,
        &checked,
    )
}

/// The long soak on SQLite: one process, a push to all every 10 s for `minutes`.
fn sqlite_run(bin: &Path, dir: &Path, devices: u64, minutes: u64, seed: u64) -> Result<(), String> {
    let started = Instant::now();
    let emulator = emulator(bin, dir, seed, 10_000)?;
    let database = format!("sqlite://{}", dir.join("soak.db").display());
    let setup = setup(bin, dir, &emulator, database, &["--no-daily-budget"])?;
    let (server, port) = setup.api(true)?;
    let ids: Vec<String> = (0..devices).map(crate::soak::id).collect();
    for id in &ids {
        let body = format!(r#"{{"registration_id": "{id}"}}"#);
        let (status, answer, _) = http(port, "POST", "/v1/devices", DEVICE, Some(&body))?;
        if status != 201 {
            return Err(format!("POST /v1/devices: {status} {answer}"));
        }
    }
    eprintln!("soak: {devices} devices, a push every 10 s for {minutes} min, seed {seed}");
    let every = Duration::from_secs(10);
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let mut pushes: Vec<PushRun> = Vec::new();
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next && now < end {
            let key = format!("soak-{seed}-{}", pushes.len() + 1);
            let id = push(port, &key)?;
            pushes.push(PushRun {
                key,
                id,
                posted: now,
                took: None,
                killed: None,
                cancelled_at_us: None,
                rows: HashMap::new(),
            });
            next += every;
        }
        for run in pushes.iter_mut().filter(|p| p.took.is_none()) {
            if finished(&progress(port, &run.id)?.0) {
                run.took = Some(run.posted.elapsed());
            }
        }
        let open = pushes.iter().filter(|p| p.took.is_none()).count();
        if now >= end && open == 0 {
            break;
        }
        if now >= end + Duration::from_secs(300) {
            return Err(format!(
                "{open} pushes not finished 5 minutes after the last was made"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for push in &mut pushes {
        push.rows = rows(port, &push.id)?;
    }
    let states = device_states(port)?;
    drop(server);
    emulator.interrupt()?;
    let arrivals = arrivals(&dir.join("arrivals.jsonl"))?;
    let mut checked = check(&ids, &states, &pushes, &arrivals, None);
    let mut took: Vec<f64> = pushes
        .iter()
        .map(|p| p.took.unwrap_or_default().as_secs_f64())
        .collect();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let first = median(&took[..took.len().min(10)]);
    let last = median(&took[took.len().saturating_sub(10)..]);
    took.sort_by(f64::total_cmp);
    checked.figures.insert(
        0,
        format!(
            "{} pushes, each finished: from POST to done, median of the first 10 {first:.2} s, of the last 10 {last:.2} s, longest {:.2} s",
            pushes.len(),
            took.last().copied().unwrap_or(0.0)
        ),
    );
    checked
        .figures
        .push(format!("emulator: {} send requests", arrivals.len()));
    report(&format!("soak on SQLite, {minutes} min"), started, &checked)
}

/// `cargo xtask soak --server [--sqlite [--minutes M]] [--runs N] [--devices N]`.
pub fn run(root: &Path, args: &crate::SoakArgs) -> Result<(), String> {
    let crate::SoakArgs {
        sqlite,
        runs,
        minutes,
        devices,
        ..
    } = *args;
    let bin = crate::build_dist(root, &["--bins"])?;
    let base = std::env::temp_dir().join(format!("c2dm-soak-server-{}", std::process::id()));
    let result = if sqlite {
        std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        sqlite_run(&bin, &base, devices.unwrap_or(2_000), minutes, 20_261_130)
    } else {
        let cluster = c2dm_testkit::PostgresCluster::start().map_err(|e| e.to_string())?;
        let soak = Soak {
            devices: devices.unwrap_or(200_000),
            pushes: 5,
            cancel: 3,
            workers: 3,
            // 2,000 a second on average: below what the workers send, so that it runs out in
            // most periods and its devices wait for the next.
            budget: Budget {
                limit: 20_000,
                period: Duration::from_secs(10),
            },
        };
        let mut result = Ok(());
        for run in 0..runs {
            let dir = base.join(format!("run-{run}"));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            result = postgres_run(&bin, &dir, &cluster, &soak, 20_261_130 + run);
            if result.is_err() {
                break;
            }
        }
        result
    };
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&base);
        }
        Err(_) => eprintln!("soak: the logs are kept in {}", base.display()),
    }
    result
}
