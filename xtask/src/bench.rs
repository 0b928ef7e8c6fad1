//! `cargo xtask bench`: end-to-end throughput and memory against the emulator, measured in one
//! run beside `wrk` (when installed), printed as one markdown table. `--write` puts it into
//! docs/PERFORMANCE.md. Not part of CI: these are numbers, not pass/fail checks.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What one child process cost: CPU (user + system) and peak RSS, and what it printed.
struct Usage {
    cpu: Duration,
    max_rss_kib: u64,
    stdout: String,
}

/// Runs a command to completion and measures it with `wait4`.
fn measure(mut cmd: Command) -> Result<Usage, String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut stdout = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            stdout.push_str(&line);
            stdout.push('\n');
        }
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: `rusage` is plain data that wait4 fills in; `pid` is our own unreaped child.
    #[allow(unsafe_code)]
    let rusage = unsafe {
        let mut rusage: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid, &mut status, 0, &mut rusage) < 0 {
            return Err(format!("wait4: {}", std::io::Error::last_os_error()));
        }
        rusage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{cmd:?} failed (status {status}):\n{stdout}"));
    }
    Ok(Usage {
        cpu: tv(rusage.ru_utime) + tv(rusage.ru_stime),
        max_rss_kib: rusage.ru_maxrss as u64,
        stdout,
    })
}

/// One measured run of a path: messages (or requests) per second, and CPU µs per message.
#[derive(Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) rate: f64,
    pub(crate) cpu: f64,
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The ratio of `ours` to wrk's, round by round: the median, and the range when there are
/// several rounds. Empty without wrk.
pub(crate) fn ratios(ours: &[Sample], wrk: &[Sample], field: impl Fn(&Sample) -> f64) -> String {
    if wrk.is_empty() {
        return String::new();
    }
    let each: Vec<f64> = ours
        .iter()
        .zip(wrk)
        .map(|(a, b)| field(a) / field(b))
        .collect();
    let mid = median(each.iter().copied());
    if each.len() < 2 {
        return format!("{mid:.2}");
    }
    let low = each.iter().copied().fold(f64::INFINITY, f64::min);
    let high = each.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{mid:.2} ({low:.2}-{high:.2})")
}

/// The value at `pointer` (RFC 6901, as `/counts/accepted`) of the last line of `text` that
/// is a JSON object: a tool's summary, or an API's answer.
pub(crate) fn json_at(text: &str, pointer: &str) -> Option<serde_json::Value> {
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line.trim()).ok())
        .find(serde_json::Value::is_object)?
        .pointer(pointer)
        .cloned()
}

/// The number at `pointer` of the last JSON object in `text` ([`json_at`]).
pub(crate) fn json_number(text: &str, pointer: &str) -> Option<f64> {
    json_at(text, pointer)?.as_f64()
}

/// The string at `pointer` of the last JSON object in `text` ([`json_at`]).
pub(crate) fn json_string(text: &str, pointer: &str) -> Option<String> {
    Some(json_at(text, pointer)?.as_str()?.to_owned())
}

pub(crate) struct Emulator {
    child: Child,
    base: String,
    cert: Option<PathBuf>,
    /// Its FCM service account's key file.
    fcm_key: PathBuf,
}

impl Emulator {
    pub(crate) fn start(
        bin: &Path,
        dir: &Path,
        tls: bool,
        counts_only: bool,
    ) -> Result<Self, String> {
        Self::start_with(bin, dir, tls, counts_only, &[])
    }

    /// [`Emulator::start`], with `extra` arguments (`--latency-ms 20`, say).
    pub(crate) fn start_with(
        bin: &Path,
        dir: &Path,
        tls: bool,
        counts_only: bool,
        extra: &[&str],
    ) -> Result<Self, String> {
        let port_file = dir.join(format!("port-{tls}-{counts_only}"));
        let cert = dir.join("emulator.pem");
        let fcm_key = dir.join(format!("fcm-key-{tls}-{counts_only}.json"));
        let _ = std::fs::remove_file(&port_file);
        let mut cmd = Command::new(bin.join("c2dm-emulator"));
        cmd.args(["--static-token", "BENCH", "--port-file"])
            .arg(&port_file)
            .arg("--fcm-key-out")
            .arg(&fcm_key)
            .args(extra)
            .stdout(Stdio::null());
        if counts_only {
            cmd.arg("--counts-only");
        }
        if tls {
            cmd.arg("--tls").arg("--cert-out").arg(&cert);
        }
        let mut child = cmd.spawn().map_err(|e| format!("c2dm-emulator: {e}"))?;
        let port = crate::wait_for_port(&port_file, Duration::from_secs(10), "the emulator")
            .inspect_err(|_| {
                let _ = child.kill();
                let _ = child.wait();
            })?;
        let scheme = if tls { "https" } else { "http" };
        Ok(Self {
            child,
            base: format!("{scheme}://127.0.0.1:{port}"),
            cert: tls.then_some(cert),
            fcm_key,
        })
    }

    pub(crate) fn send_url(&self) -> String {
        format!("{}/c2dm/send", self.base)
    }

    pub(crate) fn login_url(&self) -> String {
        format!("{}/accounts/ClientLogin", self.base)
    }

    /// Its certificate's file (TLS only).
    pub(crate) fn cert(&self) -> Option<PathBuf> {
        self.cert.clone()
    }

    /// Stops it as Ctrl-C would, so that it writes its files out, and waits for that.
    pub(crate) fn interrupt(mut self) -> Result<(), String> {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .map_err(|e| format!("kill: {e}"))?;
        if !sent.success() {
            return Err(format!("kill -INT: {sent}"));
        }
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the emulator stopped with {status}"))
        }
    }

    fn rss_kib(&self) -> u64 {
        crate::rss_kib(self.child.id()).unwrap_or(0)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_ids(path: &Path, n: u64) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut out = std::io::BufWriter::new(file);
    for i in 0..n {
        writeln!(out, "device-{i:08}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

/// Which protocol `c2dm broadcast` sends through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// C2DM, with the emulator's static token.
    C2dm,
    /// FCM HTTP v1, with the emulator's service account.
    Fcm,
}

/// `c2dm broadcast` of `n` ids: (messages/s as the command reports it, CPU µs per message,
/// peak RSS KiB).
pub(crate) fn broadcast(
    protocol: Protocol,
    bin: &Path,
    dir: &Path,
    emulator: &Emulator,
    n: u64,
    concurrency: u32,
) -> Result<(f64, f64, u64), String> {
    let ids = dir.join(format!("ids-{n}"));
    if !ids.exists() {
        write_ids(&ids, n)?;
    }
    let mut cmd = Command::new(bin.join("c2dm"));
    cmd.args([
        "broadcast",
        "--json",
        "--collapse-key",
        "k",
        "-d",
        "message=test",
        "-d",
        "sound=t",
    ])
    .arg("--ids")
    .arg(&ids)
    .args(["--concurrency", &concurrency.to_string()]);
    match protocol {
        Protocol::C2dm => cmd.args(["--token", "BENCH", "--send-url", &emulator.send_url()]),
        // No rate but the machine's: FCM's default quota would cap the run.
        Protocol::Fcm => cmd.arg("--fcm").arg(&emulator.fcm_key).args([
            "--fcm-url",
            &emulator.base,
            "--rate",
            "1000000000",
        ]),
    };
    if let Some(cert) = &emulator.cert {
        cmd.arg("--ca-cert").arg(cert);
    }
    let usage = measure(cmd)?;
    let rate = json_number(&usage.stdout, "/rate").ok_or("no rate in the summary")?;
    let accepted = json_number(&usage.stdout, "/accepted").unwrap_or(0.0);
    if accepted as u64 != n {
        return Err(format!("only {accepted} of {n} accepted: {}", usage.stdout));
    }
    Ok((
        rate,
        usage.cpu.as_secs_f64() * 1e6 / n as f64,
        usage.max_rss_kib,
    ))
}

/// HyperTransport alone (the `load` example): (requests/s, CPU µs per request).
fn transport_load(
    bin: &Path,
    emulator: &Emulator,
    n: u64,
    concurrency: u32,
    bare: bool,
) -> Result<Sample, String> {
    let mut cmd = Command::new(bin.join("examples/load"));
    cmd.args([
        "--url",
        &emulator.send_url(),
        "--requests",
        &n.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ]);
    if let Some(cert) = &emulator.cert {
        cmd.arg("--ca-cert").arg(cert);
    }
    if bare {
        cmd.arg("--bare");
    }
    let usage = measure(cmd)?;
    if json_number(&usage.stdout, "/failures") != Some(0.0) {
        return Err(format!("load had failures: {}", usage.stdout));
    }
    Ok(Sample {
        rate: json_number(&usage.stdout, "/rate").ok_or("no rate")?,
        cpu: json_number(&usage.stdout, "/cpu_us_per_request").ok_or("no cpu")?,
    })
}

const WRK_SCRIPT: &str = r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded;charset=UTF-8"
wrk.headers["Authorization"] = "GoogleLogin auth=BENCH"
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/c2dm/send", nil, "registration_id=device-" .. counter .. "&collapse_key=k&data.message=test&data.sound=t")
end
"#;

/// `wrk -t1` against the same emulator: (requests/s, CPU µs per request).
fn wrk(dir: &Path, emulator: &Emulator, connections: u32, seconds: u32) -> Result<Sample, String> {
    let script = dir.join("send.lua");
    std::fs::write(&script, WRK_SCRIPT).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "-s",
    ])
    .arg(&script)
    .arg(format!("{}/", emulator.base));
    let usage = measure(cmd)?;
    let rate = wrk_rate(&usage.stdout)?;
    let total: f64 = usage
        .stdout
        .lines()
        .find_map(|l| l.trim().split(" requests in").next()?.trim().parse().ok())
        .unwrap_or(rate * f64::from(seconds));
    Ok(Sample {
        rate,
        cpu: usage.cpu.as_secs_f64() * 1e6 / total,
    })
}

/// The `Requests/sec:` figure of wrk's report.
pub(crate) fn wrk_rate(report: &str) -> Result<f64, String> {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no rate from wrk:\n{report}"))
}

/// The original article's sender: one HTTP POST per message, sequentially, a new connection
/// each time (Python's urllib, as `requests.post` without a session does).
fn python_baseline(emulator: &Emulator, n: u32) -> Result<f64, String> {
    let script = format!(
        r#"
import time, urllib.request
url = "{url}"
start = time.time()
for i in range({n}):
    body = ("registration_id=device-%d&collapse_key=k&data.message=test&data.sound=t" % i).encode()
    req = urllib.request.Request(url, data=body, headers={{"Authorization": "GoogleLogin auth=BENCH", "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8"}})
    urllib.request.urlopen(req).read()
print({n} / (time.time() - start))
"#,
        url = emulator.send_url()
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    let usage = measure(cmd)?;
    usage
        .stdout
        .trim()
        .parse()
        .map_err(|_| format!("python: {}", usage.stdout))
}

pub(crate) fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {rustc}, {}",
        crate::release::today()
    )
}

pub fn run(root: &Path, args: &crate::BenchArgs) -> Result<(), String> {
    let quick = args.quick;
    let settings = Settings {
        quick,
        rounds: args.rounds(),
        scale: if quick { 10 } else { 1 },
        has_wrk: have("wrk"),
    };
    let bin = crate::build_dist(root, &["--bins", "-p", "c2dm-hyper", "--example", "load"])?;
    let dir = std::env::temp_dir().join(format!("c2dm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    if !settings.has_wrk {
        eprintln!("note: wrk is not installed (apt-get install -y wrk): its columns stay empty");
    }
    let throughput = throughput(&bin, &dir, &settings)?;
    let memory = memory(&bin, &dir, &settings)?;
    let report = render(&settings, &throughput, &memory);
    println!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
    if args.write {
        write_into_doc(root, &report)?;
    }
    Ok(())
}

/// How this run measures.
struct Settings {
    quick: bool,
    rounds: usize,
    /// The work is divided by this (10 with `--quick`).
    scale: u64,
    has_wrk: bool,
}

/// The throughput table's rows, the sequential baseline, and the best broadcast rate.
struct Throughput {
    rows: Vec<String>,
    baseline: Option<f64>,
    best_rate: f64,
}

/// Every path beside wrk, plain and TLS, at concurrency 1 and 64, round after round.
fn throughput(bin: &Path, dir: &Path, settings: &Settings) -> Result<Throughput, String> {
    let mut rows = vec![
        "| path | conc. | c2dm rate (msg/s) | CPU µs/msg | wrk rate (req/s) | wrk CPU µs/req | rate / wrk | CPU / wrk |".to_owned(),
        "|---|---:|---:|---:|---:|---:|---:|---:|".to_owned(),
    ];
    let mut baseline = None;
    let mut best_rate = 0.0f64;
    for tls in [false, true] {
        let emulator = Emulator::start(bin, dir, tls, true)?;
        let scheme = if tls { "HTTPS" } else { "HTTP" };
        for concurrency in [1u32, 64] {
            let n = if concurrency == 1 { 20_000 } else { 200_000 } / settings.scale;
            let wrk_seconds = if settings.quick { 2 } else { 5 };
            // The paths, and wrk, take turns round after round, so that a slow spell of this
            // shared machine weighs on all of them alike; each ratio is taken within a round.
            let mut wrk_runs = Vec::new();
            let mut paths: Vec<(String, Vec<Sample>)> = Vec::new();
            if !tls {
                // The floor HyperTransport was built on: a bare hyper-util pooled client.
                paths.push((format!("bare hyper-util client, {scheme}"), Vec::new()));
            }
            paths.push((format!("HyperTransport, {scheme}"), Vec::new()));
            paths.push((format!("c2dm broadcast, {scheme}"), Vec::new()));
            if tls {
                // The same broadcast through FCM HTTP v1 (HTTP/2, JSON, an access token).
                paths.push((
                    "c2dm broadcast --fcm, HTTPS (HTTP/2)".to_owned(),
                    Vec::new(),
                ));
            }
            for _ in 0..settings.rounds {
                if settings.has_wrk {
                    wrk_runs.push(wrk(dir, &emulator, concurrency, wrk_seconds)?);
                }
                for (name, samples) in &mut paths {
                    let sample = if name.starts_with("bare") {
                        transport_load(bin, &emulator, n, concurrency, true)?
                    } else if name.starts_with("HyperTransport") {
                        transport_load(bin, &emulator, n, concurrency, false)?
                    } else {
                        let protocol = if name.contains("--fcm") {
                            Protocol::Fcm
                        } else {
                            Protocol::C2dm
                        };
                        let (rate, cpu, _) =
                            broadcast(protocol, bin, dir, &emulator, n, concurrency)?;
                        Sample { rate, cpu }
                    };
                    samples.push(sample);
                }
            }
            let (wrk_rate, wrk_cpu) = if wrk_runs.is_empty() {
                (String::new(), String::new())
            } else {
                (
                    format!("{:.0}", median(wrk_runs.iter().map(|s| s.rate))),
                    format!("{:.1}", median(wrk_runs.iter().map(|s| s.cpu))),
                )
            };
            for (name, samples) in &paths {
                let rate = median(samples.iter().map(|s| s.rate));
                if name.starts_with("c2dm broadcast") {
                    best_rate = best_rate.max(rate);
                }
                let cpu = median(samples.iter().map(|s| s.cpu));
                rows.push(format!(
                    "| {name} | {concurrency} | {rate:.0} | {cpu:.1} | {wrk_rate} | {wrk_cpu} | {} | {} |",
                    ratios(samples, &wrk_runs, |s| s.rate),
                    ratios(samples, &wrk_runs, |s| s.cpu),
                ));
            }
        }
        if !tls && have("python3") {
            baseline = Some(python_baseline(&emulator, 2000 / settings.scale as u32)?);
        }
    }
    Ok(Throughput {
        rows,
        baseline,
        best_rate,
    })
}

/// Peak RSS of the sending process at two sizes, and the emulator's own figures.
struct Memory {
    rss_10k: u64,
    big: u64,
    rss_big: u64,
    inbox_bytes: f64,
    emulator_wrk: Option<f64>,
}

/// The sender's memory for 10,000 and a million ids, the emulator's inbox cost per message,
/// and the emulator's own rate under wrk.
fn memory(bin: &Path, dir: &Path, settings: &Settings) -> Result<Memory, String> {
    let emulator = Emulator::start(bin, dir, false, true)?;
    let (_, _, rss_10k) = broadcast(Protocol::C2dm, bin, dir, &emulator, 10_000, 64)?;
    let big = 1_000_000 / settings.scale;
    let (_, _, rss_big) = broadcast(Protocol::C2dm, bin, dir, &emulator, big, 64)?;
    drop(emulator);
    let full = Emulator::start(bin, dir, false, false)?;
    let before = full.rss_kib();
    let (_, _, _) = broadcast(Protocol::C2dm, bin, dir, &full, big, 64)?;
    let inbox_bytes = (full.rss_kib().saturating_sub(before) * 1024) as f64 / big as f64;
    drop(full);
    let emulator_wrk = if settings.has_wrk {
        let e = Emulator::start(bin, dir, false, false)?;
        Some(wrk(dir, &e, 64, if settings.quick { 2 } else { 5 })?.rate)
    } else {
        None
    };
    Ok(Memory {
        rss_10k,
        big,
        rss_big,
        inbox_bytes,
        emulator_wrk,
    })
}

/// The report: a header naming the machine, the throughput table, the memory table.
fn render(settings: &Settings, throughput: &Throughput, memory: &Memory) -> String {
    let Memory {
        rss_10k,
        big,
        rss_big,
        inbox_bytes,
        emulator_wrk,
    } = memory;
    let mut table = throughput.rows.join("\n");
    table.push_str("\n\n| memory and baselines | value |\n|---|---:|\n");
    table.push_str(&format!(
        "| peak RSS of `c2dm broadcast`, 10,000 ids | {:.1} MiB |\n",
        *rss_10k as f64 / 1024.0
    ));
    table.push_str(&format!(
        "| peak RSS of `c2dm broadcast`, {big} ids | {:.1} MiB ({:.2}× the 10,000 run) |\n",
        *rss_big as f64 / 1024.0,
        *rss_big as f64 / (*rss_10k).max(1) as f64
    ));
    table.push_str(&format!(
        "| emulator inbox, bytes per recorded message | {inbox_bytes:.0} |\n"
    ));
    if let Some(rate) = emulator_wrk {
        table.push_str(&format!(
            "| emulator under `wrk -t1 -c64`, inbox on | {rate:.0} sends/s |\n"
        ));
    }
    if let Some(base) = throughput.baseline {
        table.push_str(&format!(
            "| sequential one-POST-per-message sender (python urllib) | {base:.0} msg/s; best c2dm rate is {:.0}× that |\n",
            throughput.best_rate / base
        ));
    }
    let rounds = settings.rounds;
    let header = format!(
        "Measured by `cargo xtask bench{}` on {}, built with the `dist` profile: medians of \
         {rounds} round{}{}.\n\n",
        if settings.quick { " --quick" } else { "" },
        machine(),
        if rounds == 1 { "" } else { "s" },
        if rounds > 1 {
            ", each ratio taken within a round (median, and lowest-highest)"
        } else {
            ""
        },
    );
    format!("{header}{table}")
}

/// Puts the report between docs/PERFORMANCE.md's bench markers.
fn write_into_doc(root: &Path, report: &str) -> Result<(), String> {
    write_between(root, "bench", report)
}

/// Puts `report` between docs/PERFORMANCE.md's `<!-- {name}:start -->` and `<!-- {name}:end -->`.
pub(crate) fn write_between(root: &Path, name: &str, report: &str) -> Result<(), String> {
    let path = root.join("docs/PERFORMANCE.md");
    let doc = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let (Some(a), Some(b)) = (doc.find(&start), doc.find(&end)) else {
        return Err(format!("{}: no {start} … {end} markers", path.display()));
    };
    let updated = format!("{}{start}\n{report}\n{}", &doc[..a], &doc[b..]);
    std::fs::write(&path, updated).map_err(|e| e.to_string())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{json_number, json_string};

    #[test]
    fn medians_and_ratios() {
        use super::{Sample, median, ratios};
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
        let s = |rate, cpu| Sample { rate, cpu };
        let ours = [s(90.0, 12.0), s(110.0, 9.0), s(100.0, 10.0)];
        let wrk = [s(100.0, 6.0), s(100.0, 6.0), s(100.0, 5.0)];
        assert_eq!(ratios(&ours, &wrk, |x| x.rate), "1.00 (0.90-1.10)");
        assert_eq!(ratios(&ours, &wrk, |x| x.cpu), "2.00 (1.50-2.00)");
        assert_eq!(ratios(&ours[..1], &wrk[..1], |x| x.rate), "0.90");
        assert_eq!(ratios(&ours, &[], |x| x.rate), "");
    }

    #[test]
    fn reads_numbers_from_json() {
        // The last line that is a JSON object is read, past the lines after it.
        let text = "progress\n{\"accepted\":1}\n{\"accepted\":2}\ndone\n";
        assert_eq!(json_number(text, "/accepted"), Some(2.0));
        let text = r#"{"accepted":200000,"rate":61234.5,"x":{"id":"7"}}"#;
        assert_eq!(json_number(text, "/accepted"), Some(200000.0));
        assert_eq!(json_number(text, "/rate"), Some(61234.5));
        assert_eq!(json_string(text, "/x/id").as_deref(), Some("7"));
        assert_eq!(json_number(text, "/missing"), None);
        assert_eq!(json_string(text, "/rate"), None);
    }
}
