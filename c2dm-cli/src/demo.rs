//! `c2dm demo`: the whole system on one machine, and a check that nothing was lost.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use c2dm_auth::{ClientLogin, Credentials};
use c2dm_core::{
    BroadcastOptions, Delivery, DeliveryReport, Message, RegistrationId, RetryPolicy, Sender,
};
use c2dm_emulator::fcm::PROJECT_ID;
use c2dm_emulator::{Config, DEFAULT_EMAIL, DEFAULT_PASSWORD, Emulator, FaultRate};
use c2dm_fcm::{Fcm, ServiceAccountKey, ServiceAccountTokens};
use c2dm_hyper::HyperTransport;
use futures::StreamExt;

use crate::args::{DemoArgs, Global};
use crate::broadcast::progress_bar;
use crate::error::CliError;

/// Turns an error into a failure of the demo step `context`.
fn failed<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> CliError + '_ {
    move |e| CliError::Failure(format!("{context}: {e}"))
}

/// The generated devices: about 2% not registered and 1% invalid.
fn device_ids(n: u32) -> Vec<RegistrationId> {
    (0..n)
        .map(|i| {
            let id = if i % 50 == 1 {
                format!("gone-{i:07}")
            } else if i % 100 == 2 {
                format!("bad-{i:07}")
            } else {
                format!("device-{i:07}")
            };
            RegistrationId::new(id).expect("generated ids are valid")
        })
        .collect()
}

/// Checks the broadcast against the emulator's record; returns what does not hold.
fn verify(
    emulator: &Emulator,
    ids: &[RegistrationId],
    deliveries: &HashMap<RegistrationId, Delivery>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if deliveries.len() != ids.len() {
        problems.push(format!(
            "{} deliveries for {} devices",
            deliveries.len(),
            ids.len()
        ));
    }
    let mut missing = 0;
    let mut not_in_inbox = 0;
    let mut duplicated = 0;
    let mut wrongly_removed = 0;
    let mut gone_kept = 0;
    let mut unfinished = 0;
    for id in ids {
        let Some(delivery) = deliveries.get(id) else {
            missing += 1;
            continue;
        };
        let inbox = emulator.inbox(id.as_str());
        if let Some(message_id) = delivery.message_id() {
            let matching = inbox
                .iter()
                .filter(|m| m.message_id == message_id.as_str())
                .count();
            if matching != 1 {
                not_in_inbox += 1;
            }
            if inbox.len() > 1 && delivery.possible_duplicates() == 0 {
                duplicated += 1;
            }
        } else if !inbox.is_empty() && delivery.possible_duplicates() == 0 {
            // Not accepted, yet delivered: only a reported possible duplicate may explain it.
            duplicated += 1;
        }
        match (delivery.should_remove(), emulator.is_gone(id.as_str())) {
            (true, false) => wrongly_removed += 1,
            (false, true) => gone_kept += 1,
            _ => {}
        }
        if !delivery.is_accepted() && !delivery.should_remove() {
            unfinished += 1;
        }
    }
    for (count, what) in [
        (missing, "devices without a delivery"),
        (
            not_in_inbox,
            "accepted messages not in their device's inbox exactly once",
        ),
        (duplicated, "devices with an unreported duplicate"),
        (
            wrongly_removed,
            "ids marked for removal that the service still knows",
        ),
        (gone_kept, "gone ids not marked for removal"),
        (unfinished, "messages neither accepted nor rejected"),
    ] {
        if count > 0 {
            problems.push(format!("{count} {what}"));
        }
    }
    problems
}

/// `c2dm demo`: start the emulator, log in, send one message, broadcast to generated devices
/// under faults, and check every delivery against the emulator's record.
pub async fn run(global: &Global, args: DemoArgs) -> Result<ExitCode, CliError> {
    let emulator = start_emulator(&args).await?;
    let sender = log_in(global, &emulator).await?;
    let (first, sent) = send_one(&sender).await?;
    let ids = device_ids(args.devices);
    let (report, deliveries) = broadcast(&sender, &first, &ids).await?;
    let mut problems = verify(&emulator, &ids, &deliveries);
    if !emulator
        .inbox("device-demo")
        .iter()
        .any(|m| m.message_id == sent.message_id.as_str())
    {
        problems.push("the first message is not in device-demo's inbox".into());
    }
    // The broadcast's figures now, before the server's act, so that neither is read for the
    // other's; the JSON verdict carries them at the end.
    let broadcast_stats = emulator.counters();
    if !global.json {
        print_broadcast(&report, &broadcast_stats);
    }
    let fcm = fcm_sender(global, &emulator)?;
    let (server_problems, server) =
        server_act(&emulator, &sender, fcm, args.server_devices).await?;
    problems.extend(server_problems);
    print_verdict(global, args.devices, &report, &broadcast_stats, &problems);
    if args.keep {
        let lines = format!(
            "kept running until Ctrl-C:\n  console: {}/  (admin token: {})\n  emulator: {}",
            server.base,
            server.admin.expose(),
            emulator.base_url()
        );
        // With --json, standard output holds the verdict alone.
        if global.json {
            eprintln!("{lines}");
        } else {
            println!("{lines}");
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    server.stop().await?;
    emulator.shutdown().await;
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The emulator over TLS, with faults sized to the broadcast: a few 503s with Retry-After, a
/// token rotation or more, and an expiry on the way.
async fn start_emulator(args: &DemoArgs) -> Result<Emulator, CliError> {
    let sends_expected = u64::from(args.devices);
    let config = Config {
        devices: c2dm_emulator::DeviceRules {
            not_registered_prefixes: vec!["gone-".into()],
            invalid_prefixes: vec!["bad-".into()],
            ..Default::default()
        },
        unavailable: FaultRate::Every((sends_expected / 4).max(50)),
        retry_after: Duration::from_secs(args.retry_after_secs),
        rotate_token_every: Some((sends_expected / 3).max(10)),
        token_lifetime_sends: Some((sends_expected * 3 / 5).max(20)),
        seed: 2012,
        ..Config::default()
    };
    let emulator = Emulator::start_tls(config)
        .await
        .map_err(failed("starting the emulator"))?;
    println!(
        "emulator: {} (TLS, trusting only its own certificate)",
        emulator.base_url()
    );
    Ok(emulator)
}

/// A sender over TLS that trusts only the emulator's certificate, logged in through
/// ClientLogin.
async fn log_in(global: &Global, emulator: &Emulator) -> Result<Sender, CliError> {
    let pem = emulator.cert_pem().unwrap_or_default();
    let transport = HyperTransport::builder()
        .only_added_roots()
        .add_root_certificates_pem(pem.as_bytes())
        .and_then(|b| b.build())
        .map_err(failed("TLS setup"))?;
    let url = |text: String, what: &'static str| {
        text.parse::<http::Uri>()
            .map_err(failed::<http::uri::InvalidUri>(what))
    };
    let login = Arc::new(
        ClientLogin::builder(
            Credentials::new(DEFAULT_EMAIL, DEFAULT_PASSWORD, c2dm_auth::DEFAULT_SOURCE),
            transport.clone(),
        )
        .endpoint(url(emulator.login_url(), "login URL")?)
        .build(),
    );
    login.login_now().await.map_err(failed("ClientLogin"))?;
    println!("logged in as {DEFAULT_EMAIL} through ClientLogin");
    Ok(Sender::builder(transport, login)
        .retry_policy(
            RetryPolicy::default()
                .with_initial_backoff(Duration::from_secs_f64(global.initial_backoff)),
        )
        .endpoint(url(emulator.send_url(), "send URL")?)
        .build())
}

/// The emulator's FCM sender: its service account's key file, tokens from its token endpoint,
/// over TLS (HTTP/2) trusting only the emulator's certificate.
fn fcm_sender(global: &Global, emulator: &Emulator) -> Result<Sender<Fcm>, CliError> {
    let pem = emulator.cert_pem().unwrap_or_default();
    let transport = HyperTransport::builder()
        .http2(true)
        .only_added_roots()
        .add_root_certificates_pem(pem.as_bytes())
        .and_then(|b| b.build())
        .map_err(failed("TLS setup"))?;
    let key = ServiceAccountKey::from_json(emulator.fcm_key_file().as_bytes())
        .map_err(failed("the emulator's service-account key"))?;
    let fcm = Fcm::new(key.project_id()).map_err(failed("FCM project"))?;
    let endpoint = emulator
        .fcm_send_url()
        .parse::<http::Uri>()
        .map_err(failed("FCM send URL"))?;
    let tokens = ServiceAccountTokens::new(key, transport.clone());
    Ok(Sender::with_protocol(fcm, transport, tokens)
        .retry_policy(
            RetryPolicy::default()
                .with_initial_backoff(Duration::from_secs_f64(global.initial_backoff)),
        )
        .endpoint(endpoint)
        .build())
}

/// The article's first message, to one device; returns it (the broadcast's template) and
/// what the service said.
async fn send_one(sender: &Sender) -> Result<(Message, c2dm_core::Sent), CliError> {
    let first = Message::builder("device-demo")
        .collapse_key("demo")
        .data("message", "test")
        .data("sound", "test")
        .build()
        .map_err(failed("message"))?;
    let sent = sender
        .send(first.clone())
        .await
        .map_err(failed("sending the first message"))?;
    println!(
        "sent message=test sound=test to device-demo: id {}",
        sent.message_id
    );
    Ok((first, sent))
}

/// Broadcasts `template` to `ids` with a progress bar; every delivery, by device.
async fn broadcast(
    sender: &Sender,
    template: &Message,
    ids: &[RegistrationId],
) -> Result<(DeliveryReport, HashMap<RegistrationId, Delivery>), CliError> {
    println!(
        "broadcasting to {} devices (about 2% not registered, 1% invalid) while the emulator injects 503s, a token rotation and an expiry",
        ids.len()
    );
    let mut stream = sender
        .broadcast_to(
            futures::stream::iter(ids.to_vec()),
            template,
            BroadcastOptions::default(),
        )
        .map_err(failed("broadcast"))?;
    let bar = progress_bar(ids.len() as u64);
    let mut report = DeliveryReport::new();
    let mut deliveries = HashMap::with_capacity(ids.len());
    while let Some(delivery) = stream.next().await {
        report.record(&delivery);
        bar.inc(1);
        deliveries.insert(delivery.registration_id().clone(), delivery);
    }
    bar.finish_and_clear();
    report.finish();
    Ok((report, deliveries))
}

/// The application server's act: `c2dm serve` on a temporary SQLite file, `devices` phones
/// registering over HTTP (one in three for FCM, one in fifty gone), one push to all through
/// each device's provider, and every row checked against the emulator's record of that
/// protocol and every gone device's state. Returns what does not hold.
async fn server_act(
    emulator: &Emulator,
    sender: &Sender,
    fcm: Sender<Fcm>,
    devices: u32,
) -> Result<(Vec<String>, DemoServer), CliError> {
    use c2dm_server::api::{Key, Keys};
    use c2dm_server::serve::{ServeOptions, serve};

    let dir = std::env::temp_dir().join(format!(
        "c2dm-demo-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).map_err(failed("a folder for the server"))?;
    // A fresh admin token each run: `--keep` leaves the server up for anyone on this machine.
    let secret: u128 =
        rand::Rng::random(&mut <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng());
    let admin = AdminToken(format!("demo-{secret:032x}"));
    let keys = Keys::new(
        Key::new(admin.expose()).map_err(failed("key"))?,
        Key::new(DEMO_DEVICE).map_err(failed("key"))?,
    )
    .map_err(failed("keys"))?;
    let options = ServeOptions {
        database: format!("sqlite://{}", dir.join("c2dm.db").display()),
        api: Some(("127.0.0.1:0".parse().expect("a loopback address"), keys)),
        port_file: None,
        workers: Some(c2dm_server::jobs::WorkerOptions::default()),
        metrics: None,
        http: c2dm_server::listen::HttpLimits::default(),
    };
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let senders = c2dm_server::jobs::Senders {
        c2dm: Some(sender.clone()),
        fcm: Some(fcm),
    };
    let server = tokio::spawn(serve(
        options,
        senders,
        move |address| {
            let _ = bound_tx.send(address);
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let base = match bound_rx.await {
        Ok(address) => format!("http://{address}"),
        Err(_) => {
            let err = server.await.map_err(failed("the server"))?.err();
            return Err(CliError::Failure(format!(
                "the application server did not start: {}",
                err.map_or_else(|| "no reason".to_owned(), |e| e.to_string())
            )));
        }
    };
    println!("application server: {base} (SQLite in {})", dir.display());
    let running = DemoServer {
        stop: stop_tx,
        task: server,
        dir,
        base,
        admin,
    };
    match server_checks(emulator, &running.base, running.admin.expose(), devices).await {
        Ok(problems) => Ok((problems, running)),
        Err(err) => {
            running.stop().await?;
            Err(err)
        }
    }
}

/// The demo's admin token: never in `Debug`.
struct AdminToken(String);

impl AdminToken {
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// The server act's server, running until [`DemoServer::stop`].
struct DemoServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), c2dm_server::serve::ServeError>>,
    dir: std::path::PathBuf,
    base: String,
    admin: AdminToken,
}

impl DemoServer {
    /// Stops the server, waits for it, and removes its files.
    async fn stop(self) -> Result<(), CliError> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(failed("the server"))?
            .map_err(failed("the server"))?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

/// How the server act names its FCM devices (after `gone-`, for the gone ones).
const FCM_DEVICE: &str = "fcm-device-";

/// Whether the server act registered `device` for FCM.
fn is_fcm(device: &str) -> bool {
    device.trim_start_matches("gone-").starts_with(FCM_DEVICE)
}

/// The demo server's keys: it listens on loopback only, for the length of the act.
const DEMO_DEVICE: &str = "demo-device-key-0";

/// One exchange with the demo's server.
async fn call(
    http: &HyperTransport,
    base: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), CliError> {
    use c2dm_core::Transport;
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("authorization", format!("Bearer {key}"));
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            bytes::Bytes::from(body.to_string())
        }
        None => bytes::Bytes::new(),
    };
    let request = request.body(body).map_err(failed("a request"))?;
    let response = http
        .execute(request)
        .await
        .map_err(failed("the server's API"))?;
    let value = serde_json::from_slice(response.body()).unwrap_or(serde_json::Value::Null);
    Ok((response.status().as_u16(), value))
}

/// Registers the devices, pushes to all, waits for the push, and checks every row.
async fn server_checks(
    emulator: &Emulator,
    base: &str,
    admin: &str,
    devices: u32,
) -> Result<Vec<String>, CliError> {
    // A page of a thousand rows is over the 64 KiB a C2DM answer may be.
    let http = HyperTransport::builder()
        .max_response_bytes(4 << 20)
        .build()
        .map_err(failed("HTTP client"))?;
    let ids: Vec<String> = (0..devices)
        .map(|i| {
            let gone = if i % 50 == 7 { "gone-" } else { "" };
            let provider = if i % 3 == 1 {
                FCM_DEVICE
            } else {
                "c2dm-device-"
            };
            format!("{gone}{provider}{i:05}")
        })
        .collect();
    println!(
        "{devices} devices register with it over HTTP (one in three for FCM, one in fifty gone), and it pushes to all"
    );
    let bar = progress_bar(u64::from(devices));
    // Sixteen registrations at once, each its own task.
    let mut registrations = tokio::task::JoinSet::new();
    for chunk in ids.chunks(ids.len().div_ceil(16).max(1)) {
        let (http, base, chunk, bar) = (http.clone(), base.to_owned(), chunk.to_vec(), bar.clone());
        registrations.spawn(async move {
            for id in chunk {
                let provider = if is_fcm(&id) { "fcm" } else { "c2dm" };
                let body = serde_json::json!({
                    "registration_id": id, "provider": provider, "tags": ["demo"]
                });
                let (status, answer) =
                    call(&http, &base, "POST", "/v1/devices", DEMO_DEVICE, Some(body)).await?;
                if status != 201 {
                    return Err(CliError::Failure(format!(
                        "registering a device: {status} {answer}"
                    )));
                }
                bar.inc(1);
            }
            Ok::<(), CliError>(())
        });
    }
    while let Some(done) = registrations.join_next().await {
        done.map_err(failed("a registration task"))??;
    }
    bar.finish_and_clear();
    let push = serde_json::json!({
        "to": "all", "collapse_key": "demo", "data": {"message": "from the server"}
    });
    let (status, message) = call(&http, base, "POST", "/v1/pushes", admin, Some(push)).await?;
    if status != 202 {
        return Err(CliError::Failure(format!("the push: {status} {message}")));
    }
    let id = message["id"].as_str().unwrap_or_default().to_owned();
    let status_path = format!("/v1/pushes/{id}?wait=60");
    let (_, message) = call(&http, base, "GET", &status_path, admin, None).await?;
    let rejected = |code: &str| message["counts"]["rejected"][code].as_u64().unwrap_or(0);
    let (c2dm_gone, fcm_gone) = (rejected("NotRegistered"), rejected("UNREGISTERED"));
    println!(
        "push {id}: {}, {} accepted, {} rejected (C2DM's NotRegistered {c2dm_gone}, FCM's UNREGISTERED {fcm_gone})",
        message["state"].as_str().unwrap_or("?"),
        message["counts"]["accepted"],
        c2dm_gone + fcm_gone,
    );
    let mut problems = Vec::new();
    if message["state"] != "done" {
        problems.push(format!(
            "the server's push is {}, not done",
            message["state"]
        ));
    }
    // Every row, against the emulator's inbox and the device's state, by its protocol: FCM
    // names a message `projects/<project>/messages/<id>` and says UNREGISTERED of a gone
    // device, C2DM gives the id alone and says NotRegistered.
    let mut rows = 0usize;
    let mut fcm_accepted = 0u64;
    let mut after = String::new();
    loop {
        let path = format!("/v1/pushes/{id}/deliveries?limit=1000{after}");
        let (_, page) = call(&http, base, "GET", &path, admin, None).await?;
        for row in page["deliveries"].as_array().cloned().unwrap_or_default() {
            rows += 1;
            let device = row["registration_id"].as_str().unwrap_or_default();
            let inbox = emulator.inbox(device);
            let fcm = is_fcm(device);
            let holds = match row["outcome"].as_str() {
                Some("accepted") => {
                    fcm_accepted += u64::from(fcm);
                    inbox.len() == 1
                        && row["message_id"].as_str()
                            == Some(&*if fcm {
                                format!("projects/{PROJECT_ID}/messages/{}", inbox[0].message_id)
                            } else {
                                inbox[0].message_id.clone()
                            })
                }
                Some("rejected") => {
                    let code = if fcm { "UNREGISTERED" } else { "NotRegistered" };
                    device.starts_with("gone-") && inbox.is_empty() && row["error"] == code
                }
                _ => false,
            };
            if !holds {
                problems.push(format!(
                    "the server's row for {device} does not hold: {row}"
                ));
            }
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    if rows != ids.len() {
        problems.push(format!("{rows} server rows for {} devices", ids.len()));
    }
    let fcm_stats = emulator.stats().fcm;
    if fcm_stats.accepted != fcm_accepted {
        problems.push(format!(
            "the emulator accepted {} FCM messages, the server's rows say {fcm_accepted}",
            fcm_stats.accepted
        ));
    }
    let gone_path = "/v1/devices?state=gone&limit=1000";
    let (_, gone) = call(&http, base, "GET", gone_path, admin, None).await?;
    let disabled = gone["devices"].as_array().map_or(0, Vec::len);
    let expected = ids.iter().filter(|id| id.starts_with("gone-")).count();
    if disabled != expected {
        problems.push(format!(
            "{disabled} devices disabled by the server, {expected} gone"
        ));
    }
    Ok(problems)
}

/// Prints the broadcast act's figures and what the emulator saw of it, right after the act.
fn print_broadcast(report: &DeliveryReport, stats: &c2dm_emulator::Stats) {
    println!("{report}");
    println!(
        "emulator saw {} sends: {} accepted, {} answered 503, {} token rotations, {} expiries, {} logins",
        stats.sends,
        stats.accepted,
        stats.unavailable,
        stats.rotations,
        stats.expiries,
        stats.logins
    );
}

/// Prints whether every act was verified: text, or one JSON object with `--json` (with the
/// broadcast's figures, `stats` being the emulator's as the broadcast ended).
fn print_verdict(
    global: &Global,
    devices: u32,
    report: &DeliveryReport,
    stats: &c2dm_emulator::Stats,
    problems: &[String],
) {
    if global.json {
        let verdict = serde_json::json!({
            "devices": devices,
            "accepted": report.accepted(),
            "rejected": report.rejected(),
            "failed": report.failed(),
            "not_attempted": report.not_attempted(),
            "to_remove": report.to_remove().len(),
            "by_code": report.by_code(),
            "elapsed_secs": report.elapsed().as_secs_f64(),
            "rate": report.rate(),
            "emulator": {
                "sends": stats.sends, "accepted": stats.accepted, "unavailable": stats.unavailable,
                "rotations": stats.rotations, "expiries": stats.expiries, "logins": stats.logins,
            },
            "verified": problems.is_empty(),
            "problems": problems,
        });
        println!("{verdict}");
        return;
    }
    if problems.is_empty() {
        println!(
            "verified: every accepted message is in its device's inbox exactly once, every removed id is gone, nothing is missing"
        );
    } else {
        println!("NOT verified:");
        for problem in problems {
            println!("  - {problem}");
        }
    }
}
