//! `c2dm send`.

use std::process::ExitCode;

use c2dm_core::{Delivery, Outcome};

use crate::args::{Global, SendArgs};
use crate::client::{fcm_message, fcm_sender, message, sender};
use crate::error::CliError;
use crate::journal::JournalLine;

/// How long `send` tries without `--deadline`: against a server that accepts and never
/// answers, the command ends within two minutes, saying how many attempts it made.
pub const SEND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(100);

/// `c2dm send`: one message; prints its id, or why it was not accepted. With `--json`, the
/// same line a broadcast journal would hold.
pub async fn send(global: &Global, args: SendArgs) -> Result<ExitCode, CliError> {
    let (id, result) = match fcm_sender(global, Some(SEND_DEADLINE), 1)? {
        Some(sender) => {
            let message = fcm_message(&args.message, &args.to)?;
            (message.device().clone(), sender.send(message).await)
        }
        None => {
            let message = message(&args.message, &args.to)?;
            let id = message.registration_id().clone();
            let sender = sender(global, Some(SEND_DEADLINE), 1)?;
            (id, sender.send(message).await)
        }
    };
    let failure_text = result.as_ref().err().map(ToString::to_string);
    let delivery = Delivery::from_result(id, result);
    if global.json {
        println!("{}", JournalLine::of(&delivery).to_json());
    } else {
        match delivery.outcome() {
            Outcome::Accepted { message_id } => println!("{message_id}"),
            Outcome::Rejected { code, remove } => {
                let advice = if *remove {
                    "remove this registration id"
                } else {
                    "keep this registration id"
                };
                println!("rejected: {code} ({advice})");
            }
            _ => eprintln!("error: {}", failure_text.unwrap_or_default()),
        }
    }
    Ok(if delivery.is_accepted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
