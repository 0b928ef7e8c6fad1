//! `cargo xtask deb`: the Debian package of the c2dm command and its service, built with
//! cargo-deb from `c2dm-cli`'s `[package.metadata.deb]` (the `dist` profile, as deployments
//! run it; `--profile dev` packages the tests' build instead, for CI's check) into
//! `target/debian/`.
//!
//! With `--check` (in CI, as root or through sudo), the package is then tried on this machine
//! as an operator would: installed with dpkg; its unit accepted by `systemd-analyze verify`;
//! its files, user and keys where the unit expects them; the installed binary run exactly as
//! the unit's `ExecStart` says, as the unit's user, against the emulator (ClientLogin and
//! sends), until a push to a few devices is done; stopped by SIGTERM; and purged, leaving
//! nothing behind. A container image is not built: none can be tested here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::bench_server::http;

/// Where the unit is installed, and what it is named.
const UNIT: &str = "/usr/lib/systemd/system/c2dm.service";

/// What the package installs and a purge must take away.
const INSTALLED: [&str; 5] = [
    "/usr/bin/c2dm",
    UNIT,
    "/etc/c2dm/c2dm.toml",
    "/etc/c2dm/admin-token",
    "/etc/c2dm/device-key",
];

pub fn run(root: &Path, check: bool, profile: &str) -> Result<(), String> {
    if !crate::bench::have("cargo-deb") {
        return Err(
            "cargo-deb is not installed: cargo install cargo-deb --locked (.ci/run does)".into(),
        );
    }
    let deb = build(root, profile)?;
    eprintln!("== deb: {}", deb.display());
    if !check {
        return Ok(());
    }
    for tool in ["dpkg", "systemd-analyze", "setpriv"] {
        if !crate::bench::have(tool) {
            return Err(format!("{tool} is missing (.ci/run installs systemd)"));
        }
    }
    // Whatever an earlier run left is purged first; the package is purged after, pass or fail.
    purge()?;
    let result = try_installed(root, &deb);
    let purged = purge().and_then(|()| nothing_left());
    result.and(purged)?;
    eprintln!("== deb: installed, verified, served a push, purged cleanly");
    Ok(())
}

/// Builds the package with the program built in `profile`; returns its path.
fn build(root: &Path, profile: &str) -> Result<PathBuf, String> {
    let out = crate::target_dir(root).join("debian");
    let _ = std::fs::remove_dir_all(&out);
    crate::run(
        "Debian package",
        "cargo",
        &[
            "deb",
            "-p",
            "c2dm-cli",
            "--profile",
            profile,
            "--output",
            &out.display().to_string(),
        ],
        &[],
    )?;
    std::fs::read_dir(&out)
        .map_err(|e| format!("{}: {e}", out.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| format!("cargo deb wrote no .deb into {}", out.display()))
}

/// A command as root: itself when this process is root, else through sudo.
fn as_root(program: &str) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    if root {
        Command::new(program)
    } else {
        let mut command = Command::new("sudo");
        command.arg(program);
        command
    }
}

/// Runs `command`, failing with `step` and what it printed if it fails; returns its output.
fn output(step: &str, command: &mut Command) -> Result<String, String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{step}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{step} failed ({}):\n{text}", out.status))
    }
}

/// Installs the package, checks it, and serves a push from it.
fn try_installed(root: &Path, deb: &Path) -> Result<(), String> {
    eprintln!("== deb: dpkg -i {}", deb.display());
    output("dpkg -i", as_root("dpkg").arg("-i").arg(deb))?;
    for path in INSTALLED {
        if !Path::new(path).exists() {
            return Err(format!("the package installed no {path}"));
        }
    }
    let version = output(
        "c2dm --version",
        Command::new("/usr/bin/c2dm").arg("--version"),
    )?;
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).map_err(|e| e.to_string())?;
    let wanted = crate::release::workspace_version(&manifest)?.to_string();
    if !version.contains(&wanted) {
        return Err(format!("the installed c2dm is {version:?}, not {wanted}"));
    }
    key_mode("/etc/c2dm/admin-token")?;
    key_mode("/etc/c2dm/device-key")?;
    let verified = output(
        "systemd-analyze verify",
        Command::new("systemd-analyze").args(["verify", UNIT]),
    )?;
    if !verified.trim().is_empty() {
        return Err(format!(
            "systemd-analyze verify had something to say:\n{verified}"
        ));
    }
    let unit = std::fs::read_to_string(UNIT).map_err(|e| format!("{UNIT}: {e}"))?;
    let service = Unit::parse(&unit)?;
    serve_a_push(root, &service)
}

/// A key the postinst made: not empty, and readable by root and the service's group only.
fn key_mode(path: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    if meta.mode() & 0o777 != 0o640 {
        return Err(format!(
            "{path} has mode {:o}, not 640",
            meta.mode() & 0o777
        ));
    }
    let group = output(
        "getent group c2dm",
        Command::new("getent").args(["group", "c2dm"]),
    )?;
    let gid: u32 = group
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .ok_or_else(|| format!("no c2dm group: {group}"))?;
    if meta.uid() != 0 || meta.gid() != gid || meta.len() < 32 {
        return Err(format!("{path}: not root:c2dm, or too short"));
    }
    Ok(())
}

/// What the check takes from the installed unit: how it starts, and as whom.
#[derive(Debug, PartialEq)]
struct Unit {
    exec_start: Vec<String>,
    user: String,
    state_directory: String,
}

impl Unit {
    fn parse(text: &str) -> Result<Self, String> {
        let value = |key: &str| {
            text.lines()
                .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
                .next_back()
                .map(str::trim)
                .ok_or_else(|| format!("the unit has no {key}="))
        };
        Ok(Self {
            exec_start: value("ExecStart")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            user: value("User")?.to_owned(),
            state_directory: value("StateDirectory")?.to_owned(),
        })
    }
}

/// Runs the unit's command as its user, against the emulator, until a push is done.
fn serve_a_push(root: &Path, unit: &Unit) -> Result<(), String> {
    let bin = crate::target_dir(root).join("debug");
    crate::run(
        "build",
        &crate::cargo(),
        &["build", "-p", "c2dm-emulator"],
        &[],
    )?;
    let dir = std::env::temp_dir().join(format!("c2dm-deb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let emulator = crate::bench::Emulator::start_with(
        &bin,
        &dir,
        false,
        false,
        &[
            "--account",
            "sender@example.com:the-sender-password",
            "--not-registered-prefix",
            "gone-",
        ],
    )?;
    // What an operator adds to the installed file: how to send, and (for the check) a port
    // file in the state directory instead of a fixed port.
    let state = Path::new("/var/lib").join(&unit.state_directory);
    let port_file = state.join("port");
    let config = format!(
        "{}\nsend-url = \"{}\"\nlogin-url = \"{}\"\nemail = \"sender@example.com\"\n\
         password-file = \"/etc/c2dm/password\"\nlisten = \"127.0.0.1:0\"\nport-file = \"{}\"\n",
        std::fs::read_to_string("/etc/c2dm/c2dm.toml")
            .map_err(|e| e.to_string())?
            .replace("listen = \"127.0.0.1:8080\"", ""),
        emulator.send_url(),
        emulator.login_url(),
        port_file.display()
    );
    write_as_root("/etc/c2dm/c2dm.toml", &config, "644")?;
    write_as_root("/etc/c2dm/password", "the-sender-password\n", "640")?;
    output(
        "chgrp",
        as_root("chgrp").args(["c2dm", "/etc/c2dm/password"]),
    )?;
    // As systemd would: the state directory made and owned by the user, a clean environment,
    // the user's own identity, the working directory at /.
    output(
        "state directory",
        as_root("install")
            .args(["-d", "-m", "0750", "-o", &unit.user, "-g", &unit.user])
            .arg(&state),
    )?;
    let _ = std::fs::remove_file(&port_file);
    let mut command = as_root("setpriv");
    command
        .args([
            "--reuid",
            &unit.user,
            "--regid",
            &unit.user,
            "--init-groups",
            "--",
        ])
        .args(&unit.exec_start)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).map_err(|e| e.to_string())?);
    eprintln!("== deb: as {}: {}", unit.user, unit.exec_start.join(" "));
    let mut server = command.spawn().map_err(|e| format!("setpriv: {e}"))?;
    let served = crate::wait_for_port(&port_file, Duration::from_secs(30), "the installed server")
        .and_then(push_to_devices);
    // SIGTERM, as systemctl stop sends it (setpriv runs the command in its own process).
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let stopped = server.wait().map_err(|e| e.to_string())?;
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    // The operator's own file goes with the operator; the purge takes the package's.
    output("rm", as_root("rm").args(["-f", "/etc/c2dm/password"]))?;
    drop(emulator);
    let _ = std::fs::remove_dir_all(&dir);
    served.map_err(|e| format!("{e}\n--- the server's log:\n{log}"))?;
    if !stopped.success() {
        return Err(format!("the server stopped with {stopped}:\n{log}"));
    }
    Ok(())
}

/// Writes `text` to `path` as root, with `mode`.
fn write_as_root(path: &str, text: &str, mode: &str) -> Result<(), String> {
    let mut child = as_root("tee")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("tee {path}: {e}"))?;
    std::io::Write::write_all(child.stdin.as_mut().expect("piped"), text.as_bytes())
        .map_err(|e| e.to_string())?;
    if !child.wait().map_err(|e| e.to_string())?.success() {
        return Err(format!("could not write {path}"));
    }
    output("chmod", as_root("chmod").args([mode, path]))?;
    Ok(())
}

/// Registers devices with the installed keys, pushes to all, and waits until it is done: two
/// accepted, one gone.
fn push_to_devices(port: u16) -> Result<(), String> {
    let key = |path: &str| {
        std::fs::read_to_string(path)
            .map(|k| k.trim().to_owned())
            .map_err(|e| format!("{path}: {e}"))
    };
    let (admin, device) = (key("/etc/c2dm/admin-token")?, key("/etc/c2dm/device-key")?);
    for id in ["phone-1", "phone-2", "gone-3"] {
        let body = format!(r#"{{"registration_id": "{id}"}}"#);
        let (status, answer, _) = http(port, "POST", "/v1/devices", &device, Some(&body))?;
        if status != 201 {
            return Err(format!("registering {id}: {status} {answer}"));
        }
    }
    let (status, answer, _) = http(
        port,
        "POST",
        "/v1/pushes",
        &admin,
        Some(r#"{"to": "all", "collapse_key": "installed", "data": {"from-package": "yes"}}"#),
    )?;
    if status != 202 {
        return Err(format!("pushing: {status} {answer}"));
    }
    let id = crate::bench::json_string(&answer, "/id").ok_or("no push id")?;
    let (status, answer, _) = http(
        port,
        "GET",
        &format!("/v1/pushes/{id}?wait=30"),
        &admin,
        None,
    )?;
    let done = status == 200
        && crate::bench::json_string(&answer, "/state").as_deref() == Some("done")
        && answer.contains(r#""accepted":2"#)
        && answer.contains(r#""NotRegistered":1"#);
    if done {
        Ok(())
    } else {
        Err(format!(
            "the push did not end as it should: {status} {answer}"
        ))
    }
}

/// Purges the package if it is installed.
fn purge() -> Result<(), String> {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "c2dm"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("installed"));
    if installed {
        eprintln!("== deb: dpkg --purge c2dm");
        output("dpkg --purge", as_root("dpkg").args(["--purge", "c2dm"]))?;
    }
    Ok(())
}

/// After a purge: no file of the package's, no state, no user.
fn nothing_left() -> Result<(), String> {
    for path in
        INSTALLED
            .iter()
            .copied()
            .chain(["/etc/c2dm", "/var/lib/c2dm", "/etc/c2dm/password"])
    {
        if Path::new(path).exists() {
            return Err(format!("the purge left {path}"));
        }
    }
    if Command::new("getent")
        .args(["passwd", "c2dm"])
        .output()
        .is_ok_and(|out| out.status.success())
    {
        return Err("the purge left the user c2dm".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Unit;

    #[test]
    fn the_shipped_unit_runs_serve_from_its_configuration_as_its_user() {
        let text = include_str!("../../c2dm-cli/debian/c2dm.service");
        let unit = Unit::parse(text).unwrap();
        assert_eq!(
            unit,
            Unit {
                exec_start: ["/usr/bin/c2dm", "serve", "--config", "/etc/c2dm/c2dm.toml"]
                    .map(String::from)
                    .to_vec(),
                user: "c2dm".into(),
                state_directory: "c2dm".into(),
            }
        );
        for hardening in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(text.contains(hardening), "{hardening}");
        }
        // The shipped configuration keeps its SQLite file in the unit's state directory, and
        // its keys where the postinst makes them.
        let config = include_str!("../../c2dm-cli/debian/c2dm.toml");
        for line in [
            "database = \"sqlite:///var/lib/c2dm/c2dm.db\"",
            "admin-token-file = \"/etc/c2dm/admin-token\"",
            "device-key-file = \"/etc/c2dm/device-key\"",
        ] {
            assert!(config.contains(line), "{line}");
        }
    }
}
