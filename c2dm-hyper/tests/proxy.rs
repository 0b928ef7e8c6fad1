//! HyperTransport through a real HTTP proxy, Debian's tinyproxy, started by each test on a free
//! loopback port (`.ci/run` installs it when absent): a send through it to the emulator over
//! TLS, a proxy that refuses the tunnel, and a proxy that asks for credentials.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use c2dm_core::{
    AuthToken, Message, RequestSent, Sender, StaticToken, Transport, TransportErrorKind,
};
use c2dm_emulator::{Config, Emulator};
use c2dm_hyper::{HyperTransport, Proxy};

/// A tinyproxy process, stopped when dropped, and what it has logged so far.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tinyproxy {
    /// Starts tinyproxy with `extra` lines in its configuration. Fails (never skips) when
    /// tinyproxy is not installed.
    fn start(extra: &str) -> Self {
        let program = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("tinyproxy is not installed: apt-get install -y tinyproxy (.ci/run does)");
        // A free port can be taken by someone else before tinyproxy binds it: then try another.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let dir = tempfile::tempdir().expect("a temporary folder");
            let config = dir.path().join("tinyproxy.conf");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\n\
                     MaxClients 32\nLogLevel Info\nDisableViaHeader Yes\n{extra}\n"
                ),
            )
            .expect("the configuration");
            let mut child = Command::new(program)
                .arg("-d")
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                // In the foreground, tinyproxy logs to its standard output.
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("tinyproxy starts");
            let output = child.stdout.take().expect("stdout");
            let log = Arc::new(Mutex::new(Vec::new()));
            let (ready, listening) = mpsc::channel();
            let lines = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    if line.contains("Accepting connections") {
                        let _ = ready.send(());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
            match listening.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => {
                    return Self {
                        child,
                        port,
                        log,
                        _dir: dir,
                    };
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    eprintln!("tinyproxy did not start: {:?}", log.lock().unwrap());
                }
            }
        }
        panic!("tinyproxy did not start on any of five free ports");
    }

    fn url(&self, credentials: &str) -> String {
        format!("http://{credentials}127.0.0.1:{}", self.port)
    }

    fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }
}

const TOKEN: &str = "proxy-test-token";

async fn emulator() -> Emulator {
    let config = Config {
        static_tokens: vec![TOKEN.to_owned()],
        ..Config::default()
    };
    Emulator::start_tls(config).await.expect("the emulator")
}

/// A transport that trusts the emulator's certificate, and reaches it through `proxy`.
fn through(emulator: &Emulator, proxy: &str) -> HyperTransport {
    HyperTransport::builder()
        .only_added_roots()
        .add_root_certificates_pem(emulator.cert_pem().expect("TLS").as_bytes())
        .unwrap()
        .proxy(Proxy::new(proxy).unwrap())
        .request_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn message(device: &str) -> Message {
    Message::builder(device)
        .collapse_key("k")
        .data("m", "through the proxy")
        .build()
        .unwrap()
}

fn sender(transport: HyperTransport, emulator: &Emulator) -> Sender {
    Sender::builder(transport, StaticToken::new(AuthToken::new(TOKEN).unwrap()))
        .endpoint(emulator.send_url().parse().unwrap())
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_goes_through_the_proxy_with_tls_end_to_end() {
    let emulator = emulator().await;
    let proxy = Tinyproxy::start("");
    let sent = sender(through(&emulator, &proxy.url("")), &emulator)
        .send(message("phone-1"))
        .await
        .expect("sent through the proxy");
    assert!(!sent.message_id.as_str().is_empty());
    assert_eq!(emulator.inbox("phone-1").len(), 1);
    let port = emulator
        .send_url()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        proxy.logged(&format!("CONNECT 127.0.0.1:{port}")),
        "the proxy carried no tunnel: {:?}",
        proxy.log.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_the_tunnel_is_a_clear_error_and_nothing_is_sent() {
    let emulator = emulator().await;
    // Tunnels to port 443 only: not to the emulator's.
    let proxy = Tinyproxy::start("ConnectPort 443");
    let transport = through(&emulator, &proxy.url(""));
    let request = http::Request::post(emulator.send_url())
        .body(bytes::Bytes::from_static(
            b"registration_id=phone-2&collapse_key=k",
        ))
        .unwrap();
    let err = transport.execute(request).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err}");
    assert_eq!(err.request_sent(), RequestSent::No, "{err}");
    let text = err.to_string();
    assert!(text.contains("refused a tunnel to 127.0.0.1:"), "{text}");
    assert!(text.contains("403"), "{text}");
    assert!(emulator.inbox("phone-2").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_asks_for_credentials_gets_them_from_the_url() {
    let emulator = emulator().await;
    let proxy = Tinyproxy::start("BasicAuth kit s3cret-pw");
    let post = || {
        http::Request::post(emulator.send_url())
            .body(bytes::Bytes::from_static(
                b"registration_id=phone-3&collapse_key=k",
            ))
            .unwrap()
    };

    // Without credentials: a clear error that says what to do, and nothing sent.
    let err = through(&emulator, &proxy.url(""))
        .execute(post())
        .await
        .unwrap_err();
    assert_eq!(err.request_sent(), RequestSent::No, "{err}");
    assert!(err.to_string().contains("asks for credentials"), "{err}");

    // Wrong ones: refused, and the password is not repeated.
    let err = through(&emulator, &proxy.url("kit:wrong-pw@"))
        .execute(post())
        .await
        .unwrap_err();
    assert_eq!(err.request_sent(), RequestSent::No, "{err}");
    assert!(err.to_string().contains("refused the credentials"), "{err}");
    assert!(!err.to_string().contains("wrong-pw"), "{err}");
    assert!(emulator.inbox("phone-3").is_empty());

    // The right ones: through.
    let transport = through(&emulator, &proxy.url("kit:s3cret-pw@"));
    assert!(!format!("{transport:?}").contains("s3cret"));
    let sent = sender(transport, &emulator)
        .send(message("phone-3"))
        .await
        .expect("sent with credentials");
    assert!(!sent.message_id.as_str().is_empty());
    assert_eq!(emulator.inbox("phone-3").len(), 1);
}
