//! `c2dm serve`: the application server, until SIGTERM or Ctrl-C.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use c2dm_server::api::{Key, Keys};
use c2dm_server::jobs::WorkerOptions;
use c2dm_server::listen::HttpLimits;
use c2dm_server::serve::{ServeError, ServeOptions, serve};
use c2dm_server::telemetry::MeteredTransport;

use crate::args::{Global, ServeArgs};
use crate::client;
use crate::error::CliError;

/// A key from `--…-file` (its first line) or the environment; missing or unusable is a usage
/// error, before anything starts.
fn key(flag: &str, file: Option<&Path>, env: &str) -> Result<Key, CliError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("{flag}: cannot read {}: {e}", path.display())))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => std::env::var(env)
            .map_err(|_| CliError::Usage(format!("the server needs {flag} FILE or {env}")))?,
    };
    Key::new(text).map_err(|e| CliError::Usage(format!("{flag} ({env}): {e}")))
}

/// `c2dm serve`.
pub async fn run(global: &Global, args: ServeArgs) -> Result<ExitCode, CliError> {
    let no_api = args.no_api;
    let api = if args.no_api {
        None
    } else {
        let keys = Keys::new(
            key(
                "--admin-token-file",
                args.admin_token_file.as_deref(),
                "C2DM_SERVER_ADMIN_TOKEN",
            )?,
            key(
                "--device-key-file",
                args.device_key_file.as_deref(),
                "C2DM_SERVER_DEVICE_KEY",
            )?,
        )
        .map_err(|e| CliError::Usage(e.to_string()))?;
        Some((args.listen, keys))
    };
    let workers = (!args.no_workers).then_some(WorkerOptions {
        workers: args.workers as usize,
        concurrency: args.concurrency as usize,
        batch_size: args.batch_size as usize,
        account: args
            .account
            .clone()
            .or_else(|| global.email.clone())
            .unwrap_or_else(|| "default".to_owned()),
        daily_budget: (!args.no_daily_budget).then_some(args.daily_budget),
        budget_period: std::time::Duration::from_secs(args.budget_period),
        heartbeat: std::time::Duration::from_secs_f64(args.heartbeat),
    });
    // Before anything starts: a value the workers cannot add is a usage error.
    if let Some(options) = &workers {
        options
            .check()
            .map_err(|e| CliError::Usage(format!("serve: {e}")))?;
    }
    // Every batch of this process may send its `--concurrency` at once.
    let sends_at_once = (args.workers as usize).saturating_mul(args.concurrency as usize);
    // With --fcm, the devices registered for FCM are sent to through it; C2DM's credentials
    // may then be left out, for a server of FCM's devices only.
    // Each exchange with a provider is timed for `c2dm_send_duration_seconds`.
    let fcm = client::fcm_sender_over(global, None, sends_at_once, |transport| {
        MeteredTransport::new(transport, "fcm")
    })?;
    let c2dm = if fcm.is_some() && !client::has_c2dm_credentials(global)? {
        None
    } else {
        Some(client::sender_over(
            global,
            None,
            sends_at_once,
            |transport| MeteredTransport::new(transport, "c2dm"),
        )?)
    };
    let sender = c2dm_server::jobs::Senders { c2dm, fcm };
    let shutdown_timeout = Duration::from_secs_f64(args.shutdown_timeout);
    let options = ServeOptions {
        database: args.database,
        api,
        port_file: args.port_file,
        workers,
        metrics: args.metrics_listen,
        http: HttpLimits {
            header_timeout: Duration::from_secs_f64(args.header_timeout),
            idle_timeout: Duration::from_secs_f64(args.idle_timeout),
            max_connections: args.max_connections as usize,
            shutdown_grace: shutdown_timeout,
        },
    };
    let shutdown = async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        next_signal(&mut terminate).await;
        eprintln!(
            "c2dm serve: stopping: finishing the requests and the batches in hand, for at most {} s (SIGTERM or Ctrl-C again to stop at once)",
            shutdown_timeout.as_secs_f64()
        );
        // As if the process died, either way: a batch in hand is taken over by another worker
        // once its heartbeat is missed, and its marks say which devices may have been sent to.
        tokio::spawn(async move {
            tokio::select! {
                () = next_signal(&mut terminate) => {
                    eprintln!("c2dm serve: stopped at once; batches in hand are left to other workers");
                    std::process::exit(130);
                }
                () = tokio::time::sleep(shutdown_timeout) => {
                    eprintln!(
                        "c2dm serve: the stop took longer than --shutdown-timeout: stopped at once; batches in hand are left to other workers"
                    );
                    std::process::exit(1);
                }
            }
        });
    };
    let on_listening = move |address| {
        if no_api {
            println!("c2dm serve: metrics and health on http://{address}");
        } else {
            println!("c2dm serve: API on http://{address}");
        }
    };
    match serve(options, sender, on_listening, shutdown).await {
        Ok(()) => {
            eprintln!("c2dm serve: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(err @ ServeError::UnsupportedDatabase) => Err(CliError::Usage(err.to_string())),
        Err(err) => Err(CliError::Failure(err.to_string())),
    }
}

/// The next SIGTERM (if it can be listened for) or Ctrl-C.
async fn next_signal(terminate: &mut Option<tokio::signal::unix::Signal>) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
