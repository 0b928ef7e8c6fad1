//! The command's failures, and the exit codes they earn.

use std::process::ExitCode;

/// A failure, and the exit code it earns.
#[derive(Debug)]
pub enum CliError {
    /// Bad input, found before anything was sent: exit 2.
    Usage(String),
    /// Something failed on the way: exit 1.
    Failure(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(text) | Self::Failure(text) => f.write_str(text),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) => ExitCode::from(2),
            Self::Failure(_) => ExitCode::from(1),
        }
    }
}
