//! `c2dm serve` under hostile peers and in a worker-only process: a flood of sockets that
//! never finish their request under the common open-file limit, and the health check of a
//! process without the API. Real processes, real sockets, loopback only.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "admin-key-for-limit-tests";
const DEVICE: &str = "device-key-for-limit-tests";

/// A `c2dm serve` process, killed when dropped.
struct Serve {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// `c2dm serve` on a fresh SQLite file with `args`, run by `sh` with its open-file limit
    /// set to `open_files`; waits (reading, not sleeping) for the line that names its
    /// address. Sends go to a port nothing listens on: these tests send nothing.
    async fn start(open_files: u32, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = format!("sqlite://{}", dir.path().join("c2dm.db").display());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {open_files} && exec \"$0\" \"$@\""))
            .arg(assert_cmd::cargo::cargo_bin("c2dm"))
            .args([
                "--token",
                "server-token",
                "--send-url",
                "http://127.0.0.1:9/c2dm/send",
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
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
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
            _dir: dir,
        }
    }

    /// One request on a connection of its own (`Connection: close`): the status and body.
    async fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.address).await.unwrap();
        let authorization = key
            .map(|key| format!("Authorization: Bearer {key}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{authorization}Connection: close\r\n\r\n");
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
    let server = Serve::start(1024, args).await;
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
    let server = Serve::start(
        4096,
        &[
            "--no-api",
            "--metrics-listen",
            "127.0.0.1:0",
            "--workers",
            "1",
        ],
    )
    .await;
    let (status, body) = server.get("/healthz", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\""), "{body}");
    let (status, body) = server.get("/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = server.get("/v1/devices", Some(ADMIN)).await;
    assert_eq!(status, 404, "no API here");
}
