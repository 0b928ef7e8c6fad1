//! The ClientLogin wire format, as pure functions.

use std::fmt;

use bytes::Bytes;
use c2dm_core::{AuthToken, TransportError};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode, Uri};

use crate::credentials::Credentials;

/// Google's ClientLogin endpoint, the default.
pub const DEFAULT_LOGIN_URL: &str = "https://www.google.com/accounts/ClientLogin";

/// Where a locked account can be unlocked by hand.
pub const UNLOCK_CAPTCHA_URL: &str = "https://www.google.com/accounts/DisplayUnlockCaptcha";

/// The default login endpoint as a [`Uri`].
pub fn default_login_uri() -> Uri {
    Uri::from_static(DEFAULT_LOGIN_URL)
}

/// A CAPTCHA the service asks a person to solve before it lets the account log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptchaChallenge {
    /// The `CaptchaToken` to send back with the answer.
    pub token: String,
    /// The absolute URL of the CAPTCHA image.
    pub image_url: String,
}

impl CaptchaChallenge {
    /// The answer to this challenge, to give to the next login.
    pub fn answer(&self, answer: impl Into<String>) -> CaptchaAnswer {
        CaptchaAnswer {
            token: self.token.clone(),
            answer: answer.into(),
        }
    }
}

/// A person's answer to a [`CaptchaChallenge`] (`logintoken` and `logincaptcha`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptchaAnswer {
    /// The challenge's token.
    pub token: String,
    /// What the person read in the image.
    pub answer: String,
}

/// The `Error=` codes of ClientLogin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LoginErrorCode {
    /// Wrong email or password.
    BadAuthentication,
    /// The account's email address is not verified.
    NotVerified,
    /// The account has not accepted the terms of service.
    TermsNotAgreed,
    /// A CAPTCHA must be answered.
    CaptchaRequired,
    /// The request was malformed.
    Unknown,
    /// The account was deleted.
    AccountDeleted,
    /// The account is disabled.
    AccountDisabled,
    /// The account may not use the service.
    ServiceDisabled,
    /// The service is unavailable: try again later.
    ServiceUnavailable,
    /// A code not listed here, kept as written.
    Other(String),
}

impl LoginErrorCode {
    /// Reads a code as ClientLogin writes it.
    pub fn parse(code: &str) -> Self {
        match code {
            "BadAuthentication" => Self::BadAuthentication,
            "NotVerified" => Self::NotVerified,
            "TermsNotAgreed" => Self::TermsNotAgreed,
            "CaptchaRequired" => Self::CaptchaRequired,
            "Unknown" => Self::Unknown,
            "AccountDeleted" => Self::AccountDeleted,
            "AccountDisabled" => Self::AccountDisabled,
            "ServiceDisabled" => Self::ServiceDisabled,
            "ServiceUnavailable" => Self::ServiceUnavailable,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The code as ClientLogin writes it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::BadAuthentication => "BadAuthentication",
            Self::NotVerified => "NotVerified",
            Self::TermsNotAgreed => "TermsNotAgreed",
            Self::CaptchaRequired => "CaptchaRequired",
            Self::Unknown => "Unknown",
            Self::AccountDeleted => "AccountDeleted",
            Self::AccountDisabled => "AccountDisabled",
            Self::ServiceDisabled => "ServiceDisabled",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::Other(code) => code,
        }
    }

    /// Every code the protocol documents.
    pub const KNOWN: [LoginErrorCode; 9] = [
        Self::BadAuthentication,
        Self::NotVerified,
        Self::TermsNotAgreed,
        Self::CaptchaRequired,
        Self::Unknown,
        Self::AccountDeleted,
        Self::AccountDisabled,
        Self::ServiceDisabled,
        Self::ServiceUnavailable,
    ];
}

impl fmt::Display for LoginErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a login failed. Never holds the password or a token.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    /// ClientLogin answered `Error=<code>`.
    #[error("ClientLogin refused the login: {code}{}", Hint(self))]
    Refused {
        /// The error code.
        code: LoginErrorCode,
        /// The `Url=` line: a page describing the error.
        url: Option<String>,
        /// The `Info=` line, e.g. `InvalidSecondFactor`.
        info: Option<String>,
        /// For `CaptchaRequired`: the challenge to answer.
        captcha: Option<CaptchaChallenge>,
    },
    /// An answer that is not ClientLogin's: no `Auth` on success, HTML, an empty body, an
    /// unexpected status.
    #[error("malformed ClientLogin answer (HTTP {status}): {detail}")]
    Malformed {
        /// The HTTP status.
        status: u16,
        /// What was wrong (never the body of a 200, which holds secrets).
        detail: String,
    },
    /// The HTTP exchange did not complete.
    #[error("ClientLogin request failed: {0}")]
    Transport(#[from] TransportError),
}

struct Hint<'a>(&'a LoginError);

impl fmt::Display for Hint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let LoginError::Refused {
            code, info, url, ..
        } = self.0
        else {
            return Ok(());
        };
        if let Some(info) = info {
            write!(f, " ({info})")?;
        }
        match (code, info.as_deref()) {
            (LoginErrorCode::BadAuthentication, Some("InvalidSecondFactor")) => f.write_str(
                ": the account uses 2-step verification; use an application-specific password",
            )?,
            (LoginErrorCode::BadAuthentication, _) => f.write_str(": wrong email or password")?,
            (LoginErrorCode::CaptchaRequired, _) => write!(
                f,
                ": answer the CAPTCHA, or unlock the account at {UNLOCK_CAPTCHA_URL}"
            )?,
            (LoginErrorCode::ServiceUnavailable, _) => f.write_str(": try again later")?,
            _ => {}
        }
        if let Some(url) = url {
            write!(f, " [{url}]")?;
        }
        Ok(())
    }
}

impl LoginError {
    /// The ClientLogin error code, if the service answered with one.
    pub fn code(&self) -> Option<&LoginErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The CAPTCHA to answer, for `CaptchaRequired`.
    pub fn captcha(&self) -> Option<&CaptchaChallenge> {
        match self {
            Self::Refused { captcha, .. } => captcha.as_ref(),
            _ => None,
        }
    }

    /// Whether logging in again later may succeed: `ServiceUnavailable`, server errors and
    /// transient transport failures. Bad credentials, a refused certificate and the like are
    /// final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { code, .. } => *code == LoginErrorCode::ServiceUnavailable,
            Self::Malformed { status, .. } => *status >= 500,
            Self::Transport(err) => err.is_retryable(),
        }
    }
}

/// Encodes the ClientLogin request for `credentials`, with a CAPTCHA answer when given.
///
/// ```
/// use c2dm_auth::{Credentials, codec};
/// let credentials = Credentials::new("sender@gmail.com", "p&ss", "shop-app-1");
/// let request = codec::encode_login_request(&credentials, None, &codec::default_login_uri());
/// assert_eq!(
///     request.body().as_ref(),
///     b"accountType=HOSTED_OR_GOOGLE&Email=sender%40gmail.com&Passwd=p%26ss&service=ac2dm&source=shop-app-1"
/// );
/// ```
pub fn encode_login_request(
    credentials: &Credentials,
    captcha: Option<&CaptchaAnswer>,
    endpoint: &Uri,
) -> Request<Bytes> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("accountType", credentials.account_type().as_str())
        .append_pair("Email", credentials.email())
        .append_pair("Passwd", credentials.password().expose_secret())
        .append_pair("service", credentials.service())
        .append_pair("source", credentials.source());
    if let Some(answer) = captcha {
        form.append_pair("logintoken", &answer.token)
            .append_pair("logincaptcha", &answer.answer);
    }
    let body = Bytes::from(form.finish());
    let length = HeaderValue::from(body.len());
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = endpoint.clone();
    let headers = request.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(CONTENT_LENGTH, length);
    request
}

/// Decodes a ClientLogin answer: the `Auth` token (found by key, not line number), or a typed
/// error. Never panics, whatever the bytes. `endpoint` resolves a relative `CaptchaUrl`.
///
/// ```
/// use c2dm_auth::codec::{self, LoginErrorCode};
/// let ok = codec::decode_login_response(
///     http::StatusCode::OK,
///     b"SID=s\nLSID=l\nAuth=DQAAAGgA\n",
///     &codec::default_login_uri(),
/// );
/// assert_eq!(ok.unwrap().expose_secret(), "DQAAAGgA");
///
/// let captcha = codec::decode_login_response(
///     http::StatusCode::FORBIDDEN,
///     b"Url=http://www.google.com/login/captcha\nError=CaptchaRequired\nCaptchaToken=DQAA\nCaptchaUrl=Captcha?ctoken=Hi\n",
///     &codec::default_login_uri(),
/// )
/// .unwrap_err();
/// assert_eq!(captcha.code(), Some(&LoginErrorCode::CaptchaRequired));
/// assert_eq!(
///     captcha.captcha().unwrap().image_url,
///     "https://www.google.com/accounts/Captcha?ctoken=Hi"
/// );
/// ```
pub fn decode_login_response(
    status: StatusCode,
    body: &[u8],
    endpoint: &Uri,
) -> Result<AuthToken, LoginError> {
    let malformed = |detail: &str| LoginError::Malformed {
        status: status.as_u16(),
        detail: detail.to_owned(),
    };
    let text = std::str::from_utf8(body).map_err(|_| malformed("the body is not UTF-8"))?;
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    if status == StatusCode::OK {
        let auth = field("Auth").ok_or_else(|| malformed("no Auth line in a successful answer"))?;
        return AuthToken::new(auth).map_err(|_| malformed("the Auth value is not a usable token"));
    }
    let Some(code) = field("Error").filter(|c| !c.is_empty()) else {
        return Err(if text.trim().is_empty() {
            malformed("empty body")
        } else {
            malformed(&format!(
                "no Error line: {:?}",
                text.chars().take(120).collect::<String>()
            ))
        });
    };
    let code = LoginErrorCode::parse(&code);
    let captcha = match (&code, field("CaptchaToken"), field("CaptchaUrl")) {
        (LoginErrorCode::CaptchaRequired, Some(token), Some(url)) => Some(CaptchaChallenge {
            token,
            image_url: resolve(endpoint, &url),
        }),
        (LoginErrorCode::CaptchaRequired, _, _) => {
            return Err(malformed(
                "CaptchaRequired without CaptchaToken and CaptchaUrl",
            ));
        }
        _ => None,
    };
    Err(LoginError::Refused {
        code,
        url: field("Url"),
        info: field("Info"),
        captcha,
    })
}

/// Resolves a relative URL against the endpoint's folder (for Google:
/// `https://www.google.com/accounts/`).
fn resolve(endpoint: &Uri, url: &str) -> String {
    if url.starts_with("http://") || url.starts_with("https://") {
        return url.to_owned();
    }
    let path = endpoint.path();
    let folder = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let scheme = endpoint.scheme_str().unwrap_or("https");
    let authority = endpoint.authority().map_or("", |a| a.as_str());
    match url.strip_prefix('/') {
        Some(absolute_path) => format!("{scheme}://{authority}/{absolute_path}"),
        None => format!("{scheme}://{authority}{folder}{url}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(status: u16, body: &str) -> Result<AuthToken, LoginError> {
        decode_login_response(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            &default_login_uri(),
        )
    }

    #[test]
    fn request_with_captcha_answer() {
        let c =
            Credentials::new("a@b.c", "pw", "src").with_account_type(crate::AccountType::Google);
        let answer = CaptchaAnswer {
            token: "T/+".into(),
            answer: "two words".into(),
        };
        let req = encode_login_request(&c, Some(&answer), &default_login_uri());
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), DEFAULT_LOGIN_URL);
        assert_eq!(
            req.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        assert_eq!(
            std::str::from_utf8(req.body()).unwrap(),
            "accountType=GOOGLE&Email=a%40b.c&Passwd=pw&service=ac2dm&source=src&logintoken=T%2F%2B&logincaptcha=two+words"
        );
    }

    #[test]
    fn auth_is_found_by_key_in_any_order() {
        for body in [
            "SID=1\nLSID=2\nAuth=tok\n",
            "Auth=tok",
            "\r\nLSID=2\r\nAuth=tok\r\nSID=1\r\n",
        ] {
            assert_eq!(
                decode(200, body).unwrap().expose_secret(),
                "tok",
                "{body:?}"
            );
        }
    }

    #[test]
    fn malformed_answers_are_typed() {
        for (status, body) in [
            (200, "SID=1\nLSID=2\n"),
            (200, ""),
            (200, "<html>hello</html>"),
            (200, "Auth=has space"),
            (403, ""),
            (403, "<html>Forbidden</html>"),
            (500, "oops"),
            (403, "Error=CaptchaRequired\n"),
        ] {
            assert!(
                matches!(decode(status, body), Err(LoginError::Malformed { .. })),
                "{status} {body:?}"
            );
        }
        assert!(decode(500, "").unwrap_err().is_retryable());
        assert!(!decode(403, "").unwrap_err().is_retryable());
        let err = decode_login_response(StatusCode::OK, &[0xff, 0xfe], &default_login_uri());
        assert!(matches!(err, Err(LoginError::Malformed { .. })));
    }

    #[test]
    fn malformed_success_never_shows_the_body() {
        let err = decode(200, "SID=secret-sid\nLSID=secret-lsid\n").unwrap_err();
        assert!(!format!("{err} {err:?}").contains("secret"));
    }

    #[test]
    fn every_error_code_is_typed() {
        for code in LoginErrorCode::KNOWN {
            let body = if code == LoginErrorCode::CaptchaRequired {
                format!("Error={code}\nCaptchaToken=t\nCaptchaUrl=Captcha?x")
            } else {
                format!("Url=https://example.com/e\nError={code}\n")
            };
            let err = decode(403, &body).unwrap_err();
            assert_eq!(err.code(), Some(&code));
            assert_eq!(
                err.is_retryable(),
                code == LoginErrorCode::ServiceUnavailable,
                "{code}"
            );
            assert_eq!(code.as_str(), code.to_string());
        }
        let err = decode(403, "Error=Brand_New").unwrap_err();
        assert_eq!(err.code(), Some(&LoginErrorCode::Other("Brand_New".into())));
    }

    #[test]
    fn transport_failures_are_retried_only_when_transient() {
        use c2dm_core::{RequestSent, TransportErrorKind};
        let tls = LoginError::Transport(TransportError::new(
            TransportErrorKind::Tls,
            RequestSent::No,
        ));
        assert!(!tls.is_retryable());
        let refused = LoginError::Transport(TransportError::new(
            TransportErrorKind::Connect,
            RequestSent::No,
        ));
        assert!(refused.is_retryable());
    }

    #[test]
    fn bad_authentication_hints() {
        let err = decode(
            403,
            "Url=https://www.google.com/login/error\nError=BadAuthentication\nInfo=InvalidSecondFactor\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("application-specific password"), "{text}");
        assert!(text.contains("InvalidSecondFactor"));
        let LoginError::Refused { url, info, .. } = &err else {
            panic!()
        };
        assert_eq!(url.as_deref(), Some("https://www.google.com/login/error"));
        assert_eq!(info.as_deref(), Some("InvalidSecondFactor"));
        let plain = decode(403, "Error=BadAuthentication").unwrap_err();
        assert!(plain.to_string().contains("wrong email or password"));
    }

    #[test]
    fn captcha_urls_resolve_against_the_endpoint() {
        let google = default_login_uri();
        assert_eq!(
            resolve(&google, "Captcha?c=1"),
            "https://www.google.com/accounts/Captcha?c=1"
        );
        assert_eq!(resolve(&google, "/x/y"), "https://www.google.com/x/y");
        assert_eq!(resolve(&google, "http://e/x"), "http://e/x");
        let local = Uri::from_static("http://127.0.0.1:8080/accounts/ClientLogin");
        assert_eq!(
            resolve(&local, "Captcha?c=1"),
            "http://127.0.0.1:8080/accounts/Captcha?c=1"
        );
        let err = decode(
            403,
            "Error=CaptchaRequired\nCaptchaToken=DQ\nCaptchaUrl=Captcha?ctoken=Hi",
        )
        .unwrap_err();
        let challenge = err.captcha().unwrap();
        assert_eq!(challenge.token, "DQ");
        assert_eq!(challenge.answer("abc").token, "DQ");
        assert!(err.to_string().contains("DisplayUnlockCaptcha"));
    }
}
