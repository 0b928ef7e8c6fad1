//! A throwaway PostgreSQL cluster, for tests and benchmarks: `initdb` in a fresh temporary
//! folder, a server on a free loopback port, and a fresh database for whoever asks.
//!
//! The cluster lives as long as the process that started it: the server's wrapper gets a
//! signal when the thread that started it ends (which is never before the process does), then
//! stops the server and removes its folder. PostgreSQL refuses to run as root, so a root
//! process runs it as the `postgres` user that Debian's package creates.
//!
//! It needs PostgreSQL's server programs: on `PATH`, or where Debian installs them
//! (`/usr/lib/postgresql/<version>/bin`, from `apt-get install postgresql`). Without them,
//! [`PostgresCluster::shared`] fails with a message that says so; a test that needs the
//! cluster fails with it, it never passes by skipping.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running throwaway cluster.
#[derive(Debug)]
pub struct PostgresCluster {
    port: u16,
    folder: PathBuf,
    bin: PathBuf,
    root: bool,
    settings: Vec<(String, String)>,
}

/// Why the cluster could not start.
#[derive(Debug, Clone, thiserror::Error)]
#[error("throwaway PostgreSQL cluster: {0}")]
pub struct ClusterError(String);

fn fail(what: impl Into<String>) -> ClusterError {
    ClusterError(what.into())
}

/// Where PostgreSQL's server programs are: the folder of `initdb` on `PATH`, else Debian's
/// newest `/usr/lib/postgresql/<version>/bin`.
fn programs() -> Result<PathBuf, ClusterError> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path {
        if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
            // Debian links a few programs onto PATH; the others sit beside the real ones.
            let real = std::fs::canonicalize(dir.join("initdb")).ok();
            return Ok(real
                .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
                .unwrap_or(dir));
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        fail(
            "PostgreSQL's server programs (initdb, postgres) are not installed: \
             `apt-get install -y postgresql` (.ci/run does it)",
        )
    })
}

/// Whether this process runs as root (then PostgreSQL runs as `postgres`).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A command that runs `program` as the user PostgreSQL runs as.
fn as_postgres(program: &Path, root: bool) -> Command {
    if root {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) -> Result<(), ClusterError> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(format!("{what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// A port nobody listens on now.
fn free_port() -> Result<u16, ClusterError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| fail(format!("no free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| fail(e.to_string()))
}

/// Stops the server and removes the folder when this wrapper is told to stop (`TERM`, sent
/// by the kernel when the starting thread ends): `$0` is the folder, `$1` the `postgres`
/// program, `$2` the port, and any further arguments go to the server.
const WRAPPER: &str = r#"
folder=$0; program=$1; port=$2; shift 2
"$program" -D "$folder/data" -p "$port" -k "$folder" -c listen_addresses=127.0.0.1 -c fsync=off \
  -c full_page_writes=off -c synchronous_commit=off -c max_connections=300 "$@" \
  >"$folder/server.log" 2>&1 &
server=$!
trap 'kill -INT "$server"; wait "$server"; rm -rf "$folder"; exit 0' TERM INT
wait "$server"
"#;

impl PostgresCluster {
    /// The cluster of this process, started on first use; the same one after that.
    pub fn shared() -> Result<&'static PostgresCluster, ClusterError> {
        static SHARED: OnceLock<Result<PostgresCluster, ClusterError>> = OnceLock::new();
        SHARED
            .get_or_init(Self::start)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Starts a new cluster, which lives as long as this process.
    pub fn start() -> Result<PostgresCluster, ClusterError> {
        Self::start_with(&[])
    }

    /// [`PostgresCluster::start`] with more server settings, as `(name, value)` pairs: a
    /// benchmark's `("shared_preload_libraries", "pg_stat_statements")`, say.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<PostgresCluster, ClusterError> {
        let bin = programs()?;
        let root = running_as_root();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let folder =
            std::env::temp_dir().join(format!("c2dm-postgres-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&folder).map_err(|e| fail(format!("{}: {e}", folder.display())))?;
        if root {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&folder);
            run(
                chown,
                "chown to the postgres user (is Debian's postgresql installed?)",
            )?;
        }
        let mut initdb = as_postgres(&bin.join("initdb"), root);
        initdb.arg("-D").arg(folder.join("data")).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        let cluster = PostgresCluster {
            port: free_port()?,
            folder,
            bin,
            root,
            settings: settings
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        };
        cluster.spawn_server()?;
        Ok(cluster)
    }

    /// Starts the server on the cluster's folder and port, and waits until it takes
    /// connections.
    fn spawn_server(&self) -> Result<(), ClusterError> {
        // The log says when the server is ready: a new server's, not an earlier one's.
        let _ = std::fs::remove_file(self.folder.join("server.log"));
        let mut wrapper = Command::new("setpriv");
        if self.root {
            wrapper.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
        }
        wrapper
            .args(["--pdeathsig=TERM", "--", "sh", "-c", WRAPPER])
            .arg(&self.folder)
            .arg(self.bin.join("postgres"))
            .arg(self.port.to_string())
            .args(
                self.settings
                    .iter()
                    .flat_map(|(name, value)| ["-c".to_owned(), format!("{name}={value}")]),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // The wrapper is told to stop when the thread that started it ends: a thread that
        // lives as long as the process.
        let (started, spawned) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("throwaway-postgres".into())
            .spawn(move || {
                let child = wrapper.spawn();
                let ok = child.is_ok();
                let _ = started.send(child.map_err(|e| e.to_string()));
                if ok {
                    loop {
                        std::thread::park();
                    }
                }
            })
            .map_err(|e| fail(e.to_string()))?;
        spawned
            .recv()
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("setpriv sh (the server's wrapper): {e}")))?;
        self.wait_until_ready()
    }

    /// Stops the server at once, as a crash or a power cut would (`pg_ctl stop -m
    /// immediate`): every connection drops, and new ones are refused until
    /// [`PostgresCluster::start_again`]. For tests of what a database outage does.
    pub fn stop_immediately(&self) -> Result<(), ClusterError> {
        let mut pg_ctl = as_postgres(&self.program("pg_ctl"), self.root);
        pg_ctl
            .arg("-D")
            .arg(self.folder.join("data"))
            .args(["stop", "-m", "immediate", "-w"]);
        run(pg_ctl, "pg_ctl stop -m immediate")
    }

    /// Starts the server again after [`PostgresCluster::stop_immediately`], on the same
    /// data, port and settings (it recovers from its log first), and waits until it takes
    /// connections.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.spawn_server()
    }

    /// Waits, up to a minute, for the server to say it takes connections.
    fn wait_until_ready(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let log = self.folder.join("server.log");
        loop {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            if said.contains("ready to accept connections")
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "the server did not start within a minute: {said}"
                )));
            }
            // Waiting for another process to start: nothing to be told by.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One of PostgreSQL's programs (`psql`, `createdb`, …) of the version this cluster runs.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// [`PostgresCluster::create_database`] without a runtime: through `createdb`.
    pub fn create_database_blocking(&self, prefix: &str) -> Result<String, ClusterError> {
        let name = Self::fresh_name(prefix);
        let mut createdb = Command::new(self.program("createdb"));
        createdb
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg(&name);
        run(createdb, "createdb")?;
        Ok(self.url(&name))
    }

    /// A database name no other call of this process gets.
    fn fresh_name(prefix: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{prefix}_{n}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` on this cluster (as the `postgres` superuser, no password).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a fresh database with a name no other call of this process gets, and returns
    /// its URL: [`PostgresCluster::create_database_blocking`] without blocking the runtime.
    pub async fn create_database(&self, prefix: &str) -> Result<String, ClusterError> {
        let name = Self::fresh_name(prefix);
        let out = tokio::process::Command::new(self.program("createdb"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg(&name)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| fail(format!("createdb: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "createdb {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(self.url(&name))
    }
}
