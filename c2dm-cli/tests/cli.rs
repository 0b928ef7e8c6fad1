//! The `c2dm` command against an in-process emulator: each command, exit codes, the journal,
//! resume after a crash, the remove list, and bad input refused before anything is sent.
#![allow(clippy::field_reassign_with_default)] // tests set one config field at a time

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_from_stdin_with_json_summary() {
    let env = Env::new(Config::default()).await;
    let urls = env.urls();
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("c2dm"));
    cmd.args([
        "broadcast",
        "--ids",
        "-",
        "--collapse-key",
        "k",
        "--json",
        "--token",
        "x",
    ]);
    for (k, v) in &urls {
        cmd.env(k, v);
    }
    let mut config_token = Config::default();
    config_token.static_tokens = vec!["x".into()];
    drop(config_token);
    // The default emulator has no static token: log in instead.
    cmd.env("C2DM_EMAIL", DEFAULT_EMAIL)
        .env("C2DM_PASSWORD", DEFAULT_PASSWORD);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"a\nb\nc\n").unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["accepted"], 3);
    assert_eq!(json["total"], 3);
    assert_eq!(env.emulator.counters().accepted, 3);
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
            "--initial-backoff-ms",
            "5",
        ],
        NO_ENV,
    )
    .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("verified: every accepted message"), "{text}");
    assert!(text.contains("400 messages:"), "{text}");
    let out = c2dm(
        &[
            "demo",
            "--devices",
            "300",
            "--retry-after-secs",
            "0",
            "--initial-backoff-ms",
            "5",
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
