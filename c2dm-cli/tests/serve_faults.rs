//! `c2dm serve` as a process, under faults: a flood of sockets that never finish their request
//! under the common open-file limit, the health check of a process without the API, and a
//! stop (a real SIGTERM) while C2DM refuses every connection. Real processes, real sockets,
//! loopback only.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "admin-key-for-limit-tests";
const DEVICE: &str = "device-key-for-limit-tests";

/// A send URL where nothing listens: connections are refused, as in a C2DM outage.
const NOWHERE: &str = "http://127.0.0.1:9/c2dm/send";

/// A `c2dm serve` process, killed when dropped.
struct Serve {
    child: Child,
    address: String,
    /// Its standard error, line by line (when asked for).
    stderr: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
}

/// How to start a [`Serve`].
struct Spec<'a> {
    /// Its open-file limit.
    open_files: u32,
    /// Its SQLite file.
    database: &'a std::path::Path,
    /// Where it sends.
    send_url: &'a str,
    /// Its `C2DM_LOG`, and whether its standard error is read.
    log: Option<&'a str>,
    /// `c2dm serve`'s further arguments.
    args: &'a [&'a str],
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// `c2dm serve` on `spec.database`, run by `sh` with its open-file limit set; waits
    /// (reading, not sleeping) for the line that names its address.
    async fn start(spec: Spec<'_>) -> Self {
        let Spec {
            open_files,
            database,
            send_url,
            log,
            args,
        } = spec;
        let database = format!("sqlite://{}", database.display());
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {open_files} && exec \"$0\" \"$@\""))
            .arg(assert_cmd::cargo::cargo_bin("c2dm"))
            .args([
                "--token",
                "server-token",
                "--send-url",
                send_url,
                "serve",
                "--database",
                &database,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .env("C2DM_SERVER_ADMIN_TOKEN", ADMIN)
            .env("C2DM_SERVER_DEVICE_KEY", DEVICE)
            .env_remove("C2DM_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if log.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if let Some(log) = log {
            command.env("C2DM_LOG", log);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().map(|stderr| {
            let (lines, read) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if lines.send(line).is_err() {
                        break;
                    }
                }
            });
            read
        });
        let line = common::first_line(&mut child).await;
        let address = line
            .trim()
            .rsplit("http://")
            .next()
            .unwrap_or_default()
            .to_owned();
        assert!(address.contains(':'), "no address in {line:?}");
        Self {
            child,
            address,
            stderr,
        }
    }

    /// Waits (reading) for a line of its standard error that holds `text`.
    async fn said(&mut self, text: &str) -> String {
        let lines = self.stderr.as_mut().expect("its standard error is read");
        let wait = async {
            while let Some(line) = lines.recv().await {
                if line.contains(text) {
                    return line;
                }
            }
            panic!("it ended without saying {text:?}");
        };
        tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .unwrap_or_else(|_| panic!("it did not say {text:?} within two minutes"))
    }

    /// One request with a JSON body on a connection of its own: the status and body.
    async fn post(&self, path: &str, key: &str, body: &serde_json::Value) -> (u16, String) {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        self.exchange(&request).await
    }

    /// One request on a connection of its own (`Connection: close`): the status and body.
    async fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let authorization = key
            .map(|key| format!("Authorization: Bearer {key}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{authorization}Connection: close\r\n\r\n");
        self.exchange(&request).await
    }

    /// `request` on a connection of its own, read to its end: the status and body.
    async fn exchange(&self, request: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

/// 2,000 sockets that send half a request head and stop, against a server whose open-file
/// limit is 1,024: the health check and an admin request still answer within a second (the
/// longest-idle connections are closed for new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_heads_under_1024_open_files_leaves_the_server_answering() {
    flooded(&[]).await;
}

/// The same with `--max-connections` above the open-file limit: the server runs out of file
/// descriptors, and closes idle connections to make room rather than stop accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_open_file_limit_leaves_the_server_answering() {
    flooded(&["--max-connections", "100000"]).await;
}

async fn flooded(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(Spec {
        open_files: 1024,
        database: &dir.path().join("c2dm.db"),
        send_url: NOWHERE,
        log: None,
        args,
    })
    .await;
    let mut flood = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let mut stream = TcpStream::connect(&server.address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        flood.push(stream);
    }
    let answered = tokio::time::timeout(Duration::from_secs(1), server.get("/healthz", None))
        .await
        .expect("/healthz answers within a second");
    assert_eq!(answered.0, 200, "{}", answered.1);
    let answered = tokio::time::timeout(
        Duration::from_secs(1),
        server.get("/v1/devices?limit=1", Some(ADMIN)),
    )
    .await
    .expect("an admin request answers within a second");
    assert_eq!(answered.0, 200, "{}", answered.1);
    drop(flood);
}

/// A worker-only process serves `GET /healthz` (and `/metrics`) on its metrics address, and
/// says where on its first line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_its_health_on_its_metrics_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(Spec {
        open_files: 4096,
        database: &dir.path().join("c2dm.db"),
        send_url: NOWHERE,
        log: None,
        args: &[
            "--no-api",
            "--metrics-listen",
            "127.0.0.1:0",
            "--workers",
            "1",
        ],
    })
    .await;
    let (status, body) = server.get("/healthz", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\""), "{body}");
    let (status, body) = server.get("/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = server.get("/v1/devices", Some(ADMIN)).await;
    assert_eq!(status, 404, "no API here");
}

/// SIGTERM while C2DM refuses every connection, with the batches waiting out their retries:
/// the process stops well within `--shutdown-timeout` (exit 0, not the timeout's 1), leaving
/// its batches to their next run; a process started again on the same database, against a
/// working C2DM, finishes the push: one row per device, each sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_c2dm_outage_ends_within_the_shutdown_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("c2dm.db");
    let mut server = Serve::start(Spec {
        open_files: 4096,
        database: &database,
        send_url: NOWHERE,
        log: Some("warn,c2dm_core=debug"),
        args: &["--shutdown-timeout", "20", "--batch-size", "500"],
    })
    .await;
    let devices = 2000;
    for i in 0..devices {
        let body = serde_json::json!({ "registration_id": format!("phone-{i:04}") });
        let (status, answer) = server.post("/v1/devices", DEVICE, &body).await;
        assert_eq!(status, 201, "{answer}");
    }
    let push = serde_json::json!({"to": "all", "collapse_key": "k"});
    let (status, answer) = server.post("/v1/pushes", ADMIN, &push).await;
    assert_eq!(status, 202, "{answer}");
    // The batches send, every send fails to connect and waits to try again.
    server.said("retrying").await;
    let pid = server.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let mut child = std::mem::replace(&mut server.child, Command::new("true").spawn().unwrap());
    let exit = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .expect("the process stops")
    .unwrap();
    assert_eq!(exit.code(), Some(0), "a stop within the timeout: {exit}");

    let emulator = c2dm_emulator::Emulator::start(c2dm_emulator::Config {
        static_tokens: vec!["server-token".into()],
        ..c2dm_emulator::Config::default()
    })
    .await
    .unwrap();
    let again = Serve::start(Spec {
        open_files: 4096,
        database: &database,
        send_url: &emulator.send_url(),
        log: None,
        args: &[],
    })
    .await;
    let (status, message) = again.get("/v1/pushes/1?wait=60", Some(ADMIN)).await;
    assert_eq!(status, 200, "{message}");
    let message: serde_json::Value = serde_json::from_str(&message).unwrap();
    assert_eq!(message["state"], "done", "{message}");
    let (_, failed) = again
        .get("/v1/pushes/1/deliveries?outcome=failed", Some(ADMIN))
        .await;
    assert_eq!(message["tally"]["accepted"], devices, "{message} {failed}");
    for i in 0..devices {
        let id = format!("phone-{i:04}");
        assert_eq!(emulator.delivered_count(&id), 1, "{id}");
    }
}
