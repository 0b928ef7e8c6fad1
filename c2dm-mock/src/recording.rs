//! The recording fake: a scripted C2DM and ClientLogin service in memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use c2dm_auth::LoginErrorCode;
use c2dm_auth::server as login_server;
use c2dm_core::codec::{self, SendForm};
use c2dm_core::{AuthToken, ErrorCode, RequestSent, Transport, TransportError, TransportErrorKind};
use http::{HeaderValue, Response, StatusCode};

/// A `Retry-After` value for a scripted 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAfter {
    /// Delta-seconds, e.g. `Retry-After: 30`.
    Seconds(u64),
    /// An HTTP-date, e.g. `Retry-After: Fri, 27 Nov 2026 10:00:00 GMT`.
    Date(SystemTime),
}

/// A scripted answer to a send request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// HTTP 200 `id=<unique id>`.
    Accept,
    /// HTTP 200 `Error=<code>`.
    Error(ErrorCode),
    /// HTTP 401 with an HTML body.
    Unauthorized,
    /// HTTP 503, with or without `Retry-After`.
    Unavailable(Option<RetryAfter>),
    /// Any status and body, e.g. a 500 or a malformed 200.
    Raw {
        /// The HTTP status.
        status: u16,
        /// The body.
        body: String,
    },
    /// The exchange fails with a transport error.
    Fail {
        /// What kind of failure.
        kind: TransportErrorKind,
        /// Whether the request can have reached the server.
        sent: RequestSent,
    },
}

impl Reply {
    /// HTTP 503 with `Retry-After: <seconds>`.
    pub fn unavailable_for(seconds: u64) -> Self {
        Self::Unavailable(Some(RetryAfter::Seconds(seconds)))
    }

    /// HTTP 500.
    pub fn server_error() -> Self {
        Self::Raw {
            status: 500,
            body: "Internal Server Error".into(),
        }
    }

    /// A failure to connect: the request was not sent.
    pub fn connect_failure() -> Self {
        Self::Fail {
            kind: TransportErrorKind::Connect,
            sent: RequestSent::No,
        }
    }

    /// A timeout after the request was written: it may have been delivered.
    pub fn timeout_after_write() -> Self {
        Self::Fail {
            kind: TransportErrorKind::Timeout,
            sent: RequestSent::Maybe,
        }
    }
}

impl From<ErrorCode> for Reply {
    fn from(code: ErrorCode) -> Self {
        Self::Error(code)
    }
}

/// A scripted answer to a ClientLogin request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoginReply {
    /// HTTP 200 with `SID`, `LSID` and a fresh `Auth` token.
    Success,
    /// HTTP 403 with `Error=<code>` and optional `Url` and `Info` lines.
    Error {
        /// The error code, e.g. `BadAuthentication`.
        code: LoginErrorCode,
        /// The optional `Info=` line, e.g. `InvalidSecondFactor`.
        info: Option<String>,
    },
    /// HTTP 403 `Error=CaptchaRequired` with this `CaptchaToken`; a later login answering it
    /// with `logintoken=<token>` and `logincaptcha=<answer>` succeeds.
    Captcha {
        /// The CAPTCHA token handed out.
        token: String,
        /// The answer that unlocks it.
        answer: String,
    },
    /// Any status and body.
    Raw {
        /// The HTTP status.
        status: u16,
        /// The body.
        body: String,
    },
}

impl LoginReply {
    /// HTTP 403 `Error=<code>`.
    pub fn error(code: LoginErrorCode) -> Self {
        Self::Error { code, info: None }
    }
}

/// One send request as the fake received it, decoded back into its fields.
#[derive(Clone)]
pub struct SentRequest {
    form: SendForm,
    token: Option<AuthToken>,
    accepted: Option<String>,
    request: Arc<http::Request<Bytes>>,
}

impl fmt::Debug for SentRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentRequest")
            .field("form", &self.form)
            .field("token", &self.token)
            .field("accepted", &self.accepted)
            .finish_non_exhaustive()
    }
}

impl SentRequest {
    /// The `registration_id` field, if sent.
    pub fn registration_id(&self) -> Option<&str> {
        self.form.registration_id.as_deref()
    }

    /// The `collapse_key` field, if sent.
    pub fn collapse_key(&self) -> Option<&str> {
        self.form.collapse_key.as_deref()
    }

    /// The value of `data.<key>`, if sent.
    pub fn data(&self, key: &str) -> Option<&str> {
        self.form
            .data
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every data pair in the order sent.
    pub fn data_pairs(&self) -> &[(String, String)] {
        &self.form.data
    }

    /// Whether `delay_while_idle` was set.
    pub fn delay_while_idle(&self) -> bool {
        self.form.delay_while_idle
    }

    /// The Auth token the request carried.
    pub fn token(&self) -> Option<&AuthToken> {
        self.token.as_ref()
    }

    /// The message id the fake answered with, when it accepted the message.
    pub fn accepted_id(&self) -> Option<&str> {
        self.accepted.as_deref()
    }

    /// All decoded fields.
    pub fn form(&self) -> &SendForm {
        &self.form
    }

    /// The raw request, for those who want the bytes.
    pub fn request(&self) -> &http::Request<Bytes> {
        &self.request
    }
}

/// One ClientLogin request as the fake received it. The password is not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    /// `Email`.
    pub email: String,
    /// `accountType`.
    pub account_type: Option<String>,
    /// `service`.
    pub service: Option<String>,
    /// `source`.
    pub source: Option<String>,
    /// `logintoken`, when answering a CAPTCHA.
    pub login_token: Option<String>,
    /// `logincaptcha`, when answering a CAPTCHA.
    pub login_captcha: Option<String>,
    /// Whether the password matched the scripted account.
    pub password_matched: bool,
}

#[derive(Debug)]
struct Rule {
    reply: Reply,
    remaining: Option<u32>,
}

#[derive(Debug, Default)]
struct Script {
    sent: Vec<SentRequest>,
    queued: VecDeque<Reply>,
    rules: HashMap<String, Rule>,
    default_reply: Option<Reply>,
    rotate_next: Option<AuthToken>,
    valid_tokens: Option<HashSet<AuthToken>>,
    /// Tokens refused whatever `valid_tokens` says.
    expired_tokens: HashSet<AuthToken>,
    latency: Duration,
    next_id: u64,
    accounts: HashMap<String, String>,
    captchas: HashMap<String, (String, String)>,
    queued_logins: VecDeque<LoginReply>,
    logins: Vec<LoginRequest>,
    successful_logins: usize,
    issued_tokens: u64,
}

/// A fake C2DM service in memory: records every request and answers from a script.
///
/// Cheap to clone; clones share the record and the script, so keep one clone in the test and give
/// another to the code under test. By default every send is accepted with a unique message id.
///
/// Precedence for a send request: a queued one-off reply ([`RecordingTransport::enqueue`]), then
/// the token check ([`RecordingTransport::accept_only_tokens`]), then the rule for the
/// registration id, then acceptance. Requests whose path ends in `/ClientLogin` are answered as
/// ClientLogin from the accounts script.
///
/// Nothing here sleeps for real: [`RecordingTransport::latency`] uses `tokio::time`.
#[derive(Clone, Default)]
pub struct RecordingTransport {
    script: Arc<Mutex<Script>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl fmt::Debug for RecordingTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingTransport")
            .field("sent", &self.lock().sent.len())
            .finish_non_exhaustive()
    }
}

impl RecordingTransport {
    /// A fake that accepts every message.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers every send to `registration_id` with `reply`, for good.
    pub fn reply_to(self, registration_id: &str, reply: impl Into<Reply>) -> Self {
        self.set_rule(registration_id, reply.into(), None);
        self
    }

    /// Answers the next `times` sends to `registration_id` with `reply`, then goes back to
    /// accepting.
    pub fn reply_to_times(
        self,
        registration_id: &str,
        reply: impl Into<Reply>,
        times: u32,
    ) -> Self {
        self.set_rule(registration_id, reply.into(), Some(times));
        self
    }

    /// Sets or replaces the rule for `registration_id` (`times: None` for good).
    pub fn set_rule(&self, registration_id: &str, reply: Reply, times: Option<u32>) {
        self.lock().rules.insert(
            registration_id.to_owned(),
            Rule {
                reply,
                remaining: times,
            },
        );
    }

    /// Answers every send to a registration id without a rule of its own with `reply`, instead
    /// of accepting (e.g. `QuotaExceeded` for everyone). `None` goes back to accepting.
    pub fn set_default_reply(&self, reply: Option<Reply>) {
        self.lock().default_reply = reply;
    }

    /// Answers the next send request (whatever its registration id) with `reply`. Queued
    /// replies are used in order, one per request.
    pub fn enqueue(&self, reply: impl Into<Reply>) -> &Self {
        self.lock().queued.push_back(reply.into());
        self
    }

    /// Adds `Update-Client-Auth: <token>` to the next send answer. When tokens are checked, the
    /// new token becomes valid and the old ones stay valid.
    pub fn rotate_token_on_next_reply(&self, token: AuthToken) -> &Self {
        self.lock().rotate_next = Some(token);
        self
    }

    /// From now on only these tokens (and those issued by logins or rotations) are accepted;
    /// any other gets HTTP 401.
    pub fn accept_only_tokens<I: IntoIterator<Item = AuthToken>>(self, tokens: I) -> Self {
        self.lock().valid_tokens = Some(tokens.into_iter().collect());
        self
    }

    /// Makes `token` valid from now on (when tokens are checked), e.g. one a test's own login
    /// will hand out.
    pub fn allow_token(&self, token: AuthToken) {
        if let Some(valid) = self.lock().valid_tokens.as_mut() {
            valid.insert(token);
        }
    }

    /// Makes `token` invalid from now on (an expired token): sends with it get 401. Every other
    /// token stays as it was: accepted when tokens are not checked, accepted if valid when
    /// they are ([`RecordingTransport::accept_only_tokens`]).
    pub fn expire_token(&self, token: &AuthToken) {
        let mut script = self.lock();
        if let Some(valid) = script.valid_tokens.as_mut() {
            valid.remove(token);
        }
        script.expired_tokens.insert(token.clone());
    }

    /// Waits this long (in `tokio::time`) before each answer.
    pub fn latency(self, latency: Duration) -> Self {
        self.lock().latency = latency;
        self
    }

    /// Adds a ClientLogin account.
    pub fn account(self, email: &str, password: &str) -> Self {
        self.lock()
            .accounts
            .insert(email.to_owned(), password.to_owned());
        self
    }

    /// Makes the next login of `email` demand a CAPTCHA with `token`; answering it with `answer`
    /// (and the right password) succeeds.
    pub fn require_captcha(self, email: &str, token: &str, answer: &str) -> Self {
        self.lock()
            .captchas
            .insert(email.to_owned(), (token.to_owned(), answer.to_owned()));
        self
    }

    /// Answers the next ClientLogin request with `reply`, before the accounts are consulted.
    pub fn enqueue_login(&self, reply: LoginReply) -> &Self {
        self.lock().queued_logins.push_back(reply);
        self
    }

    /// Every send request received, in order, each attempt included.
    pub fn sent(&self) -> Vec<SentRequest> {
        self.lock().sent.clone()
    }

    /// The send requests to one registration id, in order.
    pub fn sent_to(&self, registration_id: &str) -> Vec<SentRequest> {
        self.lock()
            .sent
            .iter()
            .filter(|r| r.registration_id() == Some(registration_id))
            .cloned()
            .collect()
    }

    /// The send requests that were accepted, in order.
    pub fn accepted(&self) -> Vec<SentRequest> {
        self.lock()
            .sent
            .iter()
            .filter(|r| r.accepted.is_some())
            .cloned()
            .collect()
    }

    /// How many send requests were received.
    pub fn send_count(&self) -> usize {
        self.lock().sent.len()
    }

    /// Forgets every recorded request (the script stays).
    pub fn clear(&self) {
        let mut script = self.lock();
        script.sent.clear();
        script.logins.clear();
    }

    /// Every ClientLogin request received, in order.
    pub fn login_requests(&self) -> Vec<LoginRequest> {
        self.lock().logins.clone()
    }

    /// How many logins succeeded (tokens issued).
    pub fn successful_logins(&self) -> usize {
        self.lock().successful_logins
    }

    /// The most requests that were being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// What was scripted and never used: queued send and login replies still waiting, and
    /// per-device replies scripted for a number of times that did not all come. Replies
    /// scripted for every send (no count) are never "unused".
    pub fn unused_replies(&self) -> Vec<String> {
        let script = self.lock();
        let mut unused: Vec<String> = script
            .queued
            .iter()
            .map(|reply| format!("queued send reply {reply:?}"))
            .collect();
        unused.extend(
            script
                .queued_logins
                .iter()
                .map(|reply| format!("queued login reply {reply:?}")),
        );
        let mut rules: Vec<String> = script
            .rules
            .iter()
            .filter_map(|(id, rule)| match rule.remaining {
                Some(n) if n > 0 => Some(format!("{n} more {:?} for {id:?}", rule.reply)),
                _ => None,
            })
            .collect();
        rules.sort();
        unused.extend(rules);
        unused
    }

    /// Panics, naming them, if some scripted replies were never used: a test whose script
    /// says more than happened is a test that checks less than it seems to.
    ///
    /// ```should_panic
    /// use c2dm_core::ErrorCode;
    /// use c2dm_mock::RecordingTransport;
    /// let fake = RecordingTransport::new().reply_to_times("phone", ErrorCode::DeviceQuotaExceeded, 2);
    /// fake.assert_all_replies_used(); // nothing was sent to "phone"
    /// ```
    #[track_caller]
    pub fn assert_all_replies_used(&self) {
        let unused = self.unused_replies();
        assert!(
            unused.is_empty(),
            "scripted replies never used:\n{}",
            unused.join("\n")
        );
    }

    fn answer_send(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<Response<Bytes>, TransportError> {
        let form = SendForm::parse(request.body());
        let token = codec::auth_token_of(request.headers());
        let mut script = self.lock();
        let id = form.registration_id.clone().unwrap_or_default();
        let reply = match script.queued.pop_front() {
            Some(reply) => reply,
            None => {
                let token_ok = match (&script.valid_tokens, &token) {
                    (_, Some(t)) if script.expired_tokens.contains(t) => false,
                    (None, _) => true,
                    (Some(valid), Some(t)) => valid.contains(t),
                    (Some(_), None) => false,
                };
                if !token_ok {
                    Reply::Unauthorized
                } else {
                    let mut expired = false;
                    let reply = match script.rules.get_mut(&id) {
                        Some(rule) => match &mut rule.remaining {
                            None => rule.reply.clone(),
                            Some(0) => Reply::Accept,
                            Some(n) => {
                                *n -= 1;
                                expired = *n == 0;
                                rule.reply.clone()
                            }
                        },
                        None => script.default_reply.clone().unwrap_or(Reply::Accept),
                    };
                    if expired {
                        script.rules.remove(&id);
                    }
                    reply
                }
            }
        };
        let mut accepted = None;
        let mut response = match &reply {
            Reply::Fail { .. } => None,
            Reply::Accept => {
                script.next_id += 1;
                let message_id = format!("0:{}%fake{:08x}", script.next_id, script.next_id);
                let body = codec::accepted_body(&message_id);
                accepted = Some(message_id);
                Some(text(StatusCode::OK, body))
            }
            Reply::Error(code) => Some(text(StatusCode::OK, codec::rejected_body(code))),
            Reply::Unauthorized => Some(text(
                StatusCode::UNAUTHORIZED,
                codec::UNAUTHORIZED_BODY.into(),
            )),
            Reply::Unavailable(retry_after) => {
                let value = match retry_after {
                    Some(RetryAfter::Seconds(s)) => Some(s.to_string()),
                    Some(RetryAfter::Date(d)) => Some(httpdate::fmt_http_date(*d)),
                    None => None,
                };
                Some(codec::encode_send_answer(503, "", value.as_deref(), None))
            }
            Reply::Raw { status, body } => Some(text(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body.clone(),
            )),
        };
        if let Some(resp) = response.as_mut()
            && let Some(rotated) = script.rotate_next.take()
        {
            if let Ok(v) = HeaderValue::from_str(rotated.expose_secret()) {
                resp.headers_mut().insert(codec::UPDATE_CLIENT_AUTH, v);
            }
            if let Some(valid) = script.valid_tokens.as_mut() {
                valid.insert(rotated);
            }
        }
        let failure = match reply {
            Reply::Fail { kind, sent } => {
                Some(TransportError::new(kind, sent).with_message("scripted failure"))
            }
            _ => None,
        };
        script.sent.push(SentRequest {
            form,
            token,
            accepted,
            request: Arc::new(request),
        });
        match (response, failure) {
            (Some(resp), _) => Ok(resp),
            (None, Some(err)) => Err(err),
            (None, None) => unreachable!("every reply is a response or a failure"),
        }
    }

    fn answer_login(&self, request: &http::Request<Bytes>) -> Response<Bytes> {
        let mut fields: HashMap<String, String> = HashMap::new();
        for (k, v) in form_urlencoded::parse(request.body()) {
            fields.insert(k.into_owned(), v.into_owned());
        }
        let email = fields.get("Email").cloned().unwrap_or_default();
        let mut script = self.lock();
        let password_matched = fields
            .get("Passwd")
            .is_some_and(|p| script.accounts.get(&email) == Some(p));
        let record = LoginRequest {
            email: email.clone(),
            account_type: fields.get("accountType").cloned(),
            service: fields.get("service").cloned(),
            source: fields.get("source").cloned(),
            login_token: fields.get("logintoken").cloned(),
            login_captcha: fields.get("logincaptcha").cloned(),
            password_matched,
        };
        script.logins.push(record.clone());
        let reply = match script.queued_logins.pop_front() {
            Some(reply) => reply,
            None if !password_matched => LoginReply::error(LoginErrorCode::BadAuthentication),
            None => match script.captchas.get(&email).cloned() {
                Some((token, answer)) => {
                    let answered = record.login_token.as_deref() == Some(token.as_str())
                        && record.login_captcha.as_deref() == Some(answer.as_str());
                    if answered {
                        script.captchas.remove(&email);
                        LoginReply::Success
                    } else {
                        LoginReply::Captcha { token, answer }
                    }
                }
                None => LoginReply::Success,
            },
        };
        match reply {
            LoginReply::Success => {
                script.issued_tokens += 1;
                script.successful_logins += 1;
                let n = script.issued_tokens;
                let auth = format!("fake-auth-{n}");
                if let (Some(valid), Ok(token)) =
                    (script.valid_tokens.as_mut(), AuthToken::new(&auth))
                {
                    valid.insert(token);
                }
                text(
                    StatusCode::OK,
                    login_server::login_success(
                        &format!("fake-sid-{n}"),
                        &format!("fake-lsid-{n}"),
                        &auth,
                    ),
                )
            }
            LoginReply::Error { code, info } => text(
                StatusCode::FORBIDDEN,
                login_server::login_refusal(&code, info.as_deref()),
            ),
            LoginReply::Captcha { token, .. } => text(
                StatusCode::FORBIDDEN,
                login_server::captcha_challenge(&token),
            ),
            LoginReply::Raw { status, body } => text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Bytes> {
    codec::encode_send_answer(status.as_u16(), body, None, None)
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Transport for RecordingTransport {
    async fn execute(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<Response<Bytes>, TransportError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = InFlight(&self.in_flight);
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if request.uri().path().ends_with("/ClientLogin") {
            Ok(self.answer_login(&request))
        } else {
            self.answer_send(request)
        }
    }
}
