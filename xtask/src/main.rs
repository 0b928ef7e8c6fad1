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
//! - `cargo xtask soak [--messages N] [--fcm]`: a long broadcast under every fault, checked
//!   afterwards; through C2DM, or through FCM HTTP v1.
//! - `cargo xtask soak --server [--sqlite [--minutes M]] [--runs N] [--devices N]`: the
//!   application server under every fault, with processes killed, checked afterwards.
//! - `cargo xtask release <major|minor|patch|X.Y.Z> [--dry-run]`: bump, changelog, package, tag.

mod arrivals;
mod bench;
mod bench_scaling;
mod bench_server;
mod contract;
mod deb;
mod release;
mod soak;
mod soak_server;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// `cargo xtask`'s command line.
#[derive(clap::Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "The project's own tasks: CI, checks, benchmarks, soaks, releases"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks.
#[derive(clap::Subcommand)]
enum Task {
    /// Everything CI checks, in order, stopping at the first failure.
    Ci,
    /// The repository's own rules (also run as a test).
    Tidy,
    /// The server's OpenAPI document validated, and schemathesis against it (in CI).
    Contract,
    /// End-to-end throughput and memory against the emulator, beside wrk (not in CI).
    Bench(BenchArgs),
    /// A long broadcast under every fault, checked afterwards (not in CI).
    Soak(SoakArgs),
    /// Bump every crate's version, move the changelog's Unreleased entries, package, tag.
    Release(ReleaseArgs),
    /// The Debian package (target/debian); with --check, installed, served from and purged
    /// on this machine (root or sudo; in CI).
    Deb(DebArgs),
}

/// `cargo xtask deb`'s options.
#[derive(clap::Args)]
pub(crate) struct DebArgs {
    /// Install the package with dpkg, verify its unit, run its ExecStart as its user against
    /// the emulator until a push is done, then purge it and check nothing is left.
    #[arg(long)]
    pub(crate) check: bool,
    /// The profile the package's program is built with: `dist` (what a deployment runs), or
    /// `dev` for a check that reuses the tests' build (CI).
    #[arg(long, default_value = "dist", value_parser = ["dist", "release", "dev"])]
    pub(crate) profile: String,
}

/// `cargo xtask bench`'s options.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// The application server's pushes (SQLite, PostgreSQL) in rounds beside `c2dm broadcast`,
    /// and registrations.
    #[arg(long)]
    pub(crate) server: bool,
    /// With --server: 1, 2 and 3 worker processes on PostgreSQL, sends waiting 20 ms.
    #[arg(long, requires = "server")]
    pub(crate) scaling: bool,
    /// With --scaling: batch jobs sending at once in each worker process (default 2).
    #[arg(long, requires = "scaling", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) workers: Option<u32>,
    /// With --scaling: sends at once within a batch (default 16).
    #[arg(long, requires = "scaling", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) concurrency: Option<u32>,
    /// Write the tables into docs/PERFORMANCE.md.
    #[arg(long)]
    pub(crate) write: bool,
    /// With --server: only the latency of pushes to one device, POST to done.
    #[arg(long, requires = "server", conflicts_with = "scaling")]
    pub(crate) latency: bool,
    /// Fewer and smaller rounds.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Rounds (default 3, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rounds: Option<u32>,
}

impl BenchArgs {
    /// The rounds asked for: `--rounds`, else 3, or 1 with `--quick`.
    pub(crate) fn rounds(&self) -> usize {
        match self.rounds {
            Some(n) => n as usize,
            None if self.quick => 1,
            None => 3,
        }
    }
}

/// `cargo xtask soak`'s options.
#[derive(clap::Args)]
pub(crate) struct SoakArgs {
    /// Messages of the broadcast soak.
    #[arg(long, default_value_t = 100_000, conflicts_with = "server")]
    pub(crate) messages: u64,
    /// Through FCM HTTP v1 (HTTP/2, a service account's tokens) instead of C2DM.
    #[arg(long, conflicts_with = "server")]
    pub(crate) fcm: bool,
    /// The application server's processes on PostgreSQL, killed and restarted, instead.
    #[arg(long)]
    pub(crate) server: bool,
    /// With --server: one process on SQLite instead.
    #[arg(long, requires = "server")]
    pub(crate) sqlite: bool,
    /// With --sqlite: how long it runs, in minutes.
    #[arg(long, default_value_t = 30, requires = "sqlite")]
    pub(crate) minutes: u64,
    /// With --server: how many runs.
    #[arg(long, default_value_t = 1, requires = "server")]
    pub(crate) runs: u64,
    /// With --server: how many devices.
    #[arg(long, requires = "server")]
    pub(crate) devices: Option<u64>,
}

/// `cargo xtask release`'s options.
#[derive(clap::Args)]
pub(crate) struct ReleaseArgs {
    /// `major`, `minor`, `patch`, or an explicit X.Y.Z above the current version.
    pub(crate) bump: String,
    /// Check everything and package, writing nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

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
    let cli = <Cli as clap::Parser>::parse();
    let result = match &cli.task {
        Task::Ci => ci(),
        Task::Contract => contract::run(&root()),
        Task::Deb(args) => deb::run(&root(), args.check, &args.profile),
        Task::Tidy => {
            let mut problems = tidy::check(&root());
            problems.extend(tidy::check_build(&root()));
            if problems.is_empty() {
                eprintln!("tidy: all rules hold");
                Ok(())
            } else {
                Err(problems.join("\n"))
            }
        }
        Task::Bench(args) if args.scaling => bench_scaling::run(&root(), args),
        Task::Bench(args) if args.server => bench_server::run(&root(), args),
        Task::Bench(args) => bench::run(&root(), args),
        Task::Release(args) => release::run(&root(), &args.bump, args.dry_run),
        Task::Soak(args) if args.server => soak_server::run(&root(), args),
        Task::Soak(args) => soak::run(&root(), args.messages, args.fcm),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn every_task_has_help_and_its_flags_are_typed() {
        Cli::command().debug_assert();
        for task in ["ci", "tidy", "contract", "bench", "soak", "release", "deb"] {
            let help = Cli::try_parse_from(["cargo xtask", task, "--help"]).err();
            assert_eq!(
                help.map(|e| e.kind()),
                Some(clap::error::ErrorKind::DisplayHelp),
                "{task}"
            );
        }
        let parsed = Cli::try_parse_from(["x", "bench", "--server", "--scaling", "--workers", "3"]);
        let Ok(Cli {
            task: Task::Bench(bench),
        }) = parsed
        else {
            panic!("bench --server --scaling --workers 3");
        };
        assert!(bench.scaling && bench.workers == Some(3) && bench.rounds() == 3);
        for wrong in [
            &["x", "bench", "--scaling"][..],
            &["x", "bench", "--rounds", "0"],
            &["x", "bench", "--server", "--scaling", "--workers", "many"],
            &["x", "soak", "--server", "--messages", "5"],
            &["x", "soak", "--sqlite"],
            &["x", "soak", "--server", "--fcm"],
            &["x", "release"],
            &["x", "bogus"],
        ] {
            assert!(Cli::try_parse_from(wrong).is_err(), "{wrong:?}");
        }
        let Ok(Cli {
            task: Task::Release(release),
        }) = Cli::try_parse_from(["x", "release", "patch", "--dry-run"])
        else {
            panic!("release patch --dry-run");
        };
        assert_eq!((release.bump.as_str(), release.dry_run), ("patch", true));
    }
}
