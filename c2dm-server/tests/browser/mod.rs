//! The browser the console's tests drive: Debian's headless Chromium through chromedriver
//! (WebDriver, with fantoccini). Waits happen in the page: a condition is checked there until
//! it holds (bounded by the WebDriver script timeout), never by a sleep here.

#![allow(dead_code)] // each test binary uses its part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fantoccini::wd::TimeoutConfiguration;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// How long a condition in the page may take to hold.
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// chromedriver on a free port, stopped when dropped.
pub struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts chromedriver. Fails (never skips) when it or Chromium is not installed.
    pub fn start() -> Self {
        for program in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(program).exists(),
                "{program} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
            );
        }
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = Command::new("/usr/bin/chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let output = child.stdout.take().expect("stdout");
            let (ready, started) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    if line.contains("started successfully") {
                        let _ = ready.send(());
                    }
                }
            });
            if started.recv_timeout(Duration::from_secs(20)).is_ok() {
                return Self { child, port };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("chromedriver did not start on any of five free ports");
    }

    /// A headless Chromium with a profile of its own, in a window of `width` × `height`.
    pub async fn browser(&self, profile: &std::path::Path) -> Client {
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--window-size=1200,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("an object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a browser session");
        client
            .update_timeouts(TimeoutConfiguration::new(
                Some(PAGE_WAIT),
                Some(PAGE_WAIT),
                Some(Duration::ZERO),
            ))
            .await
            .expect("timeouts");
        client
    }
}

/// The browser, and where its screenshots go.
pub struct Page {
    pub client: Client,
    pub shots: PathBuf,
}

impl Page {
    /// Waits, in the page, until the JavaScript expression `condition` is true; fails the
    /// test naming it if it is not within [`PAGE_WAIT`].
    pub async fn until(&self, condition: &str) {
        let script = format!(
            "const done = arguments[arguments.length - 1];
             const check = () => {{
               let ok = false;
               try {{ ok = Boolean({condition}); }} catch (e) {{ ok = false; }}
               if (ok) done(true); else setTimeout(check, 25);
             }};
             check();"
        );
        if let Err(err) = self.client.execute_async(&script, vec![]).await {
            let text = self.text("main").await;
            panic!("the page never showed {condition}: {err}\n--- the page:\n{text}");
        }
    }

    /// Waits until an element matching `css` is in the page and shown.
    pub async fn shown(&self, css: &str) {
        self.until(&format!(
            "(() => {{ const e = document.querySelector({css:?}); return e !== null && e.offsetParent !== null; }})()"
        ))
        .await;
    }

    pub async fn text(&self, css: &str) -> String {
        self.client
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                vec![json!(css)],
            )
            .await
            .expect("a script")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn click(&self, css: &str) {
        self.shown(css).await;
        self.client
            .find(Locator::Css(css))
            .await
            .expect(css)
            .click()
            .await
            .expect("a click");
    }

    pub async fn fill(&self, css: &str, text: &str) {
        self.shown(css).await;
        let field = self.client.find(Locator::Css(css)).await.expect(css);
        field.clear().await.expect("cleared");
        field.send_keys(text).await.expect("typed");
    }

    pub async fn select(&self, css: &str, value: &str) {
        self.shown(css).await;
        self.client
            .find(Locator::Css(css))
            .await
            .expect(css)
            .select_by_value(value)
            .await
            .expect("selected");
    }

    /// Keeps what the browser shows as `name`.png.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("saved");
    }

    pub async fn rows(&self, css: &str) -> Vec<Vec<String>> {
        let value = self
            .client
            .execute(
                "return [...document.querySelectorAll(arguments[0])].map(r => [...r.cells].map(c => c.innerText));",
                vec![json!(css)],
            )
            .await
            .expect("a script");
        serde_json::from_value(value).expect("rows of text")
    }
}

/// A browser on a page of `app`, served on a free loopback port: what each console test
/// starts from. The driver and the browser's profile live as long as it.
pub struct Session {
    pub page: Page,
    /// The console's address, `http://127.0.0.1:PORT`.
    pub base: String,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Session {
    /// Serves `app`, starts chromedriver and a headless Chromium; screenshots go to
    /// `target/console-screenshots/`.
    pub async fn open(app: axum::Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let driver = Driver::start();
        let profile = tempfile::tempdir().unwrap();
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        let page = Page {
            client: driver.browser(profile.path()).await,
            shots,
        };
        Self {
            page,
            base,
            _driver: driver,
            _profile: profile,
        }
    }
}
