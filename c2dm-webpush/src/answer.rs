//! A push service's answer to a push (RFC 8030 §5, RFC 8292 §4, and what push services do), as
//! a pure function of the response: never a panic, whatever the bytes.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Response;

/// What a push service said of one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted (201 Created; 200 and 202 from some services): the message's URL, from
    /// `Location`, if given.
    Accepted {
        /// The push message resource.
        location: Option<String>,
    },
    /// 404 or 410: the subscription has expired or was removed. The device is gone.
    Gone {
        /// 404 or 410.
        status: u16,
    },
    /// 413: the body is too large for this service.
    TooLarge,
    /// 429: too many pushes to this service; every push to its origin waits.
    TooManyRequests {
        /// Its `Retry-After`, if it said.
        retry_after: Option<Duration>,
    },
    /// 400: a request the service refuses as malformed (a header, the encoding).
    BadRequest {
        /// The body's first line, as the service wrote it (at most 200 characters).
        reason: String,
    },
    /// 401 or 403: the VAPID token or key is refused: the server's configuration, not the
    /// device.
    VapidRefused {
        /// 401 or 403.
        status: u16,
        /// The body's first line (at most 200 characters).
        reason: String,
    },
    /// 5xx: the service failed or is unavailable; try again with backoff.
    Unavailable {
        /// The status.
        status: u16,
        /// Its `Retry-After`, if it said.
        retry_after: Option<Duration>,
    },
    /// Any other status.
    Unexpected {
        /// The status.
        status: u16,
    },
}

impl Answer {
    /// Whether the device should be removed (its subscription is gone).
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone { .. })
    }
}

/// Reads the answer to a push (at `now`, for a `Retry-After` date).
pub fn decode(response: &Response<Bytes>, now: SystemTime) -> Answer {
    let status = response.status().as_u16();
    let header = |name: http::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after = || {
        header(http::header::RETRY_AFTER).and_then(|v| c2dm_core::codec::parse_retry_after(&v, now))
    };
    let reason = || first_line(response.body());
    match status {
        200..=202 => Answer::Accepted {
            location: header(http::header::LOCATION),
        },
        400 => Answer::BadRequest { reason: reason() },
        401 | 403 => Answer::VapidRefused {
            status,
            reason: reason(),
        },
        404 | 410 => Answer::Gone { status },
        413 => Answer::TooLarge,
        429 => Answer::TooManyRequests {
            retry_after: retry_after(),
        },
        500..=599 => Answer::Unavailable {
            status,
            retry_after: retry_after(),
        },
        _ => Answer::Unexpected { status },
    }
}

/// The first line of a body, as text, at most 200 characters.
fn first_line(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &'static [u8]) -> Answer {
        let mut response = Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        decode(
            &response.body(Bytes::from_static(body)).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777),
        )
    }

    #[test]
    fn each_status_means_what_the_rfcs_say() {
        assert_eq!(
            answer(201, &[("location", "https://push.example.net/m/1")], b""),
            Answer::Accepted {
                location: Some("https://push.example.net/m/1".into())
            }
        );
        assert!(answer(410, &[], b"").is_gone());
        assert!(answer(404, &[], b"").is_gone());
        assert_eq!(answer(413, &[], b""), Answer::TooLarge);
        assert_eq!(
            answer(429, &[("retry-after", "30")], b""),
            Answer::TooManyRequests {
                retry_after: Some(Duration::from_secs(30))
            }
        );
        assert_eq!(
            answer(
                503,
                &[("retry-after", "Sun, 06 Nov 1994 08:50:07 GMT")],
                b""
            ),
            Answer::Unavailable {
                status: 503,
                retry_after: Some(Duration::from_secs(30))
            }
        );
        assert_eq!(
            answer(403, &[], b"invalid JWT\nmore"),
            Answer::VapidRefused {
                status: 403,
                reason: "invalid JWT".into()
            }
        );
        assert_eq!(
            answer(400, &[], b"missing TTL"),
            Answer::BadRequest {
                reason: "missing TTL".into()
            }
        );
        assert_eq!(
            answer(302, &[("location", "https://elsewhere")], b""),
            Answer::Unexpected { status: 302 }
        );
    }

    proptest! {
        /// Any status, headers and body are an answer; never a panic.
        #[test]
        fn any_response_is_an_answer(
            status in 100u16..1000,
            retry in proptest::option::of("\\PC{0,40}"),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut response = Response::builder().status(status);
            if let Some(retry) = retry.filter(|r| http::HeaderValue::from_str(r).is_ok()) {
                response = response.header("retry-after", retry);
            }
            let response = response.body(Bytes::from(body)).unwrap();
            let _ = decode(&response, SystemTime::now());
        }
    }
}
