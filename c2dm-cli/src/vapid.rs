//! `c2dm vapid`: Web Push's VAPID key pair, made or read.

use std::io::Write;
use std::process::ExitCode;

use c2dm_webpush::VapidKey;

use crate::args::VapidCommand;
use crate::error::CliError;

/// `c2dm vapid new` and `c2dm vapid public-key`.
pub fn run(command: VapidCommand) -> Result<ExitCode, CliError> {
    match command {
        VapidCommand::New { out, force } => {
            let key = VapidKey::generate().map_err(|e| CliError::Failure(e.to_string()))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true);
            if force {
                options.create(true).truncate(true);
            } else {
                options.create_new(true);
            }
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&out).map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (it exists: --force replaces it)"
                } else {
                    ""
                };
                CliError::Usage(format!("--out {}: {e}{hint}", out.display()))
            })?;
            // A file replaced keeps its mode: make sure it is the owner's only.
            std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .and_then(|()| file.write_all(key.to_pem().as_bytes()))
                .map_err(|e| CliError::Failure(format!("{}: {e}", out.display())))?;
            println!("{}", key.public_key());
            eprintln!(
                "c2dm vapid: the private key is in {} (mode 600); above, the public key, an app's applicationServerKey",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        VapidCommand::PublicKey { key } => {
            let key = VapidKey::from_file(&key).map_err(|e| CliError::Usage(e.to_string()))?;
            println!("{}", key.public_key());
            Ok(ExitCode::SUCCESS)
        }
    }
}
