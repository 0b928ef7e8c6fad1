//! `c2dm`: send Android push notifications through C2DM, or run a local stand-in for it. The
//! program is [`c2dm_cli::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    c2dm_cli::run()
}
