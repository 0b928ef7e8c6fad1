//! `c2dm serve --config FILE`: settings from a TOML file, under the environment and the
//! options. The file is read with figment; each of its keys is an option's long name, and its
//! value goes to that option only where neither the command line nor the option's
//! environment variable gave one (clap says which gave each value). The result is parsed
//! again as a command line, so a file's value is checked exactly as the option's would be.
//! `--print-config` prints what is in effect, where each value came from, secrets redacted.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};
use figment::Figment;
use figment::providers::{Format, Toml};

use crate::args::Cli;

/// One value of the file: TOML's scalars.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum Setting {
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(String),
}

/// Options a file may not set: how the file is read, and secrets that are only given
/// themselves on the command line (a file names secrets by their files' paths).
const NOT_IN_FILE: [&str; 8] = [
    "config",
    "print-config",
    "help",
    "version",
    "token",
    "verbose",
    "quiet",
    "json",
];

/// Options whose values are never printed as they are.
const SECRET: [&str; 2] = ["token", "proxy"];

/// Why the command line and the file do not make a command.
#[derive(Debug)]
pub enum ConfigError {
    /// The command line itself (clap's error, printed as clap prints it).
    Cli(clap::Error),
    /// The file: unreadable, not TOML, an unknown key, or a value its option refuses.
    File(String),
}

/// The command line, with `serve --config FILE`'s settings beneath it. `Ok(None)` when
/// `--print-config` printed the settings: nothing more is to be done.
pub fn parse(args: Vec<OsString>) -> Result<Option<Cli>, ConfigError> {
    let matches = Cli::command()
        .try_get_matches_from(&args)
        .map_err(ConfigError::Cli)?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Cli::from_arg_matches(&matches)
            .map(Some)
            .map_err(ConfigError::Cli);
    };
    let mut args = args;
    let mut from_file = BTreeSet::new();
    if let Some(path) = serve.get_one::<std::path::PathBuf>("config") {
        let (options, keys) = file_options(path, serve)?;
        args.extend(options);
        from_file = keys;
    }
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(&args).map_err(|e| {
        // Clap's first line, which names the option; the file may have given its value.
        let rendered = e.to_string();
        let first = rendered.lines().next().unwrap_or_default();
        let reason = first.strip_prefix("error: ").unwrap_or(first);
        ConfigError::File(format!("{reason} (from the options and the --config file)"))
    })?;
    let cli = Cli::from_arg_matches(&matches).map_err(ConfigError::Cli)?;
    if let Some(("serve", serve)) = matches.subcommand()
        && serve.get_flag("print_config")
    {
        command.build();
        let serve_command = command
            .find_subcommand("serve")
            .expect("serve is a command");
        print!("{}", effective(serve_command, serve, &from_file));
        return Ok(None);
    }
    Ok(Some(cli))
}

/// The options `path` adds to the command line: one for each of its keys that neither an
/// option nor an environment variable set.
fn file_options(
    path: &Path,
    given: &clap::ArgMatches,
) -> Result<(Vec<OsString>, BTreeSet<String>), ConfigError> {
    let shown = path.display();
    let settings: BTreeMap<String, Setting> = Figment::from(Toml::file_exact(path))
        .extract()
        .map_err(|e| ConfigError::File(format!("--config {shown}: {e}")))?;
    let mut command = Cli::command();
    command.build();
    let serve = command
        .find_subcommand("serve")
        .expect("serve is a command");
    let mut options = Vec::new();
    let mut keys = BTreeSet::new();
    for (key, value) in settings {
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| {
                ConfigError::File(format!(
                    "--config {shown}: `{key}` is not a setting of c2dm serve (keys are its options' long names{})",
                    if key == "token" {
                        "; the C2DM token is given by C2DM_AUTH_TOKEN or --token, or an account's password by password-file"
                    } else {
                        ""
                    }
                ))
            })?;
        let id = arg.get_id().as_str();
        if matches!(
            given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        keys.insert(key.clone());
        let flag = matches!(arg.get_action(), ArgAction::SetTrue);
        match (flag, value) {
            (true, Setting::Bool(true)) => options.push(format!("--{key}").into()),
            (true, Setting::Bool(false)) => {}
            (true, _) => {
                return Err(ConfigError::File(format!(
                    "--config {shown}: `{key}` is true or false"
                )));
            }
            (false, Setting::Bool(_)) => {
                return Err(ConfigError::File(format!(
                    "--config {shown}: `{key}` takes a value, not true or false"
                )));
            }
            (false, Setting::Integer(n)) => options.push(format!("--{key}={n}").into()),
            (false, Setting::Float(x)) => options.push(format!("--{key}={x}").into()),
            (false, Setting::Text(text)) => options.push(format!("--{key}={text}").into()),
        }
    }
    Ok((options, keys))
}

/// The settings in effect as TOML, each with where it came from; secrets redacted.
fn effective(
    serve: &clap::Command,
    matches: &clap::ArgMatches,
    from_file: &BTreeSet<String>,
) -> String {
    let mut out = String::from("# c2dm serve: the settings in effect\n");
    for arg in serve.get_arguments() {
        let Some(key) = arg.get_long() else { continue };
        if NOT_IN_FILE.contains(&key) {
            continue;
        }
        let id = arg.get_id().as_str();
        let from = match matches.value_source(id) {
            Some(ValueSource::CommandLine) if from_file.contains(key) => "--config file",
            Some(ValueSource::CommandLine) => "option",
            Some(ValueSource::EnvVariable) => "environment",
            Some(ValueSource::DefaultValue) => "default",
            _ => {
                out.push_str(&format!("# {key}: not set\n"));
                continue;
            }
        };
        let Some(raw) = matches.get_raw(id).and_then(|mut values| values.next()) else {
            continue;
        };
        let text = raw.to_string_lossy();
        let value = if SECRET.contains(&key) {
            "<redacted>".to_owned()
        } else if key == "database" {
            c2dm_server::serve::redacted_url(&text)
        } else {
            text.into_owned()
        };
        // Flags and numbers bare, the rest as TOML strings.
        let bare = matches!(arg.get_action(), ArgAction::SetTrue) || value.parse::<f64>().is_ok();
        let value = if bare { value } else { format!("{value:?}") };
        out.push_str(&format!("{key} = {value}  # {from}\n"));
    }
    out
}
