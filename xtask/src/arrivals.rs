//! The emulator's arrivals journal (`c2dm emulator --arrivals FILE`), one JSON object a line,
//! as the server soak reads it. The format is the emulator's (`c2dm_emulator::Arrival`); it is
//! read here with types of xtask's own, so that `cargo xtask` builds no product crate.

use serde::Deserialize;

/// One send request as the emulator saw it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Arrival {
    /// When it arrived: microseconds since the Unix epoch.
    pub(crate) at_us: u64,
    /// Its `registration_id`, if it had one.
    #[serde(default)]
    pub(crate) registration_id: Option<String>,
    /// Its `collapse_key`, if it had one.
    #[serde(default)]
    pub(crate) collapse_key: Option<String>,
    /// How it was answered.
    #[serde(flatten)]
    pub(crate) answer: ArrivalAnswer,
}

/// How a send request was answered.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(crate) enum ArrivalAnswer {
    /// Accepted under this id.
    Accepted { message_id: String },
    /// Refused with this code.
    Rejected { code: String },
    /// HTTP 401.
    Unauthorized,
    /// HTTP 503, asking every send to wait until `until_us`.
    Unavailable { until_us: u64 },
    /// HTTP 500.
    ServerError,
    /// The connection closed without an answer.
    Dropped,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the emulator writes them (its `arrivals.rs` tests write the same shapes).
    #[test]
    fn each_kind_of_line_reads() {
        let read = |line: &str| serde_json::from_str::<Arrival>(line).unwrap();
        let accepted = read(
            r#"{"at_us":5,"registration_id":"d","collapse_key":"k","answer":"accepted","message_id":"0:1"}"#,
        );
        assert_eq!(
            (accepted.at_us, accepted.registration_id.as_deref()),
            (5, Some("d"))
        );
        assert_eq!(
            accepted.answer,
            ArrivalAnswer::Accepted {
                message_id: "0:1".into()
            }
        );
        let rejected = read(r#"{"at_us":6,"answer":"rejected","code":"NotRegistered"}"#);
        assert_eq!(rejected.registration_id, None);
        assert_eq!(
            rejected.answer,
            ArrivalAnswer::Rejected {
                code: "NotRegistered".into()
            }
        );
        assert_eq!(
            read(r#"{"at_us":7,"answer":"unavailable","until_us":9}"#).answer,
            ArrivalAnswer::Unavailable { until_us: 9 }
        );
        for (name, answer) in [
            ("unauthorized", ArrivalAnswer::Unauthorized),
            ("server_error", ArrivalAnswer::ServerError),
            ("dropped", ArrivalAnswer::Dropped),
        ] {
            let line = format!(r#"{{"at_us":1,"answer":"{name}"}}"#);
            assert_eq!(read(&line).answer, answer);
        }
    }
}
