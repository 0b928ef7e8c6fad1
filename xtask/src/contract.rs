//! `cargo xtask contract`: the API's contract checked against a running server.
//!
//! Starts the emulator and a `c2dm serve` on a fresh SQLite file, registers a few devices and
//! sends one push (so that ids to look up exist), then:
//! - validates `/openapi.json` as an OpenAPI 3.1 document (`openapi-spec-validator`);
//! - runs `schemathesis` against it, once with the admin token and once with the device key,
//!   every check on, with a fixed seed: no 5xx, every status, content type, header and body as
//!   documented, schema-valid requests accepted and schema-invalid ones refused (one exception,
//!   said in `xtask/contract/schemathesis.toml`).
//!
//! Both tools come from PyPI (`pip install schemathesis openapi-spec-validator`; `.ci/run`
//! installs them when absent). Loopback only.

use crate::bench_server::{ADMIN, DEVICE, Server, http};
use std::path::Path;

/// Examples per operation and phase: enough to find what the schema lets through, quick
/// enough for CI (about a minute for both keys).
const EXAMPLES: &str = "60";

/// The seed: the same requests on every run of the same schema.
const SEED: &str = "20261130";

pub fn run(root: &Path) -> Result<(), String> {
    for (tool, package) in [
        ("st", "schemathesis"),
        ("openapi-spec-validator", "openapi-spec-validator"),
    ] {
        if !crate::bench::have(tool) {
            return Err(format!(
                "{tool} is not installed: pip install {package} (.ci/run does)"
            ));
        }
    }
    crate::run(
        "build",
        &crate::cargo(),
        &["build", "-p", "c2dm-cli", "-p", "c2dm-emulator"],
        &[],
    )?;
    let bin = crate::target_dir(root).join("debug");
    let dir = std::env::temp_dir().join(format!("c2dm-contract-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = check(root, &bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn check(root: &Path, bin: &Path, dir: &Path) -> Result<(), String> {
    let emulator = crate::bench::Emulator::start(bin, dir, false, false)?;
    let database = format!("sqlite://{}", dir.join("c2dm.db").display());
    let server = Server::start(bin, dir, &database, &emulator.send_url())?;
    let port = server.port();
    seed(port)?;

    let (status, document, _) = http(port, "GET", "/openapi.json", "", None)?;
    if status != 200 {
        return Err(format!("GET /openapi.json answered {status}"));
    }
    let file = dir.join("openapi.json");
    std::fs::write(&file, document).map_err(|e| e.to_string())?;
    crate::run(
        "OpenAPI document",
        "openapi-spec-validator",
        &[&file.display().to_string()],
        &[],
    )?;

    let config = root.join("xtask/contract/schemathesis.toml");
    let url = format!("http://127.0.0.1:{port}/openapi.json");
    for (name, key) in [("admin token", ADMIN), ("device key", DEVICE)] {
        let report = crate::target_dir(root)
            .join("contract")
            .join(name.replace(' ', "-"));
        crate::run(
            &format!("schemathesis with the {name}"),
            "st",
            &[
                "--config-file",
                &config.display().to_string(),
                "run",
                &url,
                "--header",
                &format!("Authorization: Bearer {key}"),
                "--seed",
                SEED,
                "--max-examples",
                EXAMPLES,
                "--no-color",
                "--report",
                "junit",
                "--report-dir",
                &report.display().to_string(),
            ],
            &[],
        )?;
    }
    drop(server);
    drop(emulator);
    eprintln!("== contract: the document validates, and schemathesis found nothing");
    Ok(())
}

/// Devices and a finished push for the fuzzer's requests to find.
fn seed(port: u16) -> Result<(), String> {
    for i in 0..20 {
        let body = format!(
            r#"{{"registration_id": "contract-{i:02}", "user_id": "user-{}", "tags": ["t{}"]}}"#,
            i % 3,
            i % 2
        );
        let (status, answer, _) = http(port, "POST", "/v1/devices", DEVICE, Some(&body))?;
        if status != 201 && status != 200 {
            return Err(format!("registering: {status} {answer}"));
        }
    }
    let (status, answer, _) = http(
        port,
        "POST",
        "/v1/pushes",
        ADMIN,
        Some(r#"{"to": "all", "collapse_key": "contract", "data": {"k": "v"}}"#),
    )?;
    if status != 202 {
        return Err(format!("pushing: {status} {answer}"));
    }
    let id = crate::bench::json_string(&answer, "/id").ok_or("no push id")?;
    let (status, answer, took) = http(
        port,
        "GET",
        &format!("/v1/pushes/{id}?wait=30"),
        ADMIN,
        None,
    )?;
    if status != 200 || crate::bench::json_string(&answer, "/state").as_deref() != Some("done") {
        return Err(format!(
            "the seed push did not finish in {took:?}: {status} {answer}"
        ));
    }
    Ok(())
}
