//! `c2dm login`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use c2dm_auth::{CaptchaAnswer, LoginError};

use crate::args::{Global, LoginArgs};
use crate::client::{client_login, credentials, transport};
use crate::error::CliError;

fn print_login_error(err: &LoginError) -> CliError {
    CliError::Failure(err.to_string())
}

/// `c2dm login`.
pub async fn login(global: &Global, args: LoginArgs) -> Result<ExitCode, CliError> {
    let transport = transport(global, 1)?;
    let Some(credentials) = credentials(global)? else {
        return Err(CliError::Usage(
            "login needs --email (or C2DM_EMAIL) and C2DM_PASSWORD or --password-file".into(),
        ));
    };
    let login = client_login(global, credentials, transport, None)?;
    if let (Some(token), Some(answer)) = (args.captcha_token, args.captcha_answer) {
        login.answer_captcha(CaptchaAnswer { token, answer });
    }
    let token = loop {
        match login.login_now().await {
            Ok(token) => break token,
            Err(err) => {
                let Some(challenge) = err.captcha() else {
                    return Err(print_login_error(&err));
                };
                if !std::io::stdin().is_terminal() {
                    return Err(CliError::Failure(format!(
                        "{err}\nCAPTCHA image: {}\nanswer it with --captcha-token {} --captcha-answer ANSWER",
                        challenge.image_url, challenge.token
                    )));
                }
                eprintln!("ClientLogin asks for a CAPTCHA: {}", challenge.image_url);
                eprint!("Type the characters you see: ");
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                std::io::stdin()
                    .read_line(&mut answer)
                    .map_err(|e| CliError::Failure(format!("reading the answer: {e}")))?;
                login.answer_captcha(challenge.answer(answer.trim()));
            }
        }
    };
    if global.json {
        println!("{}", serde_json::json!({ "token": token.expose_secret() }));
    } else {
        println!("{}", token.expose_secret());
    }
    Ok(ExitCode::SUCCESS)
}
