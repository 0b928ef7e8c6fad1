//! `c2dm`: send Android push notifications through C2DM, or run a local stand-in for it.
//!
//! The program is this library's [`run`], called by a `main` of one line: a library can be
//! compiled while the crates it depends on are still in code generation (Cargo starts it on
//! their metadata), where a binary waits for them to finish. It is not an API to build on;
//! the crates `c2dm-core`, `c2dm-hyper` and `c2dm-server` are.

mod args;
mod broadcast;
mod client;
mod demo;
mod error;
mod journal;
mod login;
mod send;
mod serve;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
use error::CliError;

fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => {
            "warn,c2dm_core=debug,c2dm_auth=debug,c2dm_hyper=debug,c2dm_emulator=info,c2dm=debug"
        }
        (false, _) => "trace",
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `target=level` directives, comma-separated, and a bare level for the rest (a `Targets`
    // filter: EnvFilter's span and field directives would bring a regex engine into the build).
    let filter: tracing_subscriber::filter::Targets = std::env::var("C2DM_LOG")
        .ok()
        .and_then(|directives| directives.parse().ok())
        .unwrap_or_else(|| default.parse().unwrap_or_default());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}

/// The `c2dm` command: parses the command line, runs the command on a multi-threaded tokio
/// runtime, and answers its exit code (errors printed to stderr).
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.global.verbose, cli.global.quiet);
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
        super::Cli::command().debug_assert();
    }

    #[test]
    fn the_options_never_show_the_token() {
        let cli = super::Cli::try_parse_from([
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
}
