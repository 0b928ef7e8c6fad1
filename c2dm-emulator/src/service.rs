//! The protocol logic of the emulated services, apart from HTTP: a request's fields in, an
//! answer out.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use c2dm_auth::LoginErrorCode;
use c2dm_auth::server as login_server;
use c2dm_core::ErrorCode;
use c2dm_core::codec::{self, SendForm};
use tokio::time::Instant;

use crate::arrivals::{Arrival, ArrivalAnswer, Journal};
use crate::config::{Account, Config, FaultRate, Quota};
use crate::inbox::Inbox;

mod answer;
pub(crate) mod fcm;
mod stats;

use answer::Fault;
pub(crate) use answer::SendAnswer;

use stats::Counters;
pub use stats::{FcmStats, Stats};

/// The count of `key`'s window of `quota` at `now`, with the quota: a window that ended is
/// started anew (a fixed window from the first send it counts), and windows that ended are
/// swept as the map grows.
fn window_entry<K: std::hash::Hash + Eq>(
    counts: &mut Swept<K, (Instant, u64)>,
    key: K,
    quota: Quota,
    now: Instant,
) -> (&mut u64, Quota) {
    counts.sweep_if_grown(|_, (start, _)| now.duration_since(*start) < quota.window);
    let entry = counts.map.entry(key).or_insert((now, 0));
    if now.duration_since(entry.0) >= quota.window {
        *entry = (now, 0);
    }
    (&mut entry.1, quota)
}

/// One login: its tokens share its life.
struct Session {
    account: usize,
    started: Instant,
    sends: AtomicU64,
    accepted: AtomicU64,
    expired: AtomicBool,
    /// The token in use; a rotation retires it. Weak: the token map owns the entries.
    current: Mutex<Weak<TokenEntry>>,
}

struct TokenEntry {
    session: Arc<Session>,
    /// The session's send count when this token was rotated out; `u64::MAX` while current.
    retired_at: AtomicU64,
}

impl TokenEntry {
    /// Whether every later use of this token is refused: its login expired (as a send found),
    /// or it was rotated out and its grace is used up. Send counts only grow, so neither ends.
    fn is_dead(&self, grace_sends: u64) -> bool {
        let retired_at = self.retired_at.load(Ordering::Relaxed);
        self.session.expired.load(Ordering::Relaxed)
            || (retired_at != u64::MAX
                && self.session.sends.load(Ordering::Relaxed)
                    >= retired_at.saturating_add(grace_sends))
    }
}

/// Below this many entries a map is never swept.
const SWEEP_MIN: usize = 1024;

/// A map that forgets what no longer matters: once it holds twice as many entries as after its
/// last sweep (and at least [`SWEEP_MIN`]), the entries `keep` refuses go. A long-running
/// emulator then holds at most twice what is live, and sweeping costs O(1) per insert,
/// amortized.
struct Swept<K, V> {
    map: HashMap<K, V>,
    sweep_at: usize,
}

impl<K: std::hash::Hash + Eq, V> Swept<K, V> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            sweep_at: SWEEP_MIN,
        }
    }

    /// Sweeps if the map has grown enough; call before inserting.
    fn sweep_if_grown(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(keep);
            self.sweep_at = (self.map.len() * 2).max(SWEEP_MIN);
        }
    }
}

/// The emulated services' state.
pub(crate) struct Service {
    config: Config,
    accounts: Vec<Account>,
    counters: Counters,
    /// Every token handed out; dead ones are swept as new ones come.
    tokens: RwLock<Swept<Box<str>, Arc<TokenEntry>>>,
    captchas_solved: Mutex<HashSet<usize>>,
    token_counter: AtomicU64,
    message_counter: AtomicU64,
    inbox: Inbox,
    /// Sends per device in the window of `Config::device_quota`.
    device_counts: Mutex<Swept<Box<str>, (Instant, u64)>>,
    /// Refusals per device of `Config::device_quota_prefixes`, never reset.
    device_refusals: Mutex<Swept<Box<str>, (Instant, u64)>>,
    sender_counts: Mutex<Swept<usize, (Instant, u64)>>,
    /// Added to the real clock: tests move time forward without sleeping.
    clock_offset_micros: AtomicU64,
    /// Every send's arrival, when asked for.
    arrivals: Journal,
    /// The public half of the FCM service account's key, for its assertions.
    fcm_public_key: Vec<u8>,
    /// FCM access tokens issued, with when each expires; expired ones are swept as new ones
    /// come.
    fcm_tokens: Mutex<Swept<Box<str>, Instant>>,
}

/// splitmix64: a well-mixed hash of a counter, for seeded, lock-free, reproducible choices.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Service {
    pub(crate) fn new(config: Config) -> Self {
        let accounts = config.effective_accounts();
        let inbox = Inbox::new(config.inbox, mix(config.seed ^ 0x5eed));
        let service = Self {
            accounts,
            counters: Counters::default(),
            tokens: RwLock::new(Swept::new()),
            captchas_solved: Mutex::new(HashSet::new()),
            token_counter: AtomicU64::new(0),
            message_counter: AtomicU64::new(1_326_885_481_081_626),
            inbox,
            device_counts: Mutex::new(Swept::new()),
            device_refusals: Mutex::new(Swept::new()),
            sender_counts: Mutex::new(Swept::new()),
            clock_offset_micros: AtomicU64::new(0),
            arrivals: Journal::default(),
            fcm_public_key: fcm::public_key(),
            fcm_tokens: Mutex::new(Swept::new()),
            config,
        };
        for token in service.config.static_tokens.clone() {
            service.start_session(0, Some(token));
        }
        service
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    /// The emulator's clock: real time plus what [`Service::advance_clock`] added.
    fn now(&self) -> Instant {
        Instant::now() + Duration::from_micros(self.clock_offset_micros.load(Ordering::Relaxed))
    }

    pub(crate) fn advance_clock(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.clock_offset_micros
            .fetch_add(micros, Ordering::Relaxed);
    }

    fn fault(&self, rate: FaultRate, n: u64, salt: u64) -> bool {
        match rate {
            FaultRate::Never => false,
            FaultRate::Every(k) => k > 0 && n.is_multiple_of(k),
            FaultRate::Probability(p) => {
                let draw = mix(self.config.seed ^ mix(n ^ salt)) >> 11;
                (draw as f64 / (1u64 << 53) as f64) < p
            }
        }
    }

    fn new_token(&self) -> String {
        let n = self.token_counter.fetch_add(1, Ordering::Relaxed);
        let a = mix(self.config.seed ^ mix(n));
        let b = mix(a ^ n);
        format!("EMU{a:016x}{b:016x}")
    }

    fn start_session(&self, account: usize, token: Option<String>) -> String {
        let token = token.unwrap_or_else(|| self.new_token());
        let session = Arc::new(Session {
            account,
            started: self.now(),
            sends: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            expired: AtomicBool::new(false),
            current: Mutex::new(Weak::new()),
        });
        let entry = Arc::new(TokenEntry {
            session: Arc::clone(&session),
            retired_at: AtomicU64::new(u64::MAX),
        });
        *session.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&entry);
        self.add_token(&token, entry);
        token
    }

    fn add_token(&self, token: &str, entry: Arc<TokenEntry>) {
        let grace = self.config.rotation_grace_sends;
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        tokens.sweep_if_grown(|_, entry| !entry.is_dead(grace));
        tokens.map.insert(token.into(), entry);
    }

    /// Checks a token; returns its entry when it may send, and counts the send on its session.
    fn authorize(&self, token: Option<&str>) -> Option<Arc<TokenEntry>> {
        let entry = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(token?)
            .cloned()?;
        let session = &entry.session;
        if session.expired.load(Ordering::Relaxed) {
            return None;
        }
        let n = session.sends.fetch_add(1, Ordering::Relaxed) + 1;
        let over_sends = self
            .config
            .token_lifetime_sends
            .is_some_and(|limit| n > limit);
        let over_time = self
            .config
            .token_lifetime
            .is_some_and(|d| self.now().duration_since(session.started) >= d);
        if over_sends || over_time {
            if !session.expired.swap(true, Ordering::Relaxed) {
                self.counters.expiries.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        let retired_at = entry.retired_at.load(Ordering::Relaxed);
        if retired_at != u64::MAX && n > retired_at.saturating_add(self.config.rotation_grace_sends)
        {
            return None;
        }
        Some(entry)
    }

    /// Counts a send against the device's and the sender's quotas, or against neither: a send
    /// refused for one quota uses up none of the other. Both maps are locked (device first,
    /// always) while both are checked, so concurrent sends cannot overdraw.
    fn take_quotas(&self, id: &str, account: usize) -> Result<(), ErrorCode> {
        let now = self.now();
        let mut devices = self.config.device_quota.map(|quota| {
            (
                self.device_counts.lock().unwrap_or_else(|e| e.into_inner()),
                quota,
            )
        });
        let mut senders = self.config.sender_quota.map(|quota| {
            (
                self.sender_counts.lock().unwrap_or_else(|e| e.into_inner()),
                quota,
            )
        });
        let device = devices
            .as_mut()
            .map(|(counts, quota)| window_entry(counts, id.into(), *quota, now));
        if device
            .as_ref()
            .is_some_and(|(used, quota)| **used >= quota.limit)
        {
            return Err(ErrorCode::DeviceQuotaExceeded);
        }
        let sender = senders
            .as_mut()
            .map(|(counts, quota)| window_entry(counts, account, *quota, now));
        if sender
            .as_ref()
            .is_some_and(|(used, quota)| **used >= quota.limit)
        {
            return Err(ErrorCode::QuotaExceeded);
        }
        for (used, _) in device.into_iter().chain(sender) {
            *used += 1;
        }
        Ok(())
    }

    /// Counts a send for `key` if its window of `quota` has room; every key of `counts` must
    /// have the same quota (windows that ended are swept with it).
    fn count_in_window<K: std::hash::Hash + Eq>(
        &self,
        counts: &Mutex<Swept<K, (Instant, u64)>>,
        key: K,
        quota: Quota,
    ) -> bool {
        let now = self.now();
        let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
        let (used, quota) = window_entry(&mut counts, key, quota, now);
        if *used >= quota.limit {
            false
        } else {
            *used += 1;
            true
        }
    }

    /// Answers one send request: `authorization` is the `Authorization` header, `body` the form.
    /// The arrivals journal, if on, gets a line.
    pub(crate) fn send(&self, authorization: Option<&str>, body: &[u8]) -> SendAnswer {
        let at = SystemTime::now();
        let answer = self.answer_send(authorization, body);
        if self.arrivals.is_on() {
            let what = ArrivalAnswer::of(
                at,
                answer.status,
                &answer.body,
                answer.retry_after.as_deref(),
                answer.drop,
            );
            self.arrivals.write(&Arrival::new(at, body, what));
        }
        answer
    }

    /// The arrivals journal.
    pub(crate) fn arrivals(&self) -> &Journal {
        &self.arrivals
    }

    /// Counts a send request and draws its fault, if it meets one: the same draw for every
    /// protocol, so that a seed gives the same faults whichever is sent.
    fn send_fault(&self) -> Option<Fault> {
        let c = &self.counters;
        let n = c.sends.fetch_add(1, Ordering::Relaxed) + 1;
        if self.fault(self.config.drops, n, 1) {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            Some(Fault::Drop)
        } else if self.fault(self.config.server_errors, n, 2) {
            c.server_errors.fetch_add(1, Ordering::Relaxed);
            Some(Fault::ServerError)
        } else if self.fault(self.config.unavailable, n, 3) {
            let k = c.unavailable.fetch_add(1, Ordering::Relaxed);
            Some(Fault::Unavailable { nth: k })
        } else {
            None
        }
    }

    fn answer_send(&self, authorization: Option<&str>, body: &[u8]) -> SendAnswer {
        let c = &self.counters;
        match self.send_fault() {
            Some(Fault::Drop) => return SendAnswer::dropped(),
            Some(Fault::ServerError) => return SendAnswer::text(500, "Internal Server Error"),
            Some(Fault::Unavailable { nth }) => {
                let secs = self.config.retry_after.as_secs();
                let retry_after = if nth.is_multiple_of(2) || secs == 0 {
                    secs.to_string()
                } else {
                    // An HTTP-date has whole seconds: one more, so the wait is never shorter.
                    httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs + 1))
                };
                return SendAnswer {
                    retry_after: Some(retry_after),
                    ..SendAnswer::text(503, "")
                };
            }
            None => {}
        }
        let token = authorization.and_then(|v| v.strip_prefix(codec::AUTH_SCHEME));
        let Some(entry) = self.authorize(token) else {
            c.unauthorized.fetch_add(1, Ordering::Relaxed);
            return SendAnswer::text(401, codec::UNAUTHORIZED_BODY);
        };
        let form = SendForm::parse(body);
        let rejected = |code: ErrorCode| {
            c.count_error(&code);
            SendAnswer::error(&code)
        };
        let Some(id) = form.registration_id.as_deref().filter(|id| !id.is_empty()) else {
            return rejected(ErrorCode::MissingRegistration);
        };
        let Some(collapse_key) = form.collapse_key.as_deref().filter(|k| !k.is_empty()) else {
            return rejected(ErrorCode::MissingCollapseKey);
        };
        if form.payload_size() > self.config.payload_limit {
            return rejected(ErrorCode::MessageTooBig);
        }
        if let Some(code) = self.config.devices.permanent_error(id) {
            return rejected(ErrorCode::parse(code));
        }
        if self.config.devices.has_device_quota_prefix(id) {
            let limited = Quota {
                limit: u64::from(self.config.device_quota_prefix_sends),
                window: Duration::MAX,
            };
            // Counts the sends this device was refused; once past the limit it goes through.
            if self.count_in_window(&self.device_refusals, id.into(), limited) {
                return rejected(ErrorCode::DeviceQuotaExceeded);
            }
        }
        let session = &entry.session;
        if let Err(code) = self.take_quotas(id, session.account) {
            return rejected(code);
        }
        let number = self.message_counter.fetch_add(1, Ordering::Relaxed);
        self.inbox
            .record(id, number, collapse_key, &form.data, form.delay_while_idle);
        c.accepted.fetch_add(1, Ordering::Relaxed);
        let mut answer = SendAnswer::text(
            200,
            codec::accepted_body(&crate::inbox::message_id(number, self.inbox_tag())),
        );
        let accepted = session.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(every) = self.config.rotate_token_every.filter(|e| *e > 0)
            && accepted % every == 0
        {
            answer.rotated_token = Some(self.rotate(session));
        }
        answer
    }

    fn inbox_tag(&self) -> u64 {
        mix(self.config.seed ^ 0x5eed)
    }

    fn rotate(&self, session: &Arc<Session>) -> String {
        let token = self.new_token();
        let entry = Arc::new(TokenEntry {
            session: Arc::clone(session),
            retired_at: AtomicU64::new(u64::MAX),
        });
        let old = std::mem::replace(
            &mut *session.current.lock().unwrap_or_else(|e| e.into_inner()),
            Arc::downgrade(&entry),
        );
        if let Some(old) = old.upgrade() {
            old.retired_at
                .store(session.sends.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.add_token(&token, entry);
        self.counters.rotations.fetch_add(1, Ordering::Relaxed);
        token
    }

    /// Answers one ClientLogin request: (status, body).
    pub(crate) fn login(&self, body: &[u8]) -> (u16, String) {
        let mut fields: HashMap<String, String> = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            fields.insert(k.into_owned(), v.into_owned());
        }
        let refuse = |code: &str| {
            self.counters.login_failures.fetch_add(1, Ordering::Relaxed);
            (
                403,
                login_server::login_refusal(&LoginErrorCode::parse(code), None),
            )
        };
        let (Some(email), Some(password), Some(service)) = (
            fields.get("Email"),
            fields.get("Passwd"),
            fields.get("service"),
        ) else {
            return refuse("Unknown");
        };
        let account_type = fields.get("accountType").map_or("HOSTED_OR_GOOGLE", |s| s);
        if !matches!(account_type, "HOSTED_OR_GOOGLE" | "GOOGLE" | "HOSTED") {
            return refuse("Unknown");
        }
        let Some(index) = self
            .accounts
            .iter()
            .position(|a| &a.email == email && &a.password == password)
        else {
            return refuse("BadAuthentication");
        };
        let account = &self.accounts[index];
        if service != "ac2dm" {
            return refuse("ServiceDisabled");
        }
        if let Some(code) = &account.refuse_with {
            return refuse(code);
        }
        if let Some((token, answer)) = &account.captcha {
            let mut solved = self
                .captchas_solved
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !solved.contains(&index) {
                let answered = fields.get("logintoken") == Some(token)
                    && fields.get("logincaptcha") == Some(answer);
                if !answered {
                    self.counters.login_failures.fetch_add(1, Ordering::Relaxed);
                    return (403, login_server::captcha_challenge(token));
                }
                solved.insert(index);
            }
        }
        let token = self.start_session(index, None);
        self.counters.logins.fetch_add(1, Ordering::Relaxed);
        let n = self.counters.logins.load(Ordering::Relaxed);
        (
            200,
            login_server::login_success(&format!("EMUSID{n}"), &format!("EMULSID{n}"), &token),
        )
    }

    pub(crate) fn inbox(&self) -> &Inbox {
        &self.inbox
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(id: &str) -> String {
        format!("registration_id={id}&collapse_key=k&data.message=hi")
    }

    fn body(answer: &SendAnswer) -> &str {
        std::str::from_utf8(&answer.body).unwrap_or("")
    }

    #[test]
    fn a_swept_map_drops_what_keep_refuses_once_it_has_doubled() {
        let mut swept: Swept<u32, u32> = Swept::new();
        for k in 0..SWEEP_MIN as u32 {
            swept.sweep_if_grown(|_, v| *v % 2 == 0);
            swept.map.insert(k, k);
        }
        // Not grown enough yet: nothing went.
        assert_eq!(swept.map.len(), SWEEP_MIN);
        swept.sweep_if_grown(|_, v| *v % 2 == 0);
        assert_eq!(swept.map.len(), SWEEP_MIN / 2, "the odd ones went");
        assert!(swept.map.keys().all(|k| k % 2 == 0));
        // The next sweep waits for twice what was kept (at least the minimum).
        assert_eq!(swept.sweep_at, SWEEP_MIN);
        swept.sweep_if_grown(|_, _| false);
        assert_eq!(swept.map.len(), SWEEP_MIN / 2);
    }

    #[test]
    fn a_send_refused_for_the_sender_quota_uses_no_device_quota() {
        let service = Service::new(Config {
            static_tokens: vec!["T".into()],
            device_quota: Some(Quota {
                limit: 2,
                window: Duration::from_secs(3600),
            }),
            sender_quota: Some(Quota {
                limit: 1,
                window: Duration::from_secs(60),
            }),
            ..Config::default()
        });
        let auth = Some("GoogleLogin auth=T");
        assert!(body(&service.send(auth, form("d").as_bytes())).starts_with("id="));
        for _ in 0..3 {
            assert_eq!(
                body(&service.send(auth, form("d").as_bytes())),
                "Error=QuotaExceeded"
            );
        }
        // The sender's window ends; the device has used one of its two sends, not four.
        service.advance_clock(Duration::from_secs(60));
        assert!(body(&service.send(auth, form("d").as_bytes())).starts_with("id="));
        assert_eq!(service.stats(false, false).errors["QuotaExceeded"], 3);
    }

    #[test]
    fn unlisted_error_codes_are_counted_as_themselves() {
        let service = Service::new(Config::default());
        service
            .counters
            .count_error(&ErrorCode::Unknown("Whatever".into()));
        let errors = service.stats(false, false).errors;
        assert_eq!(errors.get("Whatever"), Some(&1));
        assert_eq!(errors.get("QuotaExceeded"), None);
    }

    #[test]
    fn device_quota_windows_that_ended_are_forgotten_and_live_ones_still_count() {
        let service = Service::new(Config {
            static_tokens: vec!["T".into()],
            device_quota: Some(Quota {
                limit: 1,
                window: Duration::from_secs(60),
            }),
            ..Config::default()
        });
        let auth = Some("GoogleLogin auth=T");
        for i in 0..3 * SWEEP_MIN {
            let answer = service.send(auth, form(&format!("old-{i}")).as_bytes());
            assert!(body(&answer).starts_with("id="), "{}", body(&answer));
        }
        service.advance_clock(Duration::from_secs(60));
        assert!(body(&service.send(auth, form("fresh").as_bytes())).starts_with("id="));
        for i in 0..2 * SWEEP_MIN {
            service.send(auth, form(&format!("new-{i}")).as_bytes());
        }
        let kept = service.device_counts.lock().unwrap().map.len();
        assert!(kept <= 2 * SWEEP_MIN + 1, "{kept} device windows kept");
        // Windows still open keep counting through the sweeps.
        assert_eq!(
            body(&service.send(auth, form("fresh").as_bytes())),
            "Error=DeviceQuotaExceeded"
        );
        // And one that ended lets the device through again, swept or not.
        assert!(body(&service.send(auth, form("old-1").as_bytes())).starts_with("id="));
    }

    #[test]
    fn rotated_tokens_past_their_grace_are_forgotten() {
        let service = Service::new(Config {
            static_tokens: vec!["T".into()],
            rotate_token_every: Some(1),
            rotation_grace_sends: 0,
            ..Config::default()
        });
        let mut token = "T".to_owned();
        for i in 0..4 * SWEEP_MIN {
            let answer = service.send(
                Some(&format!("GoogleLogin auth={token}")),
                form(&format!("d-{i}")).as_bytes(),
            );
            assert!(body(&answer).starts_with("id="), "{}", body(&answer));
            token = answer.rotated_token.expect("a rotation per message");
        }
        let kept = service.tokens.read().unwrap().map.len();
        assert!(kept <= SWEEP_MIN + 1, "{kept} tokens kept");
        // The current token works; a retired one stays refused, swept or not.
        let current = format!("GoogleLogin auth={token}");
        assert!(body(&service.send(Some(&current), form("x").as_bytes())).starts_with("id="));
        assert_eq!(
            service
                .send(Some("GoogleLogin auth=T"), form("y").as_bytes())
                .status,
            401
        );
    }
}
