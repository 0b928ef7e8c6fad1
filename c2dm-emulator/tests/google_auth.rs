//! PyPI's `google-auth`, Google's own client, takes the emulator's service account key file,
//! gets a token from its token endpoint (over TLS, trusting only its certificate), and the send
//! endpoint takes that token. `.ci/run` installs google-auth and requests; without them this
//! test fails.

use std::process::Command;

use c2dm_emulator::{Config, Emulator};

#[tokio::test]
async fn google_auth_gets_a_token_the_send_endpoint_takes() {
    let emulator = Emulator::start_tls(Config::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("service-account.json");
    let ca_cert = dir.path().join("emulator.pem");
    std::fs::write(&key_file, emulator.fcm_key_file()).unwrap();
    std::fs::write(&ca_cert, emulator.cert_pem().unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/google_auth/send.py");
    let args = (key_file, ca_cert, emulator.fcm_send_url());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(&args.0)
            .arg(&args.1)
            .arg(&args.2)
            .arg("python-phone")
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    assert!(
        output.status.success(),
        "google-auth against the emulator failed (is `pip install google-auth requests` done?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let name = String::from_utf8(output.stdout).unwrap();
    let inbox = emulator.inbox("python-phone");
    assert_eq!(inbox.len(), 1, "{name}");
    assert_eq!(
        name.trim(),
        format!("projects/c2dm-emulator/messages/{}", inbox[0].message_id)
    );
    assert_eq!(
        inbox[0].data,
        [("from_python".to_owned(), "yes".to_owned())]
    );
    let stats = emulator.stats();
    assert_eq!((stats.fcm.tokens, stats.fcm.token_refusals), (1, 0));
}
