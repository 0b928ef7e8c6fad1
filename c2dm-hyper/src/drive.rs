//! Driving an HTTP/1.1 connection from the task of the request it carries.
//!
//! While a request holds an HTTP/1.1 connection, the request's own task polls the connection's
//! I/O just before each poll of whatever it waits for (the connection's readiness, the answer,
//! the body), through a relay waker that keeps the connection's wakes inside that poll. The pool
//! (`pool.rs`) decides which connection a request gets; this file only drives one.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

type Body = Full<Bytes>;
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// The request's deadline passed.
#[derive(Debug)]
pub(crate) struct TimedOut;

/// How an HTTP/1.1 connection wakes the task that holds it.
///
/// The connection wakes whoever polled it last when a request is queued on it, an answer
/// arrives for the request, or its body is asked for, and the first and last of these happen
/// while the holder itself is polling it. Passed on to the task, each such wake would put the
/// task back on the run queue, and often wake an idle worker thread to steal it, only for it to
/// find nothing new. So the connection is polled with this waker: a wake that comes while the
/// holder polls makes it poll once more at once; any other (the socket became readable, from
/// the I/O driver) wakes the task.
pub(crate) struct Relay {
    state: AtomicU8,
    pub(crate) task: AtomicWaker,
}

/// Nobody is polling: a wake goes to the task.
const IDLE: u8 = 0;
/// The holder is polling: a wake is noted, and the holder polls again.
const POLLING: u8 = 1;
/// The holder is polling and was woken meanwhile.
const WOKEN: u8 = 2;

/// Rounds of polling within one poll of the holder before it yields to other tasks.
const MAX_ROUNDS: usize = 16;

impl Relay {
    pub(crate) fn new() -> (Arc<Self>, Waker) {
        let relay = Arc::new(Self {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&relay));
        (relay, waker)
    }
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // The holder is polling, and will poll again; or already knows it must.
            Ok(_) | Err(WOKEN) => {}
            _ => self.task.wake(),
        }
    }
}

/// Runs `fut` to its end while driving the HTTP/1.1 connection `conn` from this task, until
/// `deadline`.
///
/// Whatever `fut` waits for (the connection's readiness, the answer, the body) is made by
/// polling the connection, which happens here just before each poll of `fut`; so both are
/// polled with the relay's waker, and only the timer with the task's own.
///
/// `fut` comes pinned by the caller: an `async fn` keeps its arguments apart from everything
/// else it holds, so a future passed by value would be stored twice, here and at its pinning,
/// in every request's future.
pub(crate) async fn drive<F: Future>(
    conn: &mut Http1Io<'_>,
    deadline: Instant,
    mut fut: Pin<&mut F>,
) -> Result<F::Output, TimedOut> {
    if conn.timer.deadline() != deadline {
        conn.timer.as_mut().reset(deadline);
    }
    poll_fn(|cx| {
        conn.relay.task.register(cx.waker());
        let mut relayed = Context::from_waker(conn.relay_waker);
        let mut rounds = 0;
        loop {
            conn.relay.state.store(POLLING, Ordering::Release);
            // The I/O first: a read that completes an answer makes `fut` ready in this round.
            if let Some(connection) = conn.io.as_mut()
                && let Poll::Ready(result) = Pin::new(&mut **connection).poll(&mut relayed)
            {
                if let Err(err) = result {
                    tracing::debug!(%err, "HTTP/1.1 connection ended with an error");
                }
                // Dropping it fails whatever still waits on it, so `fut` cannot hang.
                *conn.io = None;
            }
            let output = fut.as_mut().poll(&mut relayed);
            let woken = conn
                .relay
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_err();
            if let Poll::Ready(output) = output {
                conn.relay.state.store(IDLE, Ordering::Release);
                return Poll::Ready(Ok(output));
            }
            if !woken {
                break;
            }
            rounds += 1;
            if rounds == MAX_ROUNDS {
                // Still being woken: let other tasks run, and come back.
                conn.relay.state.store(IDLE, Ordering::Release);
                cx.waker().wake_by_ref();
                break;
            }
        }
        conn.timer.as_mut().poll(cx).map(|()| Err(TimedOut))
    })
    .await
}

/// The parts of an [`Http1`] that [`drive`] needs, borrowed apart from its `send`.
pub(crate) struct Http1Io<'a> {
    pub(crate) io: &'a mut Option<Box<http1::Connection<Io, Body>>>,
    pub(crate) timer: &'a mut Pin<Box<Sleep>>,
    pub(crate) relay: &'a Relay,
    pub(crate) relay_waker: &'a Waker,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the wakes that reach the task.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_relay_keeps_wakes_during_a_poll_and_passes_on_the_others() {
        let task = Arc::new(CountingWaker(std::sync::atomic::AtomicUsize::new(0)));
        let (relay, relay_waker) = Relay::new();
        relay.task.register(&Waker::from(Arc::clone(&task)));

        // While the holder polls, a wake is noted, not passed on.
        relay.state.store(POLLING, Ordering::SeqCst);
        relay_waker.wake_by_ref();
        relay_waker.wake_by_ref();
        assert_eq!(relay.state.load(Ordering::SeqCst), WOKEN);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        // The holder sees it: its end-of-round exchange fails, so it polls again.
        assert!(
            relay
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        );

        // Between polls, a wake reaches the task.
        relay.state.store(IDLE, Ordering::SeqCst);
        relay_waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        relay.task.register(&Waker::from(Arc::clone(&task)));
        Wake::wake(Arc::clone(&relay));
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
    }
}
