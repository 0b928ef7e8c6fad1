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

use crate::arrivals::{Arrival, ArrivalAnswer};
use serde_json::Value;

use crate::bench_server::{ADMIN, DEVICE, http};
use crate::soak::{DEVICE_FAULTS, SERVICE_FAULTS};

/// The sender account the emulator knows, and its password.
const EMAIL: &str = "soak@example.com";
const PASSWORD: &str = "soak-password";
/// How late a send may reach the emulator after a 503 started a pause and still count as in
/// flight: the worker that got the 503 stops at once; the others read the shared pause from
/// the database at their next look (every 200 ms).
const PAUSE_GRACE: Duration = Duration::from_secs(1);
/// How late a send of a cancelled push may arrive after the cancel was answered and still
/// count as in flight: a batch looks for a cancel every 200 ms.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Whether the emulator calls `id` gone.
fn is_gone(id: &str) -> bool {
    id.starts_with("gone-") || id.starts_with("bad-")
}

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

/// One delivery row, as the API gives it.
#[derive(Debug)]
struct Row {
    outcome: String,
    error: Option<String>,
    message_id: Option<String>,
    possible_duplicates: u64,
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

/// What one push went through, as the run drove it.
struct PushRun {
    key: String,
    id: String,
    posted: Instant,
    /// How long until it finished.
    took: Option<Duration>,
    /// When the worker was killed, and how many rows there were then.
    killed: Option<(u64, u64)>,
    /// When the cancel was asked for, and when it was answered.
    cancelled_at_us: Option<(u64, u64)>,
    rows: HashMap<String, Row>,
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

/// The budget the run set, when it set one.
#[derive(Clone, Copy)]
struct Budget {
    limit: u64,
    period: Duration,
}

/// What the checks found: figures to print, and problems.
#[derive(Default)]
struct Checked {
    figures: Vec<String>,
    problems: Vec<String>,
}

impl Checked {
    fn problem(&mut self, text: String) {
        self.problems.push(text);
    }
}

/// A soak's record, with what its checks share: each push by its collapse key, and where each
/// device C2DM called gone was first answered so (the arrival's place, and its push).
struct Record<'a> {
    devices: &'a [String],
    states: &'a HashMap<String, String>,
    pushes: &'a [PushRun],
    arrivals: &'a [Arrival],
    by_key: HashMap<&'a str, &'a PushRun>,
    found_gone: HashMap<&'a str, (usize, &'a str)>,
}

impl<'a> Record<'a> {
    fn new(
        devices: &'a [String],
        states: &'a HashMap<String, String>,
        pushes: &'a [PushRun],
        arrivals: &'a [Arrival],
    ) -> Self {
        let mut found_gone: HashMap<&str, (usize, &str)> = HashMap::new();
        for (at, a) in arrivals.iter().enumerate() {
            if let (ArrivalAnswer::Rejected { code }, Some(id), Some(key)) =
                (&a.answer, &a.registration_id, &a.collapse_key)
                && matches!(code.as_str(), "NotRegistered" | "InvalidRegistration")
            {
                found_gone.entry(id.as_str()).or_insert((at, key.as_str()));
            }
        }
        Self {
            devices,
            states,
            pushes,
            arrivals,
            by_key: pushes.iter().map(|p| (p.key.as_str(), p)).collect(),
            found_gone,
        }
    }

    /// One row per device and push, for no other device; a device C2DM called gone has its row in
    /// the push that found it gone, and is in no later push's audience.
    fn one_row_per_device(&self, out: &mut Checked) {
        let devices = self.devices;
        let pushes = self.pushes;
        let found_gone = &self.found_gone;
        let known: std::collections::HashSet<&str> = devices.iter().map(String::as_str).collect();
        for push in pushes {
            let missing = devices
                .iter()
                .filter(|d| !push.rows.contains_key(*d))
                .filter(|d| {
                    !is_gone(d)
                        || found_gone.get(d.as_str()).map(|(_, key)| *key)
                            == Some(push.key.as_str())
                })
                .count();
            let strangers = push
                .rows
                .keys()
                .filter(|d| !known.contains(d.as_str()))
                .count();
            if missing > 0 || strangers > 0 {
                out.problem(format!(
                    "push {}: {missing} devices without a row, {strangers} rows for unknown devices",
                    push.key
                ));
            }
        }
    }

    /// Each accepted message seen once, except sends in flight at a kill, which their rows count;
    /// and each row's outcome is what the emulator said.
    fn each_acceptance_seen_once_or_counted(&self, out: &mut Checked) {
        let pushes = self.pushes;
        let arrivals = self.arrivals;
        let by_key = &self.by_key;
        let mut accepted: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
        for a in arrivals {
            if let (ArrivalAnswer::Accepted { message_id }, Some(id), Some(key)) =
                (&a.answer, &a.registration_id, &a.collapse_key)
            {
                accepted
                    .entry((key.as_str(), id.as_str()))
                    .or_default()
                    .push(message_id);
            }
        }
        let (mut copies, mut marked, mut rows_marked) = (0u64, 0u64, 0u64);
        for push in pushes {
            for (id, row) in &push.rows {
                marked += row.possible_duplicates;
                rows_marked += u64::from(row.possible_duplicates > 0);
                let got = accepted
                    .get(&(push.key.as_str(), id.as_str()))
                    .map_or(&[][..], Vec::as_slice);
                if row.outcome == "accepted"
                    && !row.message_id.as_deref().is_some_and(|m| got.contains(&m))
                {
                    out.problem(format!(
                        "push {} {id}: the row says accepted as {:?}; the emulator accepted {got:?}",
                        push.key, row.message_id
                    ));
                }
                if !got.is_empty() && row.outcome != "accepted" && row.possible_duplicates == 0 {
                    out.problem(format!(
                        "push {} {id}: the emulator accepted it, the row says {} {:?} unmarked",
                        push.key, row.outcome, row.error
                    ));
                }
                let extra = (got.len() as u64).saturating_sub(1);
                copies += extra;
                if extra > row.possible_duplicates {
                    out.problem(format!(
                        "push {} {id}: {} copies, {} possible duplicates marked",
                        push.key,
                        got.len(),
                        row.possible_duplicates
                    ));
                }
            }
        }
        for (key, id) in accepted.keys() {
            if !by_key.contains_key(key) {
                out.problem(format!(
                    "{id}: a message with collapse key {key} nobody pushed"
                ));
            }
        }
        out.figures.push(format!(
            "copies beyond the first: {copies}; possible duplicates marked: {marked} (on {rows_marked} rows); every copy is on a marked row"
        ));
    }

    /// No send to a device after C2DM called it gone, but a send again of a batch whose worker
    /// died (its row marked); and each device in its state.
    fn nothing_sent_after_gone(&self, out: &mut Checked) {
        let devices = self.devices;
        let states = self.states;
        let arrivals = self.arrivals;
        let by_key = &self.by_key;
        let found_gone = &self.found_gone;
        let mut after_gone = 0u64;
        for (at, a) in arrivals.iter().enumerate() {
            let (Some(id), Some(key)) = (&a.registration_id, &a.collapse_key) else {
                continue;
            };
            let Some((_, first_key)) = found_gone
                .get(id.as_str())
                .filter(|(gone_at, _)| *gone_at < at)
            else {
                continue;
            };
            let resent = *first_key == key.as_str()
                && by_key
                    .get(key.as_str())
                    .and_then(|p| p.rows.get(id))
                    .is_some_and(|r| r.possible_duplicates > 0);
            if !resent {
                after_gone += 1;
                out.problem(format!(
                    "{id}: sent for push {key} after it went gone in push {first_key}"
                ));
            }
        }
        let wrong_state = devices
            .iter()
            .filter(|d| {
                let state = states.get(*d).map_or("", String::as_str);
                (state == "gone") != is_gone(d)
            })
            .count();
        if wrong_state > 0 {
            out.problem(format!(
                "{wrong_state} devices in the wrong state (gone or not)"
            ));
        }
        out.figures.push(format!(
            "devices gone: {} (each sent to once, in the first push); sends after gone: {after_gone}",
            found_gone.len()
        ));
    }

    /// None of a cancelled push after the cancel took effect, but those in flight.
    fn nothing_sent_after_a_cancel(&self, out: &mut Checked) {
        let pushes = self.pushes;
        let arrivals = self.arrivals;
        for push in pushes {
            let Some((asked, cancelled)) = push.cancelled_at_us else {
                continue;
            };
            let late: Vec<u64> = arrivals
                .iter()
                .filter(|a| a.collapse_key.as_deref() == Some(push.key.as_str()))
                .filter(|a| a.at_us > cancelled)
                .map(|a| a.at_us - cancelled)
                .collect();
            // Sends of the push in the second before the cancel was asked for, and while it was
            // being answered: whether it met sends under way.
            let of_push = || {
                arrivals
                    .iter()
                    .filter(|a| a.collapse_key.as_deref() == Some(push.key.as_str()))
            };
            let flowing = of_push()
                .filter(|a| a.at_us <= asked && a.at_us + 1_000_000 > asked)
                .count();
            let quiet_ms = of_push()
                .filter(|a| a.at_us <= asked)
                .map(|a| asked - a.at_us)
                .min()
                .map_or(0.0, |us| us as f64 / 1e3);
            let answering = of_push()
                .filter(|a| a.at_us > asked && a.at_us <= cancelled)
                .count();
            let grace = u64::try_from(CANCEL_GRACE.as_micros()).unwrap_or(u64::MAX);
            let too_late = late.iter().filter(|us| **us > grace).count();
            if too_late > 0 {
                out.problem(format!(
                    "push {}: {too_late} sends more than {CANCEL_GRACE:?} after its cancel",
                    push.key
                ));
            }
            let cancelled_rows = push
                .rows
                .values()
                .filter(|r| r.error.as_deref() == Some("cancelled"))
                .count();
            out.figures.push(format!(
                "push {} cancelled: {flowing} sends in the second before the cancel was asked for (the last {quiet_ms:.0} ms before), {answering} in the {:.0} ms it took to answer; {} arrived after it was answered (in flight), the last {:.0} ms after; {cancelled_rows} devices not attempted",
                push.key,
                cancelled.saturating_sub(asked) as f64 / 1e3,
                late.len(),
                late.iter().max().copied().unwrap_or(0) as f64 / 1e3
            ));
        }
    }

    /// No send while a 503 had paused the sender, but those in flight when it came.
    fn nothing_sent_during_a_pause(&self, out: &mut Checked) {
        let arrivals = self.arrivals;
        let times: Vec<u64> = arrivals.iter().map(|a| a.at_us).collect();
        let grace = u64::try_from(PAUSE_GRACE.as_micros()).unwrap_or(u64::MAX);
        let (mut pauses, mut in_flight, mut latest) = (0u64, 0usize, 0u64);
        let mut paused_for = 0u64;
        for a in arrivals {
            let ArrivalAnswer::Unavailable { until_us } = a.answer else {
                continue;
            };
            pauses += 1;
            paused_for += until_us.saturating_sub(a.at_us);
            let start = times.partition_point(|t| *t <= a.at_us);
            let grace_end = times.partition_point(|t| *t < a.at_us + grace);
            let end = times.partition_point(|t| *t < until_us);
            in_flight += grace_end.saturating_sub(start);
            if let Some(last) = times[start..grace_end.max(start)].last() {
                latest = latest.max(last - a.at_us);
            }
            if end > grace_end {
                out.problem(format!(
                    "{} sends during the pause of a 503 at {} µs (until {until_us} µs)",
                    end - grace_end,
                    a.at_us
                ));
            }
        }
        out.figures.push(format!(
            "pauses (503): {pauses}, {:.0} s in all; sends that arrived within {PAUSE_GRACE:?} of one (in flight): {in_flight}, the last {:.0} ms after it",
            paused_for as f64 / 1e6,
            latest as f64 / 1e3
        ));
    }

    /// The budget, all workers together: what was accepted by the end of each period is within the
    /// periods' budgets so far (a batch reserves before it sends, so a send may arrive in the
    /// period after the one it counted in, never before).
    fn within_the_budget(&self, budget: Budget, out: &mut Checked) {
        let arrivals = self.arrivals;
        let period_us = u64::try_from(budget.period.as_micros()).unwrap_or(u64::MAX);
        let mut per_period: std::collections::BTreeMap<u64, u64> = Default::default();
        for a in arrivals {
            if matches!(a.answer, ArrivalAnswer::Accepted { .. }) {
                *per_period.entry(a.at_us / period_us).or_default() += 1;
            }
        }
        let first = per_period.keys().next().copied().unwrap_or(0);
        let mut so_far = 0u64;
        let mut full = 0;
        for (period, n) in &per_period {
            so_far += n;
            let allowed = budget.limit * (period - first + 1);
            if so_far > allowed {
                out.problem(format!(
                    "budget: {so_far} accepted by the end of period {period}, {allowed} allowed"
                ));
            }
            full += usize::from(*n * 100 >= budget.limit * 95);
        }
        let total: u64 = per_period.values().sum();
        if total <= budget.limit {
            out.problem(format!(
                "the budget ({}) was not below the total accepted ({total}): lower it",
                budget.limit
            ));
        }
        out.figures.push(format!(
            "budget {} per {:?}: accepted per period {:?}; {full} periods used it up",
            budget.limit,
            budget.period,
            per_period.values().collect::<Vec<_>>()
        ));
    }
}

/// Checks the pushes' rows and the devices' states against the emulator's arrivals: one
/// function per guarantee.
fn check(
    devices: &[String],
    states: &HashMap<String, String>,
    pushes: &[PushRun],
    arrivals: &[Arrival],
    budget: Option<Budget>,
) -> Checked {
    let record = Record::new(devices, states, pushes, arrivals);
    let mut out = Checked::default();
    record.one_row_per_device(&mut out);
    record.each_acceptance_seen_once_or_counted(&mut out);
    record.nothing_sent_after_gone(&mut out);
    record.nothing_sent_after_a_cancel(&mut out);
    record.nothing_sent_during_a_pause(&mut out);
    if let Some(budget) = budget {
        record.within_the_budget(budget, &mut out);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(at_us: u64, id: &str, key: &str, answer: ArrivalAnswer) -> Arrival {
        Arrival {
            at_us,
            registration_id: Some(id.into()),
            collapse_key: Some(key.into()),
            answer,
        }
    }

    fn accepted(m: &str) -> ArrivalAnswer {
        ArrivalAnswer::Accepted {
            message_id: m.into(),
        }
    }

    fn row(outcome: &str, m: Option<&str>, duplicates: u64) -> Row {
        Row {
            outcome: outcome.into(),
            error: None,
            message_id: m.map(str::to_owned),
            possible_duplicates: duplicates,
        }
    }

    fn one_push(rows: Vec<(&str, Row)>) -> Vec<PushRun> {
        vec![PushRun {
            key: "k".into(),
            id: "1".into(),
            posted: Instant::now(),
            took: None,
            killed: None,
            cancelled_at_us: None,
            rows: rows.into_iter().map(|(d, r)| (d.to_owned(), r)).collect(),
        }]
    }

    fn states(devices: &[String]) -> HashMap<String, String> {
        devices
            .iter()
            .map(|d| {
                let state = if is_gone(d) { "gone" } else { "active" };
                (d.clone(), state.to_owned())
            })
            .collect()
    }

    #[test]
    fn a_clean_run_has_no_problems_and_each_fault_is_found() {
        let devices = vec!["device-1".to_owned(), "gone-2".to_owned()];
        let rejected = ArrivalAnswer::Rejected {
            code: "NotRegistered".into(),
        };
        let clean = [
            arrival(1_000, "device-1", "k", accepted("m1")),
            arrival(2_000, "gone-2", "k", rejected.clone()),
        ];
        let pushes = one_push(vec![
            ("device-1", row("accepted", Some("m1"), 0)),
            ("gone-2", row("rejected", None, 0)),
        ]);
        let ok = check(&devices, &states(&devices), &pushes, &clean, None);
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);

        // A second copy its row does not count; a send after gone; a send in a pause.
        let mut faulty = clean.to_vec();
        faulty.push(arrival(3_000, "device-1", "k", accepted("m2")));
        faulty.push(arrival(4_000, "gone-2", "k", rejected));
        faulty.push(arrival(
            10_000_000,
            "device-9",
            "k",
            ArrivalAnswer::Unavailable {
                until_us: 14_000_000,
            },
        ));
        faulty.push(arrival(
            12_000_000,
            "device-9",
            "k",
            ArrivalAnswer::ServerError,
        ));
        let found = check(&devices, &states(&devices), &pushes, &faulty, None);
        let text = found.problems.join("\n");
        assert!(text.contains("2 copies, 0 possible duplicates"), "{text}");
        assert!(text.contains("after it went gone"), "{text}");
        assert!(text.contains("1 sends during the pause"), "{text}");
    }

    #[test]
    fn rows_that_disagree_with_the_emulator_are_problems() {
        let devices = vec!["device-1".to_owned(), "device-2".to_owned()];
        let arrivals = [arrival(1_000, "device-2", "k", accepted("m2"))];
        let pushes = one_push(vec![
            ("device-1", row("accepted", Some("m1"), 0)),
            ("device-2", row("failed", None, 0)),
        ]);
        let found = check(&devices, &states(&devices), &pushes, &arrivals, None);
        let text = found.problems.join("\n");
        assert!(text.contains("device-1: the row says accepted"), "{text}");
        assert!(
            text.contains("device-2: the emulator accepted it"),
            "{text}"
        );

        let missing = one_push(vec![("device-1", row("accepted", Some("m1"), 0))]);
        let found = check(&devices, &states(&devices), &missing, &arrivals, None);
        assert!(
            found
                .problems
                .join("\n")
                .contains("1 devices without a row")
        );
    }

    #[test]
    fn the_budget_is_checked_over_the_periods_so_far() {
        let devices: Vec<String> = (0..3).map(|i| format!("device-{i}")).collect();
        let budget = Budget {
            limit: 1,
            period: Duration::from_secs(1),
        };
        // Two accepted in the first period: over.
        let arrivals = [
            arrival(100, "device-0", "k", accepted("m0")),
            arrival(200, "device-1", "k", accepted("m1")),
            arrival(1_500_000, "device-2", "k", accepted("m2")),
        ];
        let pushes = one_push(
            devices
                .iter()
                .enumerate()
                .map(|(i, d)| (d.as_str(), row("accepted", Some(["m0", "m1", "m2"][i]), 0)))
                .collect(),
        );
        let found = check(
            &devices,
            &states(&devices),
            &pushes,
            &arrivals,
            Some(budget),
        );
        assert!(
            found
                .problems
                .join("\n")
                .contains("2 accepted by the end of period 0"),
            "{:?}",
            found.problems
        );
        // One in each period: within it.
        let spread = [
            arrival(100, "device-0", "k", accepted("m0")),
            arrival(1_200_000, "device-1", "k", accepted("m1")),
            arrival(2_500_000, "device-2", "k", accepted("m2")),
        ];
        let ok = check(&devices, &states(&devices), &pushes, &spread, Some(budget));
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
    }
}
