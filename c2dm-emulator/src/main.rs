//! `c2dm-emulator`: a local C2DM and ClientLogin service for tests, benchmarks and demos.

use c2dm_emulator::cli::{EmulatorArgs, run};
use clap::Parser;

/// A local stand-in for Google's C2DM send and ClientLogin services.
#[derive(Debug, Parser)]
#[command(name = "c2dm-emulator", version, about)]
struct Cli {
    #[command(flatten)]
    args: EmulatorArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: could not start the runtime: {err}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::from(1)
        }
    }
}
