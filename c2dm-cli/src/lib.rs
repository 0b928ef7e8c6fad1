//! `c2dm`: send Android push notifications through C2DM, or run a local stand-in for it.
//!
//! The program is this library's [`run`], called by a `main` of one line: a library can be
//! compiled while the crates it depends on are still in code generation (Cargo starts it on
//! their metadata), where a binary waits for them to finish. It is not an API to build on;
//! the crates `c2dm-core`, `c2dm-hyper` and `c2dm-server` are.

mod args;
mod broadcast;
mod client;
mod config;
mod demo;
mod error;
mod journal;
mod login;
mod send;
mod serve;
mod vapid;

use std::process::ExitCode;

use args::Command;
use error::CliError;

/// The log filter: `C2DM_LOG`, else `RUST_LOG` (`target=level` directives, comma-separated,
/// and a bare level for the rest: a `Targets` filter, since EnvFilter's span and field
/// directives would bring a regex engine into the build), else what -v and -q say. `serve` is
/// a long-running server: by default it says what it does (starts, pushes, pauses, logins,
/// faults, its stop) at INFO; the other commands speak only of trouble.
fn log_filter(verbose: u8, quiet: bool, serving: bool) -> tracing_subscriber::filter::Targets {
    let ours = "c2dm_core,c2dm_auth,c2dm_fcm,c2dm_hyper,c2dm_server,c2dm_cli,c2dm";
    let at = |level: &str| {
        ours.split(',')
            .map(|target| format!(",{target}={level}"))
            .collect::<String>()
    };
    let default = match (quiet, verbose) {
        (true, _) => "error".to_owned(),
        (false, 0) if serving => format!("warn{}", at("info")),
        (false, 0) => "warn".to_owned(),
        (false, 1) => format!("warn{},c2dm_emulator=info", at("debug")),
        (false, _) => "trace".to_owned(),
    };
    ["C2DM_LOG", "RUST_LOG"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
        .and_then(|directives| directives.parse().ok())
        .unwrap_or_else(|| default.parse().unwrap_or_default())
}

/// A text line's fields as tracing-subscriber writes them, less sqlx's `db.statement`: the
/// whole SQL text of a slow statement over many lines. Its `summary` (the first words) and
/// `elapsed` stay, so a slow statement is one line; the JSON format keeps the text, escaped.
struct TextFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for TextFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut line = Line {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut line);
        line.result
    }
}

/// Writes fields `name=value`, space-separated, the message bare.
struct Line<'a, 'w> {
    writer: &'a mut tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl tracing::field::Visit for Line<'_, '_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if self.result.is_err() || field.name() == "db.statement" {
            return;
        }
        let space = if self.first { "" } else { " " };
        self.first = false;
        self.result = match field.name() {
            "message" => write!(self.writer, "{space}{value:?}"),
            name => write!(self.writer, "{space}{name}={value:?}"),
        };
    }
}

fn init_tracing(global: &args::Global, serving: bool) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(global.verbose, global.quiet, serving);
    let layer = match global.log_format {
        args::LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(TextFields)
            .boxed(),
        args::LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .init();
}

/// The `c2dm` command: parses the command line, runs the command on a multi-threaded tokio
/// runtime, and answers its exit code (errors printed to stderr).
pub fn run() -> ExitCode {
    let cli = match config::parse(std::env::args_os().collect()) {
        Ok(Some(cli)) => cli,
        Ok(None) => return ExitCode::SUCCESS,
        Err(config::ConfigError::Cli(err)) => err.exit(),
        Err(config::ConfigError::File(message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&cli.global, matches!(cli.command, Command::Serve(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    // The command runs as a task on the worker threads, not on this one: a broadcast's
    // consumer then shares the workers with the sends instead of being woken across threads.
    let task = runtime.spawn(async move {
        match cli.command {
            Command::Login(args) => login::login(&cli.global, args).await,
            Command::Send(args) => send::send(&cli.global, args).await,
            Command::Broadcast(args) => broadcast::run(&cli.global, args).await,
            Command::Serve(args) => serve::run(&cli.global, args).await,
            Command::Emulator(args) => c2dm_emulator::cli::run(*args)
                .await
                .map(|()| ExitCode::SUCCESS)
                .map_err(|e| CliError::Failure(e.to_string())),
            Command::Demo(args) => demo::run(&cli.global, args).await,
            Command::Vapid(command) => vapid::run(command),
        }
    });
    let result = runtime
        .block_on(task)
        .unwrap_or_else(|e| Err(CliError::Failure(format!("the command failed: {e}"))));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            err.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        crate::args::Cli::command().debug_assert();
    }

    #[test]
    fn the_options_never_show_the_token() {
        let cli = crate::args::Cli::try_parse_from([
            "c2dm",
            "--token",
            "s3cr3t-token",
            "send",
            "--to",
            "d",
            "--collapse-key",
            "k",
        ])
        .unwrap();
        let shown = format!("{cli:?} {cli:#?}");
        assert!(!shown.contains("s3cr3t-token"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    /// What a text line of sqlx's slow statement looks like: one line, its summary and time,
    /// not its SQL.
    #[test]
    fn a_slow_statement_is_one_text_line() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .fmt_fields(crate::TextFields),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                target: "sqlx::query",
                summary = "UPDATE apalis.jobs SET status …",
                db.statement = "\n\nUPDATE apalis.jobs\nSET status = 'Running'\nWHERE id IN (\n  SELECT id\n)\n",
                rows_affected = 1,
                elapsed_secs = 1.5,
                "slow statement: execution time exceeded alert threshold"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("slow statement: execution time exceeded alert threshold summary=\"UPDATE apalis.jobs SET status …\" rows_affected=1 elapsed_secs=1.5"),
            "{text}"
        );
        assert!(!text.contains("Running"), "{text}");
    }
}
