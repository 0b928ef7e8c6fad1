//! What the CLI's integration tests share: running `c2dm` beside an in-process emulator.
#![allow(dead_code)] // each test file uses its own part

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

/// Environment variables `c2dm` reads, cleared so the caller's environment never leaks in.
const CLEARED: [&str; 11] = [
    "C2DM_SEND_URL",
    "C2DM_LOGIN_URL",
    "C2DM_AUTH_TOKEN",
    "C2DM_EMAIL",
    "C2DM_PASSWORD",
    "C2DM_SOURCE",
    "C2DM_LOG",
    "RUST_LOG",
    "C2DM_SERVER_ADMIN_TOKEN",
    "C2DM_SERVER_DEVICE_KEY",
    "C2DM_DATABASE_URL",
];

/// Runs `c2dm` with `args` and exactly `env`, on a blocking thread so the emulator (on the test's
/// runtime) keeps serving.
pub async fn c2dm<A, K, V>(
    args: impl IntoIterator<Item = A>,
    env: impl IntoIterator<Item = (K, V)>,
) -> Output
where
    A: AsRef<OsStr>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("c2dm"));
    cmd.args(args).stdin(Stdio::null());
    for var in CLEARED {
        cmd.env_remove(var);
    }
    cmd.envs(env);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// The first line a `c2dm serve` child prints on its standard output (where it listens), read
/// on a blocking thread: waited for by reading, not sleeping.
pub async fn first_line(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("a piped standard output");
    tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap()
}
