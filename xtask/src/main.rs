//! `cargo xtask`: the project's own tasks, in one small tool with few dependencies.
//!
//! - `cargo xtask ci`: everything CI checks, in order, stopping at the first failure.
//! - `cargo xtask tidy`: the repository's own rules (also run as a test).
//! - `cargo xtask contract`: the server's OpenAPI document validated, and schemathesis against
//!   a running server with each key (also the last step of `ci`).
//! - `cargo xtask bench [--write]`: end-to-end throughput and memory against the emulator;
//!   `--server`: the application server's pushes on SQLite and PostgreSQL, in rounds beside
//!   `c2dm broadcast`, and registrations;
//!   `--server --scaling`: 1, 2 and 3 worker processes on one PostgreSQL database.
//! - `cargo xtask soak [--messages N]`: a long broadcast under every fault, checked afterwards.
//! - `cargo xtask soak --server [--sqlite [--minutes M]] [--runs N] [--devices N]`: the
//!   application server under every fault, with processes killed, checked afterwards.
//! - `cargo xtask release <major|minor|patch|X.Y.Z> [--dry-run]`: bump, changelog, package, tag.

mod arrivals;
mod bench;
mod bench_scaling;
mod bench_server;
mod contract;
mod release;
mod soak;
mod soak_server;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// What each task does, after the usage line of `cargo xtask --help`.
const HELP: &str = concat!(
    "  ci       everything CI checks, in order, stopping at the first failure\n",
    "  tidy     the repository's own rules (also run as a test)\n",
    "  contract the server's OpenAPI document validated, and schemathesis against it (in ci)\n",
    "  bench    end-to-end throughput and memory against the emulator, beside wrk (not in CI);\n",
    "           --server: the application server's pushes (SQLite, PostgreSQL) in rounds beside\n",
    "           c2dm broadcast (--rounds N, default 3), and registrations;\n",
    "           --server --scaling [--workers N] [--concurrency N]: 1, 2 and 3 worker processes on PostgreSQL, sends waiting 20 ms\n",
    "  soak     a long broadcast under every fault, checked afterwards (not in CI);\n",
    "           --server: the application server's processes on PostgreSQL, killed and\n",
    "           restarted (--sqlite: one process for 30 minutes)\n",
    "  release  bump every crate's version, move the changelog's Unreleased entries, package, tag",
);

const USAGE: &str = "usage: cargo xtask <ci | tidy | contract | bench [--server [--scaling [--workers N] [--concurrency N]]] [--write] [--quick] [--rounds N] | soak [--messages N] | soak --server [--sqlite [--minutes M]] [--runs N] [--devices N] | release <major|minor|patch|X.Y.Z> [--dry-run]>";

/// The workspace root (the folder above this crate).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The cargo that runs this task (or the one on the PATH).
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The resident memory of a running process, in KiB (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Waits, up to `limit`, until a process started with `--port-file file` has written the port
/// it listens on; `what` names it in the error.
fn wait_for_port(file: &Path, limit: std::time::Duration, what: &str) -> Result<u16, String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(port) = std::fs::read_to_string(file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            return Ok(port);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{what} did not start"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs a command in the workspace root, echoing it; an error names the failed step.
fn run(step: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    eprintln!("== {step}: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .map_err(|e| format!("{step}: could not run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

/// Builds the CLI and the emulator (and whatever `extra` adds) with the `dist` profile (every
/// crate at opt-level 3, as `cargo install` builds them: what the benches and soaks measure is
/// what a deployment runs, not the demo's quicker build); returns where the binaries are.
fn build_dist(root: &Path, extra: &[&str]) -> Result<PathBuf, String> {
    let mut args = vec![
        "build",
        "--profile",
        "dist",
        "-p",
        "c2dm-cli",
        "-p",
        "c2dm-emulator",
    ];
    args.extend_from_slice(extra);
    run("build", &cargo(), &args, &[])?;
    Ok(target_dir(root).join("dist"))
}

/// Where cargo builds: `CARGO_TARGET_DIR` if set (relative to the root, where xtask runs
/// cargo), else the workspace's `target`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| root.join("target"), |dir| root.join(dir))
}

fn ci() -> Result<(), String> {
    let cargo = crate::cargo();
    run("format", &cargo, &["fmt", "--all", "--check"], &[])?;
    run(
        "lints",
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    run("tests", &cargo, &["test", "--workspace"], &[])?;
    run(
        "docs",
        &cargo,
        &["doc", "--workspace", "--no-deps", "--exclude", "xtask"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    run(
        "packaging",
        &cargo,
        &[
            "publish",
            "--workspace",
            "--exclude",
            "xtask",
            "--dry-run",
            "--allow-dirty",
        ],
        &[],
    )?;
    contract::run(&root())?;
    eprintln!("== ci: all checks passed");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        [] | ["help" | "--help" | "-h"] => {
            println!("{USAGE}\n\n{HELP}");
            Ok(())
        }
        ["ci"] => ci(),
        ["contract"] => contract::run(&root()),
        ["tidy"] => {
            let mut problems = tidy::check(&root());
            problems.extend(tidy::check_build(&root()));
            if problems.is_empty() {
                eprintln!("tidy: all rules hold");
                Ok(())
            } else {
                Err(problems.join("\n"))
            }
        }
        ["bench", rest @ ..] if rest.contains(&"--server") && rest.contains(&"--scaling") => {
            bench_scaling::run(&root(), rest)
        }
        ["bench", rest @ ..] if rest.contains(&"--server") => bench_server::run(&root(), rest),
        ["bench", rest @ ..] => bench::run(&root(), rest),
        ["release", rest @ ..] => release::run(&root(), rest),
        ["soak", "--server", rest @ ..] => soak_server::run(&root(), rest),
        ["soak", rest @ ..] => soak::run(&root(), rest),
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
