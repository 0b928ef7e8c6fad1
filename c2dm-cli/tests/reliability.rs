//! Reliability and security of the `c2dm` command: secrets never printed, certificates always
//! checked, a hung server bounded by the timeout.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use c2dm_emulator::{Config, DEFAULT_EMAIL, DEFAULT_PASSWORD, Emulator};
use common::c2dm;

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every token the emulator issues looks like `EMU` and 32 hex digits.
fn find_token(text: &str) -> Option<&str> {
    text.match_indices("EMU").find_map(|(i, _)| {
        let candidate = text.get(i..i + 35)?;
        candidate[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then_some(candidate)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_output_at_the_most_verbose_level() {
    const PASSWORD: &str = "pw-that-must-never-show";
    let config = Config {
        accounts: vec![c2dm_emulator::Account::new(DEFAULT_EMAIL, PASSWORD)],
        rotate_token_every: Some(2),
        // A login's tokens expire after 10 sends, under a broadcast of 8 at once: sends that
        // lose the race for a fresh login renew it instead of failing.
        token_lifetime_sends: Some(10),
        ..Config::default()
    };
    let emulator = Emulator::start_tls(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, emulator.cert_pem().unwrap()).unwrap();
    let ids = dir.path().join("ids");
    std::fs::write(&ids, (0..20).map(|i| format!("d{i}\n")).collect::<String>()).unwrap();
    let env = vec![
        ("C2DM_SEND_URL", emulator.send_url()),
        ("C2DM_LOGIN_URL", emulator.login_url()),
        ("C2DM_EMAIL", DEFAULT_EMAIL.to_string()),
        ("C2DM_PASSWORD", PASSWORD.to_string()),
    ];
    let cert_arg = cert.to_string_lossy().into_owned();
    let ids_arg = ids.to_string_lossy().into_owned();
    // Login (its token is the one thing `login` prints on stdout, by design: check stderr only),
    // then sends with rotations, an expiry (a 401) and a new login.
    let login = c2dm(
        ["-vv", "--ca-cert", &cert_arg, "login"]
            .map(String::from)
            .to_vec(),
        env.clone(),
    )
    .await;
    assert!(login.status.success(), "{}", text(&login));
    let stderr = String::from_utf8_lossy(&login.stderr);
    assert!(!stderr.contains(PASSWORD));
    assert_eq!(find_token(&stderr), None, "a token in the login's log");
    let token = String::from_utf8_lossy(&login.stdout).trim().to_owned();

    let runs = [
        vec![
            "-vv",
            "--ca-cert",
            &cert_arg,
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
        ],
        vec![
            "-vv",
            "--ca-cert",
            &cert_arg,
            "send",
            "--json",
            "--to",
            "d",
            "--collapse-key",
            "k",
        ],
        vec![
            "-vv",
            "--ca-cert",
            &cert_arg,
            "broadcast",
            "--ids",
            &ids_arg,
            "--collapse-key",
            "k",
            "--concurrency",
            "8",
        ],
    ];
    for args in runs {
        let out = c2dm(args.iter(), env.clone()).await;
        let all = text(&out);
        assert!(out.status.success(), "{all}");
        assert!(
            all.contains("TRACE") || all.contains("DEBUG"),
            "the log level is really high"
        );
        assert!(!all.contains(PASSWORD), "the password in: {all}");
        assert_eq!(find_token(&all), None, "a token in: {all}");
    }
    // A refused token given on the command line is not echoed either.
    let mut with_token = env.clone();
    with_token.push(("C2DM_AUTH_TOKEN", token.clone()));
    let out = c2dm(
        [
            "-vv",
            "--ca-cert",
            &cert_arg,
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
        ]
        .map(String::from)
        .to_vec(),
        with_token,
    )
    .await;
    assert!(!text(&out).contains(&token));
    let stats = emulator.counters();
    assert!(
        stats.rotations >= 2 && stats.expiries >= 1 && stats.unauthorized >= 1,
        "{stats:?}"
    );
    // --help shows no secret from the environment either.
    let help = c2dm(["--help"], env.clone()).await;
    assert!(!text(&help).contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_stops_send_and_broadcast_before_any_delivery() {
    let emulator = Emulator::start_tls(Config::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    std::fs::write(&ids, "a\nb\nc\n").unwrap();
    let env = vec![
        ("C2DM_SEND_URL", emulator.send_url()),
        ("C2DM_LOGIN_URL", emulator.login_url()),
        ("C2DM_EMAIL", DEFAULT_EMAIL.to_string()),
        ("C2DM_PASSWORD", DEFAULT_PASSWORD.to_string()),
    ];
    let start = Instant::now();
    let out = c2dm(
        ["send", "--to", "a", "--collapse-key", "k"]
            .map(String::from)
            .to_vec(),
        env.clone(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let all = text(&out);
    assert!(all.contains("invalid peer certificate"), "{all}");
    let journal = dir.path().join("j");
    let out = c2dm(
        vec![
            "broadcast".into(),
            "--ids".into(),
            ids.to_string_lossy().into_owned(),
            "--collapse-key".into(),
            "k".into(),
            "--journal".into(),
            journal.to_string_lossy().into_owned(),
        ],
        env.clone(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let lines = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(lines.lines().count(), 3);
    assert!(
        lines
            .lines()
            .all(|l| l.contains("\"outcome\":\"failed\"") && l.contains("certificate")),
        "{lines}"
    );
    // Certificate errors are not retried: this took no backoff.
    assert!(start.elapsed() < Duration::from_secs(20));
    let stats = emulator.stats();
    assert_eq!((stats.sends, stats.logins), (0, 0));
    assert!(stats.inbox.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_bounded_by_the_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = format!("http://127.0.0.1:{port}/c2dm/send");
    let env = vec![("C2DM_AUTH_TOKEN", "T".to_string()), ("C2DM_SEND_URL", url)];
    let out = c2dm(
        [
            "send",
            "--timeout",
            "0.3",
            "--initial-backoff",
            "0.05",
            "--max-attempts",
            "2",
            "--to",
            "d",
            "--collapse-key",
            "k",
        ]
        .map(String::from)
        .to_vec(),
        env.clone(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    // Two attempts, each ended by the 0.3 s timeout, not the default 30 s.
    let said = text(&out);
    assert!(said.contains("no answer within 300ms"), "{said}");
    assert!(said.contains("after 2 attempts"), "{said}");

    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    std::fs::write(&ids, (0..10).map(|i| format!("d{i}\n")).collect::<String>()).unwrap();
    let journal = dir.path().join("j");
    let out = c2dm(
        vec![
            "broadcast".into(),
            "--timeout".into(),
            "0.2".into(),
            "--max-attempts".into(),
            "1".into(),
            "--ids".into(),
            ids.to_string_lossy().into_owned(),
            "--collapse-key".into(),
            "k".into(),
            "--journal".into(),
            journal.to_string_lossy().into_owned(),
        ],
        env,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let lines = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(lines.lines().count(), 10, "every id accounted for");
    assert!(
        lines.lines().all(
            |l| l.contains("\"outcome\":\"failed\"") && l.contains("\"possible_duplicates\":1")
        ),
        "{lines}"
    );
    server.abort();
}
