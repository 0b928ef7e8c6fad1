//! The `c2dm` command against an in-process emulator: each command, exit codes, the journal,
//! resume after a crash, the remove list, and bad input refused before anything is sent.
#![allow(clippy::field_reassign_with_default)] // tests set one config field at a time

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use c2dm_emulator::{Account, Config, DEFAULT_EMAIL, DEFAULT_PASSWORD, Emulator};
use common::c2dm;

/// An empty environment.
const NO_ENV: [(&str, &str); 0] = [];

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Env {
    emulator: Emulator,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new(config: Config) -> Self {
        Self {
            emulator: Emulator::start(config).await.unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn urls(&self) -> Vec<(&'static str, String)> {
        vec![
            ("C2DM_SEND_URL", self.emulator.send_url()),
            ("C2DM_LOGIN_URL", self.emulator.login_url()),
        ]
    }

    /// Runs with the emulator's URLs and the default account's credentials.
    async fn run(&self, args: &[&str]) -> Output {
        self.run_with(
            args,
            &[
                ("C2DM_EMAIL", DEFAULT_EMAIL),
                ("C2DM_PASSWORD", DEFAULT_PASSWORD),
            ],
        )
        .await
    }

    async fn run_with(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let urls = self.urls();
        let mut env: Vec<(&str, &str)> = urls.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra);
        c2dm(args, env).await
    }
}

fn journal(path: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_prints_only_the_token() {
    let env = Env::new(Config::default()).await;
    let out = env.run(&["login"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out);
    assert_eq!(token.lines().count(), 1);
    assert!(token.trim().starts_with("EMU"), "{token}");
    // The token works.
    let out = env
        .run_with(
            &[
                "send",
                "--to",
                "d1",
                "--collapse-key",
                "k",
                "--token",
                token.trim(),
            ],
            &[],
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_a_password_file_and_json() {
    let env = Env::new(Config::default()).await;
    let file = env.path("pw");
    std::fs::write(&file, format!("{DEFAULT_PASSWORD}\n")).unwrap();
    let out = env
        .run_with(
            &[
                "login",
                "--json",
                "--email",
                DEFAULT_EMAIL,
                "--password-file",
                &file,
            ],
            &[],
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(json["token"].as_str().unwrap().starts_with("EMU"));
    // Readable by others: it still works, with a warning; readable by its owner only: silence.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let args = ["login", "--email", DEFAULT_EMAIL, "--password-file", &file];
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = env.run_with(&args, &[]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("can be read by other users"),
            "{}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains(DEFAULT_PASSWORD));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = env.run_with(&args, &[]).await;
        assert!(!stderr(&out).contains("can be read"), "{}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_refused_exits_1_with_the_reason() {
    let env = Env::new(Config::default()).await;
    let out = env
        .run_with(
            &["login"],
            &[("C2DM_EMAIL", DEFAULT_EMAIL), ("C2DM_PASSWORD", "wrong")],
        )
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("BadAuthentication"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_captcha_for_scripts() {
    let mut config = Config::default();
    config.accounts = vec![Account::new("c@x", "pw").with_captcha("CT", "answer")];
    let env = Env::new(config).await;
    let creds = [("C2DM_EMAIL", "c@x"), ("C2DM_PASSWORD", "pw")];
    let out = env.run_with(&["login"], &creds).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("CaptchaRequired"), "{err}");
    assert!(err.contains("/accounts/Captcha?ctoken=CT"), "{err}");
    assert!(err.contains("--captcha-token CT"), "{err}");
    let out = env
        .run_with(
            &[
                "login",
                "--captcha-token",
                "CT",
                "--captcha-answer",
                "answer",
            ],
            &creds,
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_prints_the_message_id() {
    let env = Env::new(Config::default()).await;
    let out = env
        .run(&[
            "send",
            "--to",
            "device-1",
            "--collapse-key",
            "orders",
            "-d",
            "message=shipped",
            "-d",
            "n=a=b",
            "--delay-while-idle",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    let inbox = env.emulator.inbox("device-1");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].message_id, id);
    assert_eq!(inbox[0].collapse_key, "orders");
    assert_eq!(
        inbox[0].data,
        vec![
            ("message".into(), "shipped".into()),
            ("n".into(), "a=b".into())
        ]
    );
    assert!(inbox[0].delay_while_idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rejection_exits_1_and_says_whether_to_remove() {
    let mut config = Config::default();
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    config.devices.mismatch_prefixes = vec!["other-".into()];
    let env = Env::new(config).await;
    let out = env
        .run(&["send", "--to", "gone-1", "--collapse-key", "k"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out).trim(),
        "rejected: NotRegistered (remove this registration id)"
    );
    let out = env
        .run(&["send", "--to", "other-1", "--collapse-key", "k"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out).trim(),
        "rejected: MismatchSenderId (keep this registration id)"
    );
    let out = env
        .run(&["send", "--json", "--to", "gone-2", "--collapse-key", "k"])
        .await;
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["outcome"], "rejected");
    assert_eq!(json["error"], "NotRegistered");
    assert_eq!(json["remove"], true);
    assert_eq!(json["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_static_token_fails_with_exit_1() {
    let env = Env::new(Config::default()).await;
    let out = env
        .run_with(
            &["send", "--to", "d", "--collapse-key", "k"],
            &[("C2DM_AUTH_TOKEN", "bogus")],
        )
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_logs_in_again_when_credentials_are_there() {
    let env = Env::new(Config::default()).await;
    let out = env
        .run_with(
            &[
                "send",
                "--to",
                "d",
                "--collapse-key",
                "k",
                "--token",
                "stale",
            ],
            &[
                ("C2DM_EMAIL", DEFAULT_EMAIL),
                ("C2DM_PASSWORD", DEFAULT_PASSWORD),
            ],
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.emulator.counters().logins, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_2_before_anything_is_sent() {
    let env = Env::new(Config::default()).await;
    let ids = env.path("ids");
    std::fs::write(&ids, "ok-1\nhas space\n").unwrap();
    let long_ids = env.path("long-ids");
    std::fs::write(&long_ids, format!("ok-1\n{}\n", "x".repeat(4097))).unwrap();
    let format_ids = env.path("format-ids");
    std::fs::write(&format_ids, "ok-1\nAPA91b\u{200b}x\n").unwrap();
    let cert = env.path("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let big = format!("k={}", "x".repeat(1024));
    let cases: Vec<Vec<&str>> = vec![
        vec!["send", "--to", "d", "--collapse-key", "k", "--bogus"],
        vec!["send", "--to", "d", "--collapse-key", "k", "-d", "novalue"],
        vec!["send", "--to", "d"],
        vec!["send", "--to", "d", "--collapse-key", "k", "-d", &big],
        vec!["send", "--to", "d", "--collapse-key", "k", "-d", "from=x"],
        vec!["send", "--to", "", "--collapse-key", "k"],
        vec![
            "broadcast",
            "--ids",
            "/nonexistent/ids",
            "--collapse-key",
            "k",
        ],
        vec!["broadcast", "--ids", &ids, "--collapse-key", "k"],
        vec!["broadcast", "--ids", &long_ids, "--collapse-key", "k"],
        vec!["broadcast", "--ids", &format_ids, "--collapse-key", "k"],
        vec![
            "broadcast",
            "--ids",
            &ids,
            "--collapse-key",
            "k",
            "--concurrency",
            "0",
        ],
        vec![
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
            "--send-url",
            "not a url",
        ],
        vec![
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
            "--send-url",
            "ftp://x/y",
        ],
        vec![
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
            "--ca-cert",
            &cert,
        ],
        vec![
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
            "--ca-cert",
            "/nonexistent.pem",
        ],
        vec!["login", "--captcha-token", "x"],
    ];
    for args in cases {
        let out = env.run(&args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(!err.trim().is_empty(), "{args:?}");
        assert!(stdout(&out).is_empty(), "{args:?}");
    }
    // A password file without an email.
    let out = env
        .run_with(
            &[
                "send",
                "--to",
                "d",
                "--collapse-key",
                "k",
                "--password-file",
                &ids,
            ],
            &[],
        )
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--password-file needs --email"),
        "{}",
        stderr(&out)
    );
    // No credentials at all.
    let out = env
        .run_with(&["send", "--to", "d", "--collapse-key", "k"], &[])
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no credentials"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "one clear line");
    let stats = env.emulator.counters();
    assert_eq!(
        (stats.sends, stats.logins),
        (0, 0),
        "nothing reached the service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_with_journal_and_remove_list() {
    let mut config = Config::default();
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    config.devices.invalid_prefixes = vec!["bad-".into()];
    let env = Env::new(config).await;
    let ids = env.path("ids");
    std::fs::write(
        &ids,
        "# devices\ndev-1\n\ndev-2\ngone-1\n  bad-1  \n# the end\ndev-3\n",
    )
    .unwrap();
    let journal_path = env.path("journal.jsonl");
    let remove = env.path("remove.txt");
    let out = env
        .run(&[
            "broadcast",
            "--ids",
            &ids,
            "--collapse-key",
            "news",
            "-d",
            "message=hi",
            "--journal",
            &journal_path,
            "--remove-list",
            &remove,
            "--concurrency",
            "2",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = stdout(&out);
    assert!(
        summary.contains("5 messages: 3 accepted, 2 rejected, 0 failed, 0 not attempted"),
        "{summary}"
    );
    assert!(
        summary.contains("registration ids to remove: 2"),
        "{summary}"
    );
    let lines = journal(&journal_path);
    assert_eq!(lines.len(), 5);
    let by_id: HashMap<String, &serde_json::Value> = lines
        .iter()
        .map(|l| (l["registration_id"].as_str().unwrap().to_owned(), l))
        .collect();
    assert_eq!(by_id["dev-1"]["outcome"], "accepted");
    assert_eq!(
        by_id["dev-1"]["message_id"].as_str().unwrap(),
        env.emulator.inbox("dev-1")[0].message_id
    );
    assert_eq!(by_id["dev-1"]["remove"], false);
    assert_eq!(by_id["dev-1"]["attempts"], 1);
    assert_eq!(by_id["gone-1"]["outcome"], "rejected");
    assert_eq!(by_id["gone-1"]["error"], "NotRegistered");
    assert_eq!(by_id["gone-1"]["remove"], true);
    assert_eq!(by_id["bad-1"]["error"], "InvalidRegistration");
    let mut removed: Vec<String> = std::fs::read_to_string(&remove)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    removed.sort();
    assert_eq!(removed, ["bad-1", "gone-1"]);
    // Running again into the same journal without --resume is refused.
    let out = env
        .run(&[
            "broadcast",
            "--ids",
            &ids,
            "--collapse-key",
            "news",
            "--journal",
            &journal_path,
        ])
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--resume"));
}

/// Runs `c2dm` with the emulator's URLs and credentials, writing `input` to its standard input
/// (a pipe).
async fn run_with_stdin(env: &Env, args: &[&str], input: Vec<u8>) -> Output {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("c2dm"));
    cmd.args(args);
    for (k, v) in env.urls() {
        cmd.env(k, v);
    }
    cmd.env("C2DM_EMAIL", DEFAULT_EMAIL)
        .env("C2DM_PASSWORD", DEFAULT_PASSWORD)
        .env_remove("C2DM_AUTH_TOKEN");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&input).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn hundred_ids() -> Vec<u8> {
    (0..100)
        .map(|i| format!("dev-{i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_from_stdin_with_json_summary() {
    let env = Env::new(Config::default()).await;
    let args = ["broadcast", "--ids", "-", "--collapse-key", "k", "--json"];
    let out = run_with_stdin(&env, &args, b"a\nb\nc\n".to_vec()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["accepted"], 3);
    assert_eq!(json["total"], 3);
    assert_eq!(json["complete"], true);
    assert_eq!(env.emulator.counters().accepted, 3);
}

/// `--ids /dev/stdin` with a pipe behind it, as a new user tries it: before the fix the ids
/// were read twice (checked, then streamed), the second read found the pipe empty, and the
/// run printed "0 messages" and exited 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reads_a_pipe_once() {
    let env = Env::new(Config::default()).await;
    let args = [
        "broadcast",
        "--ids",
        "/dev/stdin",
        "--collapse-key",
        "k",
        "--json",
    ];
    let out = run_with_stdin(&env, &args, hundred_ids()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["accepted"], 100, "{json}");
    assert_eq!(env.emulator.counters().accepted, 100);
}

/// The same through a FIFO, as `--ids <(cat ids.txt)` gives.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reads_a_fifo_once() {
    let env = Env::new(Config::default()).await;
    let fifo = env.path("ids.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::write(fifo, hundred_ids()).unwrap())
    };
    let out = env
        .run(&["broadcast", "--ids", &fifo, "--collapse-key", "k", "--json"])
        .await;
    writer.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["accepted"], 100, "{json}");
}

/// Plain http:// to anything but loopback would carry the password and the token in clear:
/// refused with exit 2 before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_beyond_loopback_is_refused() {
    let env = Env::new(Config::default()).await;
    for (flag, url) in [
        ("--send-url", "http://android.apis.google.com/c2dm/send"),
        ("--login-url", "http://www.google.com/accounts/ClientLogin"),
    ] {
        let out = env
            .run(&[flag, url, "send", "--to", "d", "--collapse-key", "k"])
            .await;
        assert_eq!(out.status.code(), Some(2), "{flag}");
        assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
    }
    assert_eq!(env.emulator.counters().accepted, 0);
    assert_eq!(env.emulator.stats().logins, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_failures_exit_1() {
    let env = Env::new(Config::default()).await;
    let ids = env.path("ids");
    std::fs::write(&ids, "a\nb\n").unwrap();
    let journal_path = env.path("j");
    let out = env
        .run_with(
            &[
                "broadcast",
                "--ids",
                &ids,
                "--collapse-key",
                "k",
                "--journal",
                &journal_path,
            ],
            &[("C2DM_AUTH_TOKEN", "refused-token")],
        )
        .await;
    assert_eq!(out.status.code(), Some(1));
    let lines = journal(&journal_path);
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["outcome"] == "failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_crash_sends_every_id_exactly_once_in_the_journal() {
    let mut config = Config::default();
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    let env = Env::new(config).await;
    let ids_path = env.path("ids");
    let ids: Vec<String> = (0..200)
        .map(|i| {
            if i % 10 == 3 {
                format!("gone-{i}")
            } else {
                format!("dev-{i}")
            }
        })
        .collect();
    std::fs::write(&ids_path, ids.join("\n")).unwrap();
    let journal_path = env.path("journal.jsonl");
    let args = [
        "broadcast",
        "--ids",
        &ids_path,
        "--collapse-key",
        "k",
        "--journal",
        &journal_path,
        "--concurrency",
        "8",
    ];
    // Crash half way.
    let mut crashing = args.to_vec();
    crashing.extend(["--abort-after", "100"]);
    let out = env.run(&crashing).await;
    assert_eq!(out.status.code(), Some(101), "{}", stderr(&out));
    let before = journal(&journal_path);
    assert_eq!(before.len(), 100);
    // Resume.
    let mut resuming = args.to_vec();
    resuming.push("--resume");
    let out = env.run(&resuming).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("100 ids skipped"), "{}", stdout(&out));
    let after = journal(&journal_path);
    let mut seen: HashMap<String, u32> = HashMap::new();
    for line in &after {
        assert!(line["outcome"] == "accepted" || line["outcome"] == "rejected");
        *seen
            .entry(line["registration_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 200, "every id has a line");
    assert!(seen.values().all(|n| *n == 1), "and only one");
    // What was journaled before the crash was not sent again.
    for line in &before {
        let id = line["registration_id"].as_str().unwrap();
        let expected = u64::from(line["outcome"] == "accepted");
        assert_eq!(env.emulator.delivered_count(id), expected, "{id}");
    }
    // Every accepted id is in the emulator's inbox (those in flight at the crash may be twice).
    for id in ids.iter().filter(|id| id.starts_with("dev-")) {
        assert!(env.emulator.delivered_count(id) >= 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_command_serves_until_killed() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let cert_arg = cert.to_string_lossy().into_owned();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("c2dm"))
        .args([
            "emulator",
            "--tls",
            "--cert-out",
            &cert_arg,
            "--account",
            "me@x:pw",
            "--not-registered-prefix",
            "gone-",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (first, rest) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().unwrap().unwrap();
        let rest: Vec<String> = lines.by_ref().take(5).map(|l| l.unwrap()).collect();
        (first, rest)
    })
    .await
    .unwrap();
    let base = first.rsplit(' ').next().unwrap().to_owned();
    assert!(base.starts_with("https://127.0.0.1:"), "{first}");
    assert!(
        rest.iter().any(|l| l.contains("account: me@x:pw")),
        "{rest:?}"
    );
    assert!(Path::new(&cert).exists());
    let env = [
        ("C2DM_SEND_URL", format!("{base}/c2dm/send")),
        ("C2DM_LOGIN_URL", format!("{base}/accounts/ClientLogin")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut with_creds = env.clone();
    with_creds.extend([("C2DM_EMAIL", "me@x"), ("C2DM_PASSWORD", "pw")]);
    let out = c2dm(
        &[
            "send",
            "--ca-cert",
            &cert_arg,
            "--to",
            "d",
            "--collapse-key",
            "k",
        ],
        with_creds.clone(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c2dm(
        &[
            "send",
            "--ca-cert",
            &cert_arg,
            "--to",
            "gone-1",
            "--collapse-key",
            "k",
        ],
        with_creds.clone(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    // Without the certificate: a TLS error.
    let out = c2dm(["send", "--to", "d", "--collapse-key", "k"], with_creds).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_verifies_delivery() {
    let out = c2dm(
        &[
            "demo",
            "--devices",
            "400",
            "--retry-after-secs",
            "0",
            "--initial-backoff",
            "0.005",
            "--server-devices",
            "200",
        ],
        NO_ENV,
    )
    .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("verified: every accepted message"), "{text}");
    assert!(text.contains("400 messages:"), "{text}");
    assert!(
        text.contains("application server: http://127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains(
            "push 1: done, 196 accepted, 4 rejected (C2DM's NotRegistered 2, FCM's UNREGISTERED 2)"
        ),
        "{text}"
    );
    let out = c2dm(
        &[
            "demo",
            "--devices",
            "300",
            "--retry-after-secs",
            "0",
            "--initial-backoff",
            "0.005",
            "--server-devices",
            "100",
            "--json",
        ],
        NO_ENV,
    )
    .await;
    assert!(out.status.success());
    let json: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(json["verified"], true);
    assert_eq!(json["devices"], 300);
    assert!(json["emulator"]["unavailable"].as_u64().unwrap() >= 1);
    assert!(json["emulator"]["rotations"].as_u64().unwrap() >= 1);
    assert_eq!(
        json["emulator"]["logins"],
        json["emulator"]["expiries"].as_u64().unwrap() + 1
    );
}

/// A resumed run that sends again to a device whose earlier send may have reached it carries
/// that count on, and says how many resumed sends may be second copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_carries_possible_duplicates_forward() {
    let env = Env::new(Config::default()).await;
    let ids_path = env.path("ids");
    std::fs::write(&ids_path, "a\nb\nc\n").unwrap();
    let journal_path = env.path("journal.jsonl");
    std::fs::write(
        &journal_path,
        concat!(
            r#"{"registration_id":"a","outcome":"failed","message_id":null,"error":"timed out","remove":false,"attempts":2,"possible_duplicates":1}"#,
            "\n",
            r#"{"registration_id":"b","outcome":"accepted","message_id":"0:1","error":null,"remove":false,"attempts":1,"possible_duplicates":0}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = env
        .run(&[
            "broadcast",
            "--ids",
            &ids_path,
            "--collapse-key",
            "k",
            "--journal",
            &journal_path,
            "--resume",
            "--json",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(summary["resent_maybe_twice"], 1, "{summary}");
    assert_eq!(summary["accepted"], 2);
    let lines = journal(&journal_path);
    let a = lines
        .iter()
        .rev()
        .find(|l| l["registration_id"] == "a")
        .unwrap();
    assert_eq!(a["outcome"], "accepted");
    assert_eq!(a["possible_duplicates"], 1, "{a}");
    let c = lines.iter().find(|l| l["registration_id"] == "c").unwrap();
    assert_eq!(c["possible_duplicates"], 0);
}

/// The first Ctrl-C ends the sends waiting out a backoff at once, and every id gets a journal
/// line. Before the fix the command waited out the service's Retry-After (here 50 minutes).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_ends_the_waits_and_journals_every_id() {
    let mut config = Config::default();
    config.unavailable = c2dm_emulator::FaultRate::Every(1);
    config.retry_after = std::time::Duration::from_secs(3000);
    let env = Env::new(config).await;
    let ids_path = env.path("ids");
    std::fs::write(&ids_path, "a\nb\nc\nd\ne\nf\ng\nh\n").unwrap();
    let journal_path = env.path("journal.jsonl");
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("c2dm"));
    cmd.args([
        "-v",
        "broadcast",
        "--ids",
        &ids_path,
        "--collapse-key",
        "k",
        "--journal",
        &journal_path,
        "--concurrency",
        "4",
    ]);
    for (k, v) in env.urls() {
        cmd.env(k, v);
    }
    cmd.env("C2DM_EMAIL", DEFAULT_EMAIL)
        .env("C2DM_PASSWORD", DEFAULT_PASSWORD)
        .env_remove("C2DM_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().to_string();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        // Wait (reading, not sleeping) until a send is waiting out the 503's Retry-After.
        let mut log = String::new();
        loop {
            let mut line = String::new();
            assert!(err.read_line(&mut line).unwrap() > 0, "c2dm ended: {log}");
            log.push_str(&line);
            if line.contains("retrying") {
                break;
            }
        }
        let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(sent.success());
        // A watchdog, not a pause: the command must end long before it would kill it.
        let watchdog = std::thread::spawn({
            let pid = pid.clone();
            move || {
                std::thread::park_timeout(std::time::Duration::from_secs(120));
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        let out = child.wait_with_output().unwrap();
        watchdog.thread().unpark();
        (out, log + &rest)
    })
    .await
    .unwrap();
    let (out, log) = out;
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(stdout(&out).contains("interrupted"), "{}", stdout(&out));
    let lines = journal(&journal_path);
    assert_eq!(lines.len(), 8, "every id has a line");
    for line in &lines {
        let outcome = line["outcome"].as_str().unwrap();
        assert!(outcome == "failed" || outcome == "not_attempted", "{line}");
        if outcome == "failed" {
            assert!(
                line["error"].as_str().unwrap().contains("cancelled"),
                "{line}"
            );
        }
    }
}

/// A server that accepts and never answers: `--deadline` ends `send` with an error that counts
/// the attempts and says the message may have been delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_ends_at_its_deadline_against_a_server_that_never_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/c2dm/send", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        // Accept and hold every connection, answering nothing.
        let held: Vec<_> = listener.incoming().collect();
        drop(held);
    });
    let out = c2dm(
        [
            "--send-url",
            &url,
            "--token",
            "x",
            "--deadline",
            "1.5",
            "--timeout",
            "0.4",
            "--initial-backoff",
            "0.1",
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
        ],
        NO_ENV,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("deadline"), "{err}");
    assert!(err.contains("may have been delivered"), "{err}");
    assert!(err.contains("attempts"), "{err}");
}

/// One HTTP exchange with a `c2dm serve` process, over loopback.
async fn http(
    base: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use c2dm_core::Transport;
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("authorization", format!("Bearer {key}"));
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            bytes::Bytes::from(body.to_string())
        }
        None => bytes::Bytes::new(),
    };
    let transport = c2dm_hyper::HyperTransport::new().unwrap();
    let response = transport
        .execute(request.body(body).unwrap())
        .await
        .unwrap();
    (
        response.status().as_u16(),
        serde_json::from_slice(response.body()).unwrap_or(serde_json::Value::Null),
    )
}

/// Starts `c2dm serve` on `database` with `args`, against the emulator, with the keys
/// `admin-key` and `device-key`; with the API, waits (reading, not sleeping) for the line
/// that says where it listens and returns its base URL.
async fn spawn_serve(
    env: &Env,
    database: &str,
    args: &[&str],
) -> (std::process::Child, Option<String>) {
    spawn_serve_to(&env.emulator.send_url(), database, args).await
}

/// A fresh database on the shared throwaway PostgreSQL cluster (named after `prefix`), and an
/// API process on it without workers: the process, its base URL, the database URL.
async fn postgres_api(env: &Env, prefix: &str) -> (std::process::Child, String, String) {
    let cluster = c2dm_testkit::PostgresCluster::shared().unwrap_or_else(|e| panic!("{e}"));
    let database = cluster.create_database(prefix).await.unwrap();
    let (api, base) =
        spawn_serve(env, &database, &["--listen", "127.0.0.1:0", "--no-workers"]).await;
    (api, base.unwrap(), database)
}

/// [`spawn_serve`], sending to `send_url`.
async fn spawn_serve_to(
    send_url: &str,
    database: &str,
    args: &[&str],
) -> (std::process::Child, Option<String>) {
    let global = ["--token", "server-token", "--send-url", send_url];
    spawn_serve_with(&global, &[], database, args).await
}

/// [`spawn_serve`], with `global` options before `serve` and `envs` set.
async fn spawn_serve_with(
    global: &[&str],
    envs: &[(&str, &str)],
    database: &str,
    args: &[&str],
) -> (std::process::Child, Option<String>) {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("c2dm"));
    cmd.args(global)
        .args(["serve", "--database", database])
        .args(args)
        .envs(envs.iter().copied())
        .env("C2DM_SERVER_ADMIN_TOKEN", "admin-key-for-cli-tests")
        .env("C2DM_SERVER_DEVICE_KEY", "device-key-for-cli-tests")
        .env_remove("C2DM_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if args.contains(&"--no-api") {
        return (child, None);
    }
    let line = common::first_line(&mut child).await;
    let base = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    (child, Some(base))
}

/// POSTs one push to all the server's devices, then waits (`?wait=60`) for its status, which
/// must say done.
async fn push_to_all_and_wait(base: &str) -> serde_json::Value {
    let push = serde_json::json!({"to": "all", "collapse_key": "news", "data": {"m": "hi"}});
    let (status, push) = http(
        base,
        "POST",
        "/v1/pushes",
        "admin-key-for-cli-tests",
        Some(push),
    )
    .await;
    assert_eq!(status, 202, "{push}");
    let id = push["id"].as_str().unwrap();
    let path = format!("/v1/pushes/{id}?wait=60");
    let (status, done) = http(base, "GET", &path, "admin-key-for-cli-tests", None).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "done", "{done}");
    done
}

/// Sends SIGTERM and waits: the process must stop cleanly, saying so. Returns its stderr.
async fn terminate(child: std::process::Child) -> String {
    let signalled = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("stopped"), "{}", stderr(&out));
    stderr(&out)
}

/// Two worker processes and an API process on one PostgreSQL database (a throwaway cluster
/// the test starts): the push's batches are shared between the workers, every device gets
/// one row and one message, and each process stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_on_one_postgres_share_a_push() {
    let mut config = Config::default();
    config.static_tokens = vec!["server-token".into()];
    // Sends take a while, so that neither worker can take every batch before the other looks.
    config.latency = std::time::Duration::from_millis(10);
    let env = Env::new(config).await;
    let (api, base, database) = postgres_api(&env, "cli").await;
    let worker_args = [
        "--no-api",
        "--workers",
        "1",
        "--concurrency",
        "4",
        "--batch-size",
        "20",
    ];
    let (first, _) = spawn_serve(&env, &database, &worker_args).await;
    let (second, _) = spawn_serve(&env, &database, &worker_args).await;

    for i in 0..400 {
        let id = format!("phone-{i:03}");
        let body = serde_json::json!({ "registration_id": id });
        let (status, body) = http(
            &base,
            "POST",
            "/v1/devices",
            "device-key-for-cli-tests",
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    // The API process learns of the workers' rows by looking again: no signal crosses
    // processes.
    let done = push_to_all_and_wait(&base).await;
    assert_eq!(done["counts"]["accepted"], 400, "{done}");
    for i in 0..400 {
        assert_eq!(env.emulator.delivered_count(&format!("phone-{i:03}")), 1);
    }
    // Who ran the batches: the queue keeps the name (with the process id) of the worker
    // that took each.
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&database).await.unwrap();
    let takers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT split_part(lock_by, '-', 3) FROM apalis.jobs \
         WHERE job_type = 'c2dm-batches' AND status = 'Done'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let pids = [first.id().to_string(), second.id().to_string()];
    assert_eq!(takers.len(), 2, "both workers took batches: {takers:?}");
    assert!(
        takers.iter().all(|t| pids.contains(t)),
        "{takers:?} {pids:?}"
    );

    for child in [first, second, api] {
        terminate(child).await;
    }
}

/// The short soak: an API process and two worker processes on one PostgreSQL database, 5,000
/// devices (some gone), the emulator injecting 503s with Retry-After, 500s and dropped
/// connections, and one worker killed with SIGKILL in the middle of the push, then started
/// again. Every device gets exactly one row; every copy the emulator took beyond the first is
/// counted in its row as a possible duplicate.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_mid_push_on_postgres_loses_nothing() {
    use c2dm_emulator::FaultRate;
    let mut config = Config::default();
    config.static_tokens = vec!["server-token".into()];
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    config.latency = Duration::from_millis(2);
    config.unavailable = FaultRate::Every(1_500);
    config.server_errors = FaultRate::Every(700);
    config.drops = FaultRate::Every(450);
    let env = Env::new(config).await;
    let (api, base, database) = postgres_api(&env, "soak").await;
    let worker_args = [
        "--no-api",
        "--workers",
        "1",
        "--concurrency",
        "16",
        "--batch-size",
        "250",
        "--heartbeat",
        "1",
    ];
    let (first, _) = spawn_serve(&env, &database, &worker_args).await;
    let (mut doomed, _) = spawn_serve(&env, &database, &worker_args).await;

    let ids: Vec<String> = (0..5_000)
        .map(|i| {
            if i % 100 == 7 {
                format!("gone-{i:04}")
            } else {
                format!("phone-{i:04}")
            }
        })
        .collect();
    for id in &ids {
        let body = serde_json::json!({ "registration_id": id });
        let (status, body) = http(
            &base,
            "POST",
            "/v1/devices",
            "device-key-for-cli-tests",
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let push = serde_json::json!({"to": "all", "collapse_key": "soak", "data": {"m": "hi"}});
    let (status, push) = http(
        &base,
        "POST",
        "/v1/pushes",
        "admin-key-for-cli-tests",
        Some(push),
    )
    .await;
    assert_eq!(status, 202, "{push}");
    let id = push["id"].as_str().unwrap().to_owned();

    // Killed once a fifth of the devices have their row: in the middle of its batches.
    loop {
        let (_, status) = http(
            &base,
            "GET",
            &format!("/v1/pushes/{id}"),
            "admin-key-for-cli-tests",
            None,
        )
        .await;
        let done = status["tally"]["accepted"].as_u64().unwrap_or(0)
            + status["tally"]["rejected"].as_u64().unwrap_or(0);
        assert_ne!(
            status["state"], "done",
            "finished before the kill: {status}"
        );
        if done >= 1_000 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let killed = Command::new("kill")
        .args(["-KILL", &doomed.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    doomed.wait().unwrap();
    let (again, _) = spawn_serve(&env, &database, &worker_args).await;

    let path = format!("/v1/pushes/{id}?wait=60");
    let (status, done) = http(&base, "GET", &path, "admin-key-for-cli-tests", None).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["total"], 5_000, "{done}");
    assert_eq!(done["counts"]["pending"], 0, "{done}");
    assert_eq!(done["counts"]["rejected"]["NotRegistered"], 50, "{done}");
    assert_eq!(done["counts"]["accepted"], 4_950, "{done}");

    // One row per device, and the emulator's copies within what the rows say.
    let mut rows = HashMap::new();
    let mut after = String::new();
    loop {
        let page_path = format!("/v1/pushes/{id}/deliveries?limit=200{after}");
        let (status, page) = http(&base, "GET", &page_path, "admin-key-for-cli-tests", None).await;
        assert_eq!(status, 200, "{page}");
        for row in page["deliveries"].as_array().unwrap() {
            let device = row["registration_id"].as_str().unwrap().to_owned();
            let duplicates = row["possible_duplicates"].as_u64().unwrap();
            assert!(rows.insert(device, duplicates).is_none(), "two rows: {row}");
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    assert_eq!(rows.len(), ids.len());
    let (mut extra_copies, mut marked) = (0, 0);
    for id in ids.iter().filter(|id| id.starts_with("phone-")) {
        let copies = env.emulator.delivered_count(id);
        let duplicates = rows[id];
        assert!(copies >= 1, "{id} never reached the emulator");
        assert!(
            copies <= 1 + duplicates,
            "{id}: {copies} copies, {duplicates} marked possible duplicates"
        );
        extra_copies += copies - 1;
        marked += duplicates;
    }
    eprintln!("second copies: {extra_copies}; possible duplicates marked: {marked}");
    assert!(extra_copies <= marked);

    for child in [first, again, api] {
        terminate(child).await;
    }
}

/// `c2dm serve` end to end: devices register over HTTP, a push goes out through the workers,
/// every device gets its row and the gone one is disabled; SIGTERM stops it cleanly.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_registers_devices_and_pushes_then_stops_on_sigterm() {
    let mut config = Config::default();
    config.static_tokens = vec!["server-token".into()];
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    let env = Env::new(config).await;
    let database = format!("sqlite://{}", env.path("c2dm.db"));
    let (child, base) = spawn_serve(&env, &database, &["--listen", "127.0.0.1:0"]).await;
    let base = base.unwrap();

    for id in ["phone-1", "phone-2", "gone-3"] {
        let (status, body) = http(
            &base,
            "POST",
            "/v1/devices",
            "device-key-for-cli-tests",
            Some(serde_json::json!({"registration_id": id})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let done = push_to_all_and_wait(&base).await;
    assert_eq!(done["counts"]["accepted"], 2, "{done}");
    assert_eq!(done["counts"]["rejected"]["NotRegistered"], 1, "{done}");
    assert_eq!(env.emulator.delivered_count("phone-1"), 1);
    let (_, gone) = http(
        &base,
        "GET",
        "/v1/devices?state=gone",
        "admin-key-for-cli-tests",
        None,
    )
    .await;
    assert_eq!(gone["devices"][0]["registration_id"], "gone-3");

    terminate(child).await;
}

/// A second SIGTERM stops `c2dm serve` at once, even with a batch in hand that would go on
/// waiting: the batch is left to another worker, as if the process had died.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_at_once_on_a_second_sigterm() {
    let env = Env::new(Config::default()).await;
    // A C2DM that takes each request and never answers: the batch stays in hand.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let send_url = format!("http://{}/c2dm/send", hole.local_addr().unwrap());
    let database = format!("sqlite://{}", env.path("c2dm.db"));
    let (mut child, base) =
        spawn_serve_to(&send_url, &database, &["--listen", "127.0.0.1:0"]).await;
    let base = base.unwrap();
    let (status, body) = http(
        &base,
        "POST",
        "/v1/devices",
        "device-key-for-cli-tests",
        Some(serde_json::json!({"registration_id": "phone-1"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let push = serde_json::json!({"to": "all", "collapse_key": "news"});
    let (status, body) = http(
        &base,
        "POST",
        "/v1/pushes",
        "admin-key-for-cli-tests",
        Some(push),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (_held, _) = tokio::time::timeout(Duration::from_secs(60), hole.accept())
        .await
        .expect("the batch's send arrives")
        .unwrap();

    let (lines, said) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let wait_for = |text: &str| loop {
        let line = said
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("c2dm serve never said {text:?}"));
        if line.contains(text) {
            return line;
        }
    };
    let sigterm = |pid: u32| {
        let signalled = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(signalled.success());
    };
    sigterm(child.id());
    wait_for("again to stop at once");
    sigterm(child.id());
    wait_for("stopped at once");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_keys_or_with_an_unsupported_database_exits_2() {
    let env = Env::new(Config::default()).await;
    let out = env.run(&["serve", "--listen", "127.0.0.1:0"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("C2DM_SERVER_ADMIN_TOKEN"),
        "{}",
        stderr(&out)
    );
    let out = env
        .run_with(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                "mysql://localhost/c2dm",
            ],
            &[
                ("C2DM_EMAIL", DEFAULT_EMAIL),
                ("C2DM_PASSWORD", DEFAULT_PASSWORD),
                ("C2DM_SERVER_ADMIN_TOKEN", "admin-key-for-cli-tests"),
                ("C2DM_SERVER_DEVICE_KEY", "device-key-for-cli-tests"),
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unsupported database"),
        "{}",
        stderr(&out)
    );
}

/// Counts and periods beyond what the workers can add stop the server at start: a budget
/// period of u64::MAX seconds used to be taken, and then every batch panicked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_options_the_workers_cannot_add_exits_2() {
    let env = Env::new(Config::default()).await;
    for (flag, value) in [
        ("--budget-period", "18446744073709551615"),
        ("--budget-period", "31622401"),
        ("--batch-size", "4000000000"),
        ("--concurrency", "4000000000"),
        ("--workers", "100000"),
    ] {
        let out = env
            .run_with(
                &["serve", "--listen", "127.0.0.1:0", flag, value],
                &[
                    ("C2DM_EMAIL", DEFAULT_EMAIL),
                    ("C2DM_PASSWORD", DEFAULT_PASSWORD),
                    ("C2DM_SERVER_ADMIN_TOKEN", "admin-key-for-cli-tests"),
                    ("C2DM_SERVER_DEVICE_KEY", "device-key-for-cli-tests"),
                ],
            )
            .await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}

/// Weak keys stop the server at start, with a message that says what to do: a short key, or
/// the admin token equal to the device key (which every app ships).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_weak_keys_exits_2() {
    let env = Env::new(Config::default()).await;
    for (admin, device, says) in [
        ("a", "device-key-for-cli-tests", "at least 16"),
        ("admin-key-for-cli-tests", "fifteen-chars-x", "at least 16"),
        (
            "same-key-for-both-0123",
            "same-key-for-both-0123",
            "must differ",
        ),
    ] {
        let out = env
            .run_with(
                &["serve", "--listen", "127.0.0.1:0"],
                &[
                    ("C2DM_EMAIL", DEFAULT_EMAIL),
                    ("C2DM_PASSWORD", DEFAULT_PASSWORD),
                    ("C2DM_SERVER_ADMIN_TOKEN", admin),
                    ("C2DM_SERVER_DEVICE_KEY", device),
                ],
            )
            .await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{admin} {device}: {err}");
        assert!(err.contains(says), "{admin} {device}: {err}");
        for key in [admin, device].into_iter().filter(|k| k.len() >= 16) {
            assert!(!err.contains(key), "no key shown: {err}");
        }
    }
}

/// `--fcm KEY_FILE` sends through FCM HTTP v1: `send` prints the message's name, `broadcast`
/// keeps the same journal and remove list, with FCM's codes, and a message FCM cannot carry
/// is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_send_and_broadcast_with_a_service_account_key() {
    let mut config = Config::default();
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    config.devices.invalid_prefixes = vec!["bad-".into()];
    let env = Env::new(config).await;
    let key = env.path("service-account.json");
    std::fs::write(&key, env.emulator.fcm_key_file()).unwrap();
    let base = env.emulator.base_url();
    let fcm = [
        ("C2DM_FCM_KEY_FILE", key.as_str()),
        ("C2DM_FCM_URL", base.as_str()),
    ];

    let out = env
        .run_with(
            &[
                "send",
                "--to",
                "phone-1",
                "--collapse-key",
                "k",
                "-d",
                "message=hi",
            ],
            &fcm,
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let inbox = env.emulator.inbox("phone-1");
    assert_eq!(
        stdout(&out).trim(),
        format!("projects/c2dm-emulator/messages/{}", inbox[0].message_id)
    );
    let out = env
        .run_with(&["send", "--to", "gone-1", "--collapse-key", "k"], &fcm)
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("rejected: UNREGISTERED (remove this registration id)"),
        "{}",
        stdout(&out)
    );
    let out = env
        .run_with(
            &[
                "send",
                "--to",
                "phone-2",
                "--collapse-key",
                "k",
                "--delay-while-idle",
            ],
            &fcm,
        )
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("delay_while_idle"),
        "{}",
        stderr(&out)
    );
    assert!(env.emulator.inbox("phone-2").is_empty());

    let ids = env.path("ids");
    std::fs::write(&ids, "dev-1\ngone-2\nbad-3\ndev-4\n").unwrap();
    let journal_path = env.path("journal.jsonl");
    let remove = env.path("remove.txt");
    let out = env
        .run_with(
            &[
                "broadcast",
                "--ids",
                &ids,
                "--collapse-key",
                "news",
                "--journal",
                &journal_path,
                "--remove-list",
                &remove,
            ],
            &fcm,
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = journal(&journal_path);
    let by_id: HashMap<String, &serde_json::Value> = lines
        .iter()
        .map(|l| (l["registration_id"].as_str().unwrap().to_owned(), l))
        .collect();
    assert_eq!(by_id["dev-1"]["outcome"], "accepted");
    assert_eq!(by_id["gone-2"]["error"], "UNREGISTERED");
    assert_eq!(by_id["bad-3"]["error"], "INVALID_ARGUMENT");
    let mut removed: Vec<String> = std::fs::read_to_string(&remove)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    removed.sort();
    assert_eq!(removed, ["bad-3", "gone-2"]);
    // One access token a command (two sends and the broadcast): the whole broadcast took one.
    assert_eq!(env.emulator.stats().fcm.tokens, 3);

    // A key file that is not one is a usage error.
    let broken = env.path("broken.json");
    std::fs::write(&broken, "{}").unwrap();
    let out = env
        .run_with(
            &["send", "--to", "phone-3", "--collapse-key", "k"],
            &[("C2DM_FCM_KEY_FILE", broken.as_str())],
        )
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--fcm"), "{}", stderr(&out));
}

/// `c2dm --fcm KEY serve` without C2DM's credentials: a server of FCM's devices only, which
/// sends to them through FCM and gives C2DM's devices a `no_sender` row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_an_fcm_key_alone_sends_to_fcm_s_devices() {
    let env = Env::new(Config::default()).await;
    let key = env.path("service-account.json");
    std::fs::write(&key, env.emulator.fcm_key_file()).unwrap();
    let fcm_url = env.emulator.base_url();
    let database = format!("sqlite://{}", env.path("c2dm.db"));
    let global = ["--fcm", key.as_str(), "--fcm-url", fcm_url.as_str()];
    let args = ["--listen", "127.0.0.1:0"];
    let (server, base) = spawn_serve_with(&global, &[], &database, &args).await;
    let base = base.unwrap();
    for (id, provider) in [("fcm-1", "fcm"), ("phone-1", "c2dm")] {
        let device = serde_json::json!({"registration_id": id, "provider": provider});
        let key = "device-key-for-cli-tests";
        let (status, body) = http(&base, "POST", "/v1/devices", key, Some(device)).await;
        assert_eq!(status, 201, "{body}");
    }
    let done = push_to_all_and_wait(&base).await;
    assert_eq!(done["counts"]["accepted"], 1, "{done}");
    assert_eq!(done["counts"]["not_attempted"]["no_sender"], 1, "{done}");
    assert_eq!(env.emulator.inbox("fcm-1").len(), 1);
    assert!(env.emulator.inbox("phone-1").is_empty());
    terminate(server).await;
}

/// `serve --log-format json` at the default level: one JSON object a line, saying what the
/// server does (its start with its settings, each push made and finished, its stop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_what_it_does_as_json_lines() {
    let env = Env::new(Config::default()).await;
    let database = format!("sqlite://{}", env.path("c2dm.db"));
    let send_url = env.emulator.send_url();
    let global = ["--token", "server-token", "--send-url", send_url.as_str()];
    let args = ["--listen", "127.0.0.1:0", "--log-format", "json"];
    let (server, base) = spawn_serve_with(&global, &[], &database, &args).await;
    let base = base.unwrap();
    let device = serde_json::json!({"registration_id": "phone-1"});
    let key = "device-key-for-cli-tests";
    let (status, _) = http(&base, "POST", "/v1/devices", key, Some(device)).await;
    assert_eq!(status, 201);
    let done = push_to_all_and_wait(&base).await;
    let lines = terminate(server).await;
    let events: Vec<serde_json::Value> = lines
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let event = |message: &str| {
        events
            .iter()
            .find(|e| e["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {lines}"))
    };
    let starting = event("starting");
    assert_eq!(starting["level"], "INFO");
    assert_eq!(starting["fields"]["database"], database.as_str());
    assert_eq!(starting["fields"]["workers"], 2, "{starting}");
    assert_eq!(event("push made")["fields"]["audience"], "all");
    let finished = &event("push finished")["fields"];
    assert_eq!(finished["push_id"], 1);
    assert_eq!(
        finished["accepted"], done["counts"]["accepted"],
        "{finished}"
    );
    assert_eq!(finished["state"], "done");
    event("stopping: finishing the requests and jobs in hand");
}

/// `demo --keep`: after its verdict the server stays up, its console's address and admin token
/// printed, until Ctrl-C, which stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_keep_leaves_the_server_up_until_ctrl_c() {
    use std::io::BufRead;
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("c2dm"))
        .args([
            "demo",
            "--keep",
            "--devices",
            "50",
            "--server-devices",
            "20",
            "--retry-after-secs",
            "0",
            "--initial-backoff",
            "0.005",
        ])
        .env_remove("C2DM_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read (not wait) until the line that names the console; the rest is drained meanwhile.
    let console = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.trim_start().starts_with("console:") {
                std::thread::spawn(move || lines.for_each(drop));
                return (line, seen);
            }
            seen.push(line);
        }
        panic!("no console line in {seen:?}");
    })
    .await
    .unwrap();
    let (line, seen) = console;
    assert!(seen.iter().any(|l| l.starts_with("verified:")), "{seen:?}");
    // "  console: http://127.0.0.1:PORT/  (admin token: demo-…)"
    let base = line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches('/');
    let token = line.rsplit(' ').next().unwrap().trim_end_matches(')');
    assert!(token.starts_with("demo-") && token.len() == 37, "{line}");
    let (status, pushes) = http(base, "GET", "/v1/pushes", token, None).await;
    assert_eq!(status, 200, "{pushes}");
    assert_eq!(pushes["pushes"].as_array().unwrap().len(), 1, "{pushes}");
    let signalled = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

/// `serve --config FILE`: the file's settings under the environment and the options, checked as
/// the options are; `--print-config` says what is in effect and where it came from, secrets
/// redacted; and a server runs from the file, with the keys the files it names hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_from_a_config_file_under_the_environment_and_the_options() {
    let env = Env::new(Config::default()).await;
    let (admin, device) = (env.path("admin-token"), env.path("device-key"));
    std::fs::write(&admin, "admin-key-from-the-file\n").unwrap();
    std::fs::write(&device, "device-key-from-the-file\n").unwrap();
    let file = env.path("c2dm.toml");
    let database = format!("sqlite://{}", env.path("c2dm.db"));
    std::fs::write(
        &file,
        format!(
            "database = \"postgres://c2dm:hunter2@db/c2dm\"\nworkers = 3\nconcurrency = 5\n\
             daily-budget = 5000\nadmin-token-file = \"{admin}\"\ndevice-key-file = \"{device}\"\n"
        ),
    )
    .unwrap();
    let out = env
        .run_with(
            &[
                "serve",
                "--config",
                &file,
                "--concurrency",
                "9",
                "--print-config",
            ],
            &[("C2DM_DATABASE_URL", "postgres://u:s3cret@elsewhere/c2dm")],
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    for line in [
        "database = \"postgres://u:<redacted>@elsewhere/c2dm\"  # environment",
        "workers = 3  # --config file",
        "concurrency = 9  # option",
        "daily-budget = 5000  # --config file",
        "batch-size = 1000  # default",
    ] {
        assert!(printed.contains(line), "{line:?} in\n{printed}");
    }
    assert!(
        !printed.contains("s3cret") && !printed.contains("hunter2"),
        "{printed}"
    );

    // A key that is no option, and a value its option refuses: exit 2, saying which.
    let bad = env.path("bad.toml");
    for (text, says) in [
        ("bogus = 1\n", "`bogus` is not a setting"),
        ("workers = 0\n", "--workers"),
        ("no-api = 3\n", "`no-api` is true or false"),
        ("token = \"x\"\n", "`token` is not a setting"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = env.run_with(&["serve", "--config", &bad], &NO_ENV).await;
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(stderr(&out).contains(says), "{text}: {}", stderr(&out));
    }

    // A server from the file (its database given on the command line): the file's keys.
    std::fs::write(
        &file,
        format!("workers = 1\nadmin-token-file = \"{admin}\"\ndevice-key-file = \"{device}\"\n"),
    )
    .unwrap();
    let send_url = env.emulator.send_url();
    let global = ["--token", "server-token", "--send-url", send_url.as_str()];
    let args = ["--listen", "127.0.0.1:0", "--config", file.as_str()];
    let (server, base) = spawn_serve_with(&global, &[], &database, &args).await;
    let base = base.unwrap();
    let (status, _) = http(&base, "GET", "/v1/pushes", "admin-key-from-the-file", None).await;
    assert_eq!(status, 200);
    let (status, _) = http(&base, "GET", "/v1/pushes", "admin-key-for-cli-tests", None).await;
    assert_eq!(status, 401, "the environment's key is not the file's");
    terminate(server).await;
}
