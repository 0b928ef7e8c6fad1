//! The sender account's credentials.

use std::fmt;

/// Which kind of account logs in (`accountType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccountType {
    /// `HOSTED_OR_GOOGLE`: try a hosted (Workspace) account, then a Google account (the default).
    #[default]
    HostedOrGoogle,
    /// `GOOGLE`: a Google account only.
    Google,
    /// `HOSTED`: a hosted account only.
    Hosted,
}

impl AccountType {
    /// The value as ClientLogin expects it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::HostedOrGoogle => "HOSTED_OR_GOOGLE",
            Self::Google => "GOOGLE",
            Self::Hosted => "HOSTED",
        }
    }
}

/// A password. Never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    /// The secret itself, for the login request only.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A required environment variable is missing or not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("missing environment variable{}: {}", if .0.len() == 1 { "" } else { "s" }, .0.join(", "))]
pub struct MissingEnv(pub Vec<&'static str>);

/// The sender account: email, password, account type, service and source.
///
/// ```
/// use c2dm_auth::Credentials;
/// let credentials = Credentials::new("sender@gmail.com", "app-password", "example-shop-1.0");
/// assert_eq!(credentials.service(), "ac2dm");
/// assert!(!format!("{credentials:?}").contains("app-password"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    email: String,
    password: Password,
    account_type: AccountType,
    service: String,
    source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("email", &self.email)
            .field("password", &self.password)
            .field("account_type", &self.account_type)
            .field("service", &self.service)
            .field("source", &self.source)
            .finish()
    }
}

/// The `source` sent when none is given: this crate and its version.
pub const DEFAULT_SOURCE: &str = concat!("c2dm-rs-", env!("CARGO_PKG_VERSION"));

impl Credentials {
    /// Credentials for `email` with `password`; `source` names the app for Google's logs
    /// (`company-app-version`). Account type `HOSTED_OR_GOOGLE`, service `ac2dm`.
    pub fn new(
        email: impl Into<String>,
        password: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        Self {
            email: email.into(),
            password: Password::new(password),
            account_type: AccountType::default(),
            service: "ac2dm".into(),
            source: source.into(),
        }
    }

    /// Reads `C2DM_EMAIL`, `C2DM_PASSWORD` and (optional) `C2DM_SOURCE` from the environment.
    /// The error names every missing variable.
    pub fn from_env() -> Result<Self, MissingEnv> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Credentials::from_env`], with the variables looked up by `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, MissingEnv> {
        let email = lookup("C2DM_EMAIL").filter(|v| !v.is_empty());
        let password = lookup("C2DM_PASSWORD").filter(|v| !v.is_empty());
        match (email, password) {
            (Some(email), Some(password)) => {
                let source = lookup("C2DM_SOURCE")
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| DEFAULT_SOURCE.to_owned());
                Ok(Self::new(email, password, source))
            }
            (email, password) => {
                let mut missing = Vec::new();
                if email.is_none() {
                    missing.push("C2DM_EMAIL");
                }
                if password.is_none() {
                    missing.push("C2DM_PASSWORD");
                }
                Err(MissingEnv(missing))
            }
        }
    }

    /// Sets the account type.
    pub fn with_account_type(mut self, account_type: AccountType) -> Self {
        self.account_type = account_type;
        self
    }

    /// Sets the service (default `ac2dm`).
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = service.into();
        self
    }

    /// The account's email.
    pub fn email(&self) -> &str {
        &self.email
    }

    /// The password.
    pub fn password(&self) -> &Password {
        &self.password
    }

    /// The account type.
    pub fn account_type(&self) -> AccountType {
        self.account_type
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The source.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_lookup_names_what_is_missing() {
        let err = Credentials::from_lookup(|_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing environment variables: C2DM_EMAIL, C2DM_PASSWORD"
        );
        let err =
            Credentials::from_lookup(|n| (n == "C2DM_EMAIL").then(|| "a@b".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing environment variable: C2DM_PASSWORD"
        );
        let ok = Credentials::from_lookup(|n| match n {
            "C2DM_EMAIL" => Some("a@b".into()),
            "C2DM_PASSWORD" => Some("pw".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(ok.source(), DEFAULT_SOURCE);
        assert_eq!(ok.password().expose_secret(), "pw");
    }

    #[test]
    fn password_never_printed() {
        let c = Credentials::new("a@b", "hunter2", "s");
        for text in [
            format!("{c:?}"),
            format!("{c:#?}"),
            c.password().to_string(),
        ] {
            assert!(!text.contains("hunter2"), "{text}");
        }
    }
}
