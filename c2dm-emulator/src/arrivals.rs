//! The arrivals journal: one JSON line per send request, written as it is answered. Counts
//! cannot show the order and time of the sends; checks such as "no send while the sender was
//! paused" or "none after a cancel took effect" need them.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One send request as the emulator saw it: a line of the arrivals journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// When it arrived, by the wall clock: microseconds since the Unix epoch.
    pub at_us: u64,
    /// Its `registration_id`, if it had one.
    #[serde(default)]
    pub registration_id: Option<String>,
    /// Its `collapse_key`, if it had one.
    #[serde(default)]
    pub collapse_key: Option<String>,
    /// How it was answered.
    #[serde(flatten)]
    pub answer: ArrivalAnswer,
}

/// How a send request was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum ArrivalAnswer {
    /// `id=`: the message was accepted under this id.
    Accepted {
        /// The message id given.
        message_id: String,
    },
    /// `Error=`: refused with this code.
    Rejected {
        /// The code, as sent (`NotRegistered`, `QuotaExceeded`, …).
        code: String,
    },
    /// HTTP 401: the token was refused.
    Unauthorized,
    /// HTTP 503: every send of the sender should wait until `until_us` (its `Retry-After`,
    /// microseconds since the Unix epoch).
    Unavailable {
        /// The end of the wait the answer asked for.
        until_us: u64,
    },
    /// HTTP 500.
    ServerError,
    /// The connection was closed without an answer.
    Dropped,
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl ArrivalAnswer {
    /// The answer of HTTP `status` with `body` and `Retry-After`, or a connection `dropped`,
    /// to a request that came at `at`.
    pub(crate) fn of(
        at: SystemTime,
        status: u16,
        body: &[u8],
        retry_after: Option<&str>,
        dropped: bool,
    ) -> Self {
        let text = std::str::from_utf8(body).unwrap_or("");
        match status {
            _ if dropped => Self::Dropped,
            401 => Self::Unauthorized,
            503 => {
                let retry_after = retry_after.unwrap_or("0");
                let until = match retry_after.parse::<u64>() {
                    Ok(secs) => at + Duration::from_secs(secs),
                    Err(_) => httpdate::parse_http_date(retry_after).unwrap_or(at),
                };
                Self::Unavailable {
                    until_us: micros(until),
                }
            }
            200 => match text.trim_end().split_once('=') {
                Some(("id", id)) => Self::Accepted {
                    message_id: id.to_owned(),
                },
                Some((_, code)) => Self::Rejected {
                    code: code.to_owned(),
                },
                None => Self::ServerError,
            },
            _ => Self::ServerError,
        }
    }
}

impl Arrival {
    /// The arrival at `at` of a request with this form, answered with `answer`.
    pub(crate) fn new(at: SystemTime, form: &[u8], answer: ArrivalAnswer) -> Self {
        let form = c2dm_core::codec::SendForm::parse(form);
        Self {
            at_us: micros(at),
            registration_id: form.registration_id,
            collapse_key: form.collapse_key,
            answer,
        }
    }
}

/// Where arrivals go, if anywhere.
#[derive(Default)]
pub(crate) struct Journal {
    on: AtomicBool,
    out: Mutex<Option<std::io::BufWriter<Box<dyn Write + Send>>>>,
}

impl Journal {
    /// From now on, every arrival goes to `out`.
    pub(crate) fn start(&self, out: Box<dyn Write + Send>) {
        let mut slot = self.out.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(std::io::BufWriter::with_capacity(1 << 16, out));
        self.on.store(true, Ordering::Release);
    }

    /// Whether arrivals are being written.
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Writes one arrival; the first error stops the journal (and says so once).
    pub(crate) fn write(&self, arrival: &Arrival) {
        let Ok(mut line) = serde_json::to_vec(arrival) else {
            return;
        };
        line.push(b'\n');
        let mut slot = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(out) = slot.as_mut()
            && let Err(e) = out.write_all(&line)
        {
            tracing::warn!(error = %e, "could not write the arrivals journal: it stops here");
            *slot = None;
            self.on.store(false, Ordering::Release);
        }
    }

    /// Writes out what is buffered.
    pub(crate) fn flush(&self) -> std::io::Result<()> {
        let mut slot = self.out.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_mut().map_or(Ok(()), Write::flush)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as the service gives it: status, body, `Retry-After`, dropped.
    struct Sent(u16, &'static str, Option<&'static str>, bool);

    fn answer(status: u16, body: &'static str) -> Sent {
        Sent(status, body, None, false)
    }

    #[test]
    fn arrivals_name_their_answer_and_round_trip_through_json() {
        let at = UNIX_EPOCH + Duration::from_secs(1_000);
        let body = b"registration_id=phone-1&collapse_key=k&data.m=hi";
        let unavailable = Sent(503, "", Some("3"), false);
        let dated = Sent(503, "", Some("Thu, 01 Jan 1970 00:16:45 GMT"), false);
        let dropped = Sent(0, "", None, true);
        let cases = [
            (
                answer(200, "id=0:1234%abc\n"),
                ArrivalAnswer::Accepted {
                    message_id: "0:1234%abc".into(),
                },
            ),
            (
                answer(200, "Error=NotRegistered"),
                ArrivalAnswer::Rejected {
                    code: "NotRegistered".into(),
                },
            ),
            (answer(401, "Unauthorized"), ArrivalAnswer::Unauthorized),
            (
                unavailable,
                ArrivalAnswer::Unavailable {
                    until_us: 1_003_000_000,
                },
            ),
            (
                dated,
                ArrivalAnswer::Unavailable {
                    until_us: 1_005_000_000,
                },
            ),
            (answer(500, "oops"), ArrivalAnswer::ServerError),
            (dropped, ArrivalAnswer::Dropped),
        ];
        for (sent, expected) in cases {
            let Sent(status, text, retry_after, dropped) = sent;
            let answer = ArrivalAnswer::of(at, status, text.as_bytes(), retry_after, dropped);
            let arrival = Arrival::new(at, body, answer);
            assert_eq!(arrival.answer, expected);
            assert_eq!(arrival.at_us, 1_000_000_000);
            assert_eq!(arrival.registration_id.as_deref(), Some("phone-1"));
            assert_eq!(arrival.collapse_key.as_deref(), Some("k"));
            let line = serde_json::to_string(&arrival).unwrap();
            assert_eq!(serde_json::from_str::<Arrival>(&line).unwrap(), arrival);
        }
    }

    #[test]
    fn a_journal_writes_one_line_per_arrival_once_started() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let journal = Journal::default();
        let arrival = Arrival::new(SystemTime::now(), b"", ArrivalAnswer::ServerError);
        assert!(!journal.is_on());
        let out = Shared::default();
        journal.start(Box::new(out.clone()));
        assert!(journal.is_on());
        journal.write(&arrival);
        journal.write(&arrival);
        journal.flush().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.lines()
                .all(|l| l.contains(r#""answer":"server_error""#))
        );
    }
}
