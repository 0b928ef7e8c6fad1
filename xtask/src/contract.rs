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
    std::fs::write(&file, &document).map_err(|e| e.to_string())?;
    crate::run(
        "OpenAPI document",
        "openapi-spec-validator",
        &[&file.display().to_string()],
        &[],
    )?;

    let config = root.join("xtask/contract/schemathesis.toml");
    let url = format!("http://127.0.0.1:{port}/openapi.json");
    examples_cover_every_operation(root, &config, &url, &document)?;
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

/// Runs schemathesis' examples phase alone, with the admin token: every answer to the
/// document's examples must pass every check, and no operation that takes an input (a
/// parameter or a body) may be skipped for want of examples. An operation without inputs has
/// nothing an example could give: schemathesis skips it here, and the other phases call it.
fn examples_cover_every_operation(
    root: &Path,
    config: &Path,
    url: &str,
    document: &str,
) -> Result<(), String> {
    let report = crate::target_dir(root).join("contract").join("examples");
    let _ = std::fs::remove_dir_all(&report);
    crate::run(
        "schemathesis' examples phase",
        "st",
        &[
            "--config-file",
            &config.display().to_string(),
            "run",
            url,
            "--header",
            &format!("Authorization: Bearer {ADMIN}"),
            "--phases",
            "examples",
            "--no-color",
            "--report",
            "ndjson",
            "--report-dir",
            &report.display().to_string(),
        ],
        &[],
    )?;
    let events = std::fs::read_dir(&report)
        .map_err(|e| format!("{}: {e}", report.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "ndjson"))
        .ok_or("schemathesis wrote no ndjson report")?;
    let events = std::fs::read_to_string(&events).map_err(|e| e.to_string())?;
    let document: serde_json::Value = serde_json::from_str(document).map_err(|e| e.to_string())?;
    let skipped = skipped_with_inputs(&events, &document)?;
    if skipped.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the examples phase skipped operations that take inputs (give them examples): {}",
            skipped.join(", ")
        ))
    }
}

/// The operations the examples phase (its ndjson `events`) skipped although `document` gives
/// them a parameter or a body; an error if it ran none, or missed one of the document's.
fn skipped_with_inputs(events: &str, document: &serde_json::Value) -> Result<Vec<String>, String> {
    let mut seen = Vec::new();
    let mut skipped = Vec::new();
    for line in events.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let Some(finished) = event.get("ScenarioFinished") else {
            continue;
        };
        if finished["phase"] != "examples" {
            continue;
        }
        let label = finished["recorder"]["label"]
            .as_str()
            .ok_or("a scenario without its operation")?
            .to_owned();
        if finished["status"] == "skip" {
            let (method, path) = label.split_once(' ').ok_or("a label without a method")?;
            let operation = &document["paths"][path][method.to_lowercase()];
            let has_inputs = operation["parameters"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
                || operation.get("requestBody").is_some();
            if has_inputs {
                skipped.push(label.clone());
            }
        }
        seen.push(label);
    }
    let documented = document["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, item)| item.as_object().map_or(0, |ops| ops.len()))
        .sum::<usize>();
    if seen.len() != documented {
        return Err(format!(
            "the examples phase went through {} operations of the document's {documented}",
            seen.len()
        ));
    }
    Ok(skipped)
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

#[cfg(test)]
mod tests {
    use super::skipped_with_inputs;

    fn finished(label: &str, status: &str) -> String {
        serde_json::json!({"ScenarioFinished": {
            "phase": "examples", "status": status, "recorder": {"label": label}
        }})
        .to_string()
    }

    #[test]
    fn an_operation_with_inputs_may_not_be_skipped_one_without_may() {
        let document = serde_json::json!({"paths": {
            "/healthz": {"get": {"responses": {}}},
            "/v1/pushes": {"post": {"requestBody": {}, "responses": {}}},
            "/v1/pushes/{id}": {"get": {"parameters": [{"name": "id"}], "responses": {}}},
        }});
        let events = [
            finished("GET /healthz", "skip"),
            finished("POST /v1/pushes", "success"),
            finished("GET /v1/pushes/{id}", "skip"),
        ]
        .join("\n");
        assert_eq!(
            skipped_with_inputs(&events, &document).unwrap(),
            ["GET /v1/pushes/{id}"]
        );
        let events = [finished("GET /healthz", "skip")].join("\n");
        assert!(
            skipped_with_inputs(&events, &document).is_err(),
            "two not gone through"
        );
    }
}
