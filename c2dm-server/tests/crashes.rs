//! What the durable jobs promise when things go wrong: a worker killed in the middle of a
//! batch, a cancel while a batch sends, and an account's daily budget spent half way; and how
//! many batches a worker sends at once while it readies the next.
//! Each runs on SQLite and on PostgreSQL, against the emulator.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use c2dm_core::OutcomeKind;
use c2dm_core::{RequestSent, TransportError, TransportErrorKind};
use c2dm_server::jobs::{WorkerOptions, run_workers};
use c2dm_server::queue::BatchJob;
use c2dm_server::serve::open_database;
use c2dm_server::store::{
    Audience, DeliveryRow, DeviceState, OutcomeTally, Positions, PushState, Reservation,
};
use serde_json::{Value, json};

use common::{Db, Server};

/// What a transport made by [`passing`] does with the requests after the ones it passes.
enum Then {
    /// Forwards each to the emulator without giving its answer back: the send stays under
    /// way forever.
    Stall,
    /// Holds each until the receiver turns true, then fails it without having sent it.
    HoldUntil(tokio::sync::watch::Receiver<bool>),
    /// Holds each until the receiver turns true, then forwards it to the emulator.
    HoldThenForward(tokio::sync::watch::Receiver<bool>),
}

/// A transport that forwards requests to the emulator until it has forwarded `pass`, then
/// does as `then` says with each later one; `reached` fires when the first later one comes.
fn passing(
    pass: usize,
    reached: tokio::sync::oneshot::Sender<()>,
    then: Then,
) -> impl c2dm_core::Transport + 'static {
    let inner = Arc::new(c2dm_hyper::HyperTransport::new().unwrap());
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reached = Arc::new(Mutex::new(Some(reached)));
    let then = Arc::new(then);
    move |request: http::Request<Bytes>| {
        let inner = Arc::clone(&inner);
        let count = Arc::clone(&count);
        let reached = Arc::clone(&reached);
        let then = Arc::clone(&then);
        async move {
            let passed = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < pass;
            if passed {
                return c2dm_core::Transport::execute(&*inner, request).await;
            }
            let fire = || {
                if let Some(reached) = reached.lock().unwrap().take() {
                    let _ = reached.send(());
                }
            };
            match &*then {
                Then::Stall => {
                    let _ = c2dm_core::Transport::execute(&*inner, request).await;
                    fire();
                    std::future::pending().await
                }
                Then::HoldUntil(release) => {
                    fire();
                    let _ = release.clone().wait_for(|released| *released).await;
                    Err(TransportError::new(
                        TransportErrorKind::Connect,
                        RequestSent::No,
                    ))
                }
                Then::HoldThenForward(release) => {
                    fire();
                    let _ = release.clone().wait_for(|released| *released).await;
                    c2dm_core::Transport::execute(&*inner, request).await
                }
            }
        }
    }
}

async fn register_phones(server: &Server, n: usize) {
    for i in 0..n {
        server.register(&format!("phone-{i:03}"), None, &[]).await;
    }
}

async fn a_worker_killed_mid_batch_leaves_its_batch_to_another(db: Db) {
    // Heartbeats of a second: the dead worker's batch goes to the other after three.
    let options = WorkerOptions {
        workers: 1,
        concurrency: 4,
        batch_size: 200,
        heartbeat: Duration::from_secs(1),
        ..WorkerOptions::default()
    };
    let server = Server::start_with(db, |_| {}, &options).await;
    register_phones(&server, 200).await;

    // The first worker, in a runtime of its own, as a process would be: its own pool, its
    // own sender, whose sends after the 150th reach the emulator but never come back.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (reached, stalled) = tokio::sync::oneshot::channel();
    let sender = server.sender_over(passing(150, reached, Then::Stall));
    let url = server.database.url.clone();
    let doomed_options = options.clone();
    doomed.spawn(async move {
        let (store, queues) = open_database(&url, &doomed_options).await.unwrap();
        run_workers(
            store,
            sender,
            queues,
            doomed_options,
            std::future::pending(),
        )
        .await
    });
    let id = server.push(json!("all")).await;
    stalled.await.unwrap();
    // Killed: every task of its runtime dropped where it stood, its rows not all written.
    doomed.shutdown_background();
    let before = server
        .store
        .push(id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    // Rows are written every 500 devices (or quarter second): those of the sends under
    // way cannot have been.
    let unwritten = before.counts.pending.unwrap();
    assert!(unwritten >= 4, "{before:?}");

    let _survivor = server.workers(options);
    let message = server.finished(&id).await;
    assert_eq!(message["state"], "done", "{message}");
    assert_eq!(message["counts"]["accepted"], 200, "{message}");

    let rows = server.rows(&id, "").await;
    assert_eq!(rows.len(), 200, "exactly one row per device");
    let mut copies_beyond_one = 0;
    let mut marked = 0;
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    for row in &rows {
        let device = row["registration_id"].as_str().unwrap();
        assert!(by_id.insert(device, row).is_none(), "{device} twice");
        let copies = server.emulator.inbox(device).len() as u64;
        let possible = row["possible_duplicates"].as_u64().unwrap();
        assert!(copies >= 1, "{device}: accepted, so delivered");
        assert!(
            copies <= 1 + possible,
            "{device}: {copies} copies, but only {possible} possible duplicates in {row}"
        );
        copies_beyond_one += copies - 1;
        marked += possible;
    }
    // The sends under way when the worker died (4, one per slot) reached the emulator and
    // were sent again: second copies, each marked. So were the sends answered whose rows
    // were not written yet; and no device with a row before the kill was marked.
    assert!(copies_beyond_one >= 4, "{copies_beyond_one}");
    assert!(copies_beyond_one <= marked);
    assert!(
        marked <= unwritten,
        "{marked} marked, {unwritten} without a row"
    );
}

async fn a_cancel_stops_a_batch_under_way(db: Db) {
    let options = WorkerOptions {
        workers: 1,
        concurrency: 2,
        batch_size: 300,
        ..WorkerOptions::default()
    };
    let server = Server::start_with(db, |_| {}, &options).await;
    register_phones(&server, 300).await;
    // Sends after the 20th are held, so the batch is surely under way when the cancel
    // comes; released, they fail unsent, and their retries wait until the cancel ends it.
    let (reached, held) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let sender = server.sender_over(passing(20, reached, Then::HoldUntil(released)));
    let _workers = server.workers_with(sender, options);
    let id = server.push(json!("all")).await;
    held.await.unwrap();
    let (status, _) = server
        .call(
            "POST",
            &format!("/v1/pushes/{id}/cancel"),
            common::ADMIN,
            None,
        )
        .await;
    assert_eq!(status, http::StatusCode::OK);
    release.send(true).unwrap();
    let message = server.finished(&id).await;
    assert_eq!(message["state"], "cancelled", "{message}");
    let counts = &message["counts"];
    assert_eq!(counts["accepted"], 20, "{message}");
    // Each of the two slots may take one device more before the cancel reaches it; the
    // rest are never tried.
    let cancelled = counts["not_attempted"]["cancelled"].as_u64().unwrap_or(0);
    assert!(cancelled >= 300 - 20 - 4, "{message}");
    assert_eq!(server.rows(&id, "").await.len(), 300);
    assert_eq!(server.emulator.counters().accepted, 20);
}

/// `inner`, counting its requests under way: the most at once goes to `peak`.
fn counting(
    inner: impl c2dm_core::Transport + 'static,
    peak: Arc<std::sync::atomic::AtomicUsize>,
) -> impl c2dm_core::Transport + 'static {
    use std::sync::atomic::Ordering::SeqCst;
    let inner = Arc::new(inner);
    let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    move |request: http::Request<Bytes>| {
        let (inner, now, peak) = (Arc::clone(&inner), Arc::clone(&now), Arc::clone(&peak));
        async move {
            peak.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
            let answer = c2dm_core::Transport::execute(&*inner, request).await;
            now.fetch_sub(1, SeqCst);
            answer
        }
    }
}

/// How many batches of push `push_id` have marked sends, read from the database itself.
async fn batches_marked(server: &Server, db: Db, push_id: i64) -> i64 {
    use sqlx::Connection;
    const MARKED: &str = "SELECT COUNT(*) FROM batch_marks WHERE push_id = $1 AND sent_through > 0";
    let url = &server.database.url;
    match db {
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            let query = sqlx::query_scalar(MARKED).bind(push_id);
            query.fetch_one(&mut conn).await.unwrap()
        }
        Db::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            let query = sqlx::query_scalar(MARKED).bind(push_id);
            query.fetch_one(&mut conn).await.unwrap()
        }
    }
}

async fn a_worker_readies_its_next_batch_but_sends_no_more_at_once(db: Db) {
    // One batch sending at once, two sends each: three batches of ten.
    let options = WorkerOptions {
        workers: 1,
        concurrency: 2,
        batch_size: 10,
        ..WorkerOptions::default()
    };
    let server = Server::start_with(db, |_| {}, &options).await;
    register_phones(&server, 30).await;
    let (reached, held) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let transport = counting(
        passing(3, reached, Then::HoldThenForward(released)),
        Arc::clone(&peak),
    );
    let _workers = server.workers_with(server.sender_over(transport), options);
    let id = server.push(json!("all")).await;
    let push_id: i64 = id.parse().unwrap();
    // The first batch's sends are held after the third.
    held.await.unwrap();
    // The next batch is readied meanwhile (its first sends marked: it has a mark of its
    // own), and waits: nothing of it is sent. Each look yields to the workers; none sleeps.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while batches_marked(&server, db, push_id).await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no second batch readied"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(server.emulator.counters().accepted, 3);
    assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 2);

    release.send(true).unwrap();
    let message = server.finished(&id).await;
    assert_eq!(message["counts"]["accepted"], 30, "{message}");
    // Never more than one batch's sends at once, and each device sent to once.
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 2);
    for i in 0..30 {
        let device = format!("phone-{i:03}");
        assert_eq!(server.emulator.inbox(&device).len(), 1, "{device}");
    }
}

async fn a_spent_daily_budget_leaves_the_rest_for_tomorrow_unsent(db: Db) {
    let options = WorkerOptions {
        daily_budget: Some(10),
        batch_size: 30,
        ..WorkerOptions::default()
    };
    let server = Server::start_with(db, |_| {}, &options).await;
    register_phones(&server, 30).await;
    let _workers = server.workers(options);
    let id = server.push(json!("all")).await;
    let message = server.until(&id, |m| m["counts"]["accepted"] == 10).await;
    assert_eq!(message["state"], "sending", "{message}");
    assert_eq!(message["counts"]["pending"], 20, "{message}");
    // The 20 others wait, unsent and without a row, in a batch due tomorrow.
    let (_, batches) = server.queues.depth().await.unwrap();
    assert!(batches >= 1, "a batch waits for tomorrow");
    assert_eq!(server.rows(&id, "").await.len(), 10);
    assert_eq!(server.emulator.counters().accepted, 10);

    // The budget is the account's, not the push's: the next push gets nothing today.
    let next = server
        .push(json!({"registration_ids": ["phone-000"]}))
        .await;
    let message = server.until(&next, |m| m["total"] == 1).await;
    assert_eq!(message["counts"]["pending"], 1, "{message}");
    assert_eq!(server.emulator.counters().accepted, 10);
}

async fn each_provider_account_has_a_daily_budget_of_its_own(db: Db) {
    let options = WorkerOptions {
        daily_budget: Some(10),
        batch_size: 40,
        ..WorkerOptions::default()
    };
    let server = Server::start_with(db, |_| {}, &options).await;
    register_phones(&server, 15).await;
    for i in 0..15 {
        let body = json!({"registration_id": format!("fcm-{i:03}"), "provider": "fcm"});
        let (status, body) = server
            .call("POST", "/v1/devices", common::DEVICE, Some(body))
            .await;
        assert_eq!(status, http::StatusCode::CREATED, "{body}");
    }
    let senders = c2dm_server::jobs::Senders {
        c2dm: Some(server.sender_over(c2dm_hyper::HyperTransport::new().unwrap())),
        fcm: Some(server.fcm_sender()),
    };
    let _workers = server.workers_with(senders, options);
    let id = server.push(json!("all")).await;
    // Ten through C2DM's account and ten through the FCM project's: the budget of one is
    // not spent by the other.
    let message = server.until(&id, |m| m["counts"]["accepted"] == 20).await;
    assert_eq!(message["state"], "sending", "{message}");
    assert_eq!(message["counts"]["pending"], 10, "{message}");
    let stats = server.emulator.stats();
    assert_eq!(stats.fcm.accepted, 10, "{stats:?}");
    assert_eq!(server.emulator.counters().accepted, 10, "{stats:?}");
}

async fn a_walk_that_died_goes_on_where_it_was_and_enqueues_no_page_twice(db: Db) {
    let options = WorkerOptions {
        batch_size: 3,
        ..WorkerOptions::default()
    };
    let server = Server::start_with(db, |_| {}, &options).await;
    let ids: Vec<String> = (0..10).map(|i| format!("phone-{i:03}")).collect();
    for id in &ids {
        server.register(id, None, &["walked"]).await;
    }
    let id = server.push(json!({ "tag": "walked" })).await;
    let push_id: i64 = id.parse().unwrap();
    // A walker enqueued the first page, then died: the walk is past its third device.
    let store = &server.store;
    let audience = Audience::Tag {
        tag: "walked".into(),
    };
    let page = store.audience_page(&audience, None, 3).await.unwrap();
    let (to, first) = (page.next.unwrap(), &ids[..3]);
    assert!(
        store
            .walk_page(push_id, None, to, first, None)
            .await
            .unwrap()
    );
    // A second walker that read the walk before that cannot enqueue the page again.
    assert!(
        !store
            .walk_page(push_id, None, to, first, None)
            .await
            .unwrap()
    );
    let record = store.push(push_id).await.unwrap().unwrap();
    assert_eq!((record.walk_after, record.walked), (Some(to), 3));

    // The push's own job (stored with the push) goes on from there.
    let _workers = server.workers(options);
    let message = server.finished(&id).await;
    assert_eq!(message["total"], 10, "{message}");
    assert_eq!(message["counts"]["accepted"], 10, "{message}");
    for device in &ids {
        assert_eq!(server.emulator.inbox(device).len(), 1, "{device}");
    }
}

/// A device of a walked page that stops being active before its batch runs is not sent to,
/// and gets a row that says why; a device not active in the same range of the registry but
/// not in the audience gets no row at all.
async fn a_device_that_stops_being_active_after_the_walk_is_not_sent_to(db: Db) {
    let options = WorkerOptions {
        batch_size: 2,
        ..WorkerOptions::default()
    };
    let server = Server::start_with(db, |_| {}, &options).await;
    // Bob has the even phones, Alice the odd ones.
    for i in 0..8 {
        let user = if i % 2 == 0 { "bob" } else { "alice" };
        server
            .register(&format!("phone-{i:03}"), Some(user), &[])
            .await;
    }
    let id = server.push(json!({ "user_id": "bob" })).await;
    let push_id: i64 = id.parse().unwrap();
    // A walker enqueued the first page (phone-000 and phone-002, with phone-001 between them
    // in the registry), as the push's job does…
    let store = &server.store;
    let audience = Audience::User {
        user_id: "bob".into(),
    };
    let page = store.audience_page(&audience, None, 2).await.unwrap();
    let ids: Vec<String> = page.items.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids, ["phone-000", "phone-002"]);
    let positions = Positions {
        after: 0,
        through: page.items[1].0,
    };
    let to = page.next.unwrap();
    assert!(
        store
            .walk_page(push_id, None, to, &ids, Some(positions))
            .await
            .unwrap()
    );
    // The page's devices are kept as the database's first list, which the queue's job names.
    let list = store.batch_list(1).await.unwrap().expect("the page's list");
    assert_eq!(list.registration_ids, ids);
    assert_eq!(list.positions, Some(positions));
    // …then, before any worker took the batch, phone-002 and Alice's phone-001 unregistered.
    for phone in ["phone-001", "phone-002"] {
        let (status, body) = server
            .call(
                "DELETE",
                &format!("/v1/devices/{phone}"),
                common::DEVICE,
                None,
            )
            .await;
        assert_eq!(status, http::StatusCode::OK, "{body}");
    }
    let named = [
        "phone-000",
        "phone-001",
        "phone-002",
        "phone-004",
        "phone-006",
    ]
    .map(String::from);
    let inactive = store
        .inactive_devices(&named, Some(positions))
        .await
        .unwrap();
    assert_eq!(
        inactive,
        [
            ("phone-001".to_owned(), DeviceState::Unregistered),
            ("phone-002".to_owned(), DeviceState::Unregistered)
        ],
        "the range's inactive devices that are named"
    );

    let _workers = server.workers(options);
    let message = server.finished(&id).await;
    assert_eq!(message["total"], 4, "{message}");
    assert_eq!(message["counts"]["accepted"], 3, "{message}");
    assert_eq!(
        message["counts"]["not_attempted"]["unregistered"], 1,
        "{message}"
    );
    let rows = server.rows(&id, "").await;
    let devices: Vec<&str> = rows
        .iter()
        .map(|row| row["registration_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        devices,
        ["phone-000", "phone-002", "phone-004", "phone-006"]
    );
    assert!(server.emulator.inbox("phone-002").is_empty());
    assert!(server.emulator.inbox("phone-001").is_empty());
    assert_eq!(server.emulator.inbox("phone-000").len(), 1);
    // The push is done: its lists are gone with it.
    assert_eq!(store.batch_list(1).await.unwrap(), None);
}

async fn a_batch_mark_only_grows_is_its_own_and_goes_with_its_push(db: Db) {
    let options = WorkerOptions::default();
    let server = Server::start_with(db, |_| {}, &options).await;
    let id = server
        .push(json!({ "registration_ids": ["phone-000"] }))
        .await;
    let push_id: i64 = id.parse().unwrap();
    let store = &server.store;
    let first = store.claim_batch(push_id, "b1").await.unwrap();
    assert_eq!((first.run, first.marked_through), (1, 0));
    assert!(store.mark_sending(push_id, &first, 5).await.unwrap());
    // A late mark of a slot that lagged behind does not move it back.
    assert!(store.mark_sending(push_id, &first, 3).await.unwrap());
    let other = store.claim_batch(push_id, "b2").await.unwrap();
    assert_eq!((other.run, other.marked_through), (1, 0));
    // Run again (its worker taken for dead): the new run reads the mark, and the first can
    // neither mark nor record any more.
    let second = store.claim_batch(push_id, "b1").await.unwrap();
    assert_eq!((second.run, second.marked_through), (2, 5));
    assert_eq!(second.sending_runs, 1, "one run marked, twice");
    assert!(!store.mark_sending(push_id, &first, 9).await.unwrap());
    let row = DeliveryRow::not_attempted("phone-000", "cancelled", std::time::SystemTime::now());
    assert!(
        !store
            .record_batch(push_id, &first, std::slice::from_ref(&row), &[])
            .await
            .unwrap()
    );
    assert!(
        store
            .recorded(push_id, &["phone-000".into()])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.mark_sending(push_id, &second, 9).await.unwrap());
    let third = store.claim_batch(push_id, "b1").await.unwrap();
    assert_eq!((third.marked_through, third.sending_runs), (9, 2));

    let _workers = server.workers(options);
    let message = server.finished(&id).await;
    assert_eq!(message["counts"]["accepted"], 1, "{message}");
    // The push's marks went with it: a run after that claims nothing (it would leave a mark
    // behind for good), is told the push is finished (so it neither sends nor skips the row
    // check of a first run), and records nothing.
    let late = store.claim_batch(push_id, "b1").await.unwrap();
    assert_eq!(
        (late.run, late.marked_through, late.sending_runs),
        (0, 0, 0)
    );
    assert!(late.finished, "{late:?}");
    assert!(
        !store
            .record_batch(push_id, &late, std::slice::from_ref(&row), &[])
            .await
            .unwrap(),
        "a run that claimed nothing records nothing"
    );
    // No mark was left: a claim after it finds none either (one left behind would have
    // counted this one as run 1, and the next as run 2).
    let later = store.claim_batch(push_id, "b1").await.unwrap();
    assert_eq!((later.run, later.finished), (0, true), "{later:?}");
    assert!(!store.mark_sending(push_id, &later, 1).await.unwrap());
    let message = server.store.push(push_id).await.unwrap().unwrap();
    assert_eq!(message.tally.recorded(), 1, "the row it had is kept");
    assert_eq!(message.tally.accepted, 1, "{message:?}");
}

/// Pushes to `ids` through the API: the push's id, as the store keys it.
async fn push_to(server: &Server, ids: &[&str]) -> i64 {
    let id = server.push(json!({ "registration_ids": ids })).await;
    id.parse().unwrap()
}

/// A row of one attempt for `device`, written now.
fn row(device: &str, outcome: OutcomeKind, error: Option<&str>) -> DeliveryRow {
    DeliveryRow {
        registration_id: device.into(),
        outcome,
        message_id: None,
        error: error.map(Into::into),
        attempts: 1,
        possible_duplicates: 0,
        at: std::time::SystemTime::now(),
    }
}

/// A batch whose rows finish its push (its last flush wrote them all) ends with a last write
/// of nothing: the push's marks are gone by then, and that is not taken for a takeover. A
/// waiter for the push hears of its end, and of no write before.
async fn a_batch_that_finished_its_push_is_not_taken_for_taken_over(db: Db) {
    let server = Server::start(db).await;
    let push_id = push_to(&server, &["phone-a", "phone-b", "phone-c"]).await;
    let store = &server.store;
    let (changes, finishes) = (store.changes(), store.finishes());
    store.finish_walk(push_id, 3).await.unwrap();
    let run = store.claim_batch(push_id, "b1").await.unwrap();
    let first = [row("phone-a", OutcomeKind::Accepted, None)];
    assert!(
        store
            .record_batch(push_id, &run, &first, &[])
            .await
            .unwrap()
    );
    assert!(changes.has_changed().unwrap(), "a write is a change");
    assert!(
        !finishes.has_changed().unwrap(),
        "a write that leaves a row to come is no end"
    );
    let rows = ["phone-b", "phone-c"].map(|device| row(device, OutcomeKind::Accepted, None));
    assert!(store.record_batch(push_id, &run, &rows, &[]).await.unwrap());
    assert!(
        finishes.has_changed().unwrap(),
        "the last rows end the push"
    );
    let message = store.push(push_id).await.unwrap().unwrap();
    assert_eq!(message.state, PushState::Done, "{message:?}");
    assert_eq!(message.tally.accepted, 3, "{message:?}");
    assert!(
        store
            .finish_batch(push_id, &run, &[], &[], &[])
            .await
            .unwrap(),
        "the last write of the run that finished the push is not refused"
    );
    // A run that still had rows to write, with the marks gone, is refused as before.
    let stale = DeliveryRow::not_attempted("phone-c", "cancelled", std::time::SystemTime::now());
    assert!(
        !store
            .record_batch(push_id, &run, &[stale], &[])
            .await
            .unwrap()
    );
}

/// A run's last write puts the devices left for later back once, with its rows, and finishes
/// the batch: a stale run's is refused, and a run after it finds nothing to do.
async fn a_finished_batch_puts_back_once_and_is_not_run_again(db: Db) {
    let server = Server::start(db).await;
    let push_id = push_to(&server, &["phone-000", "phone-001"]).await;
    let store = &server.store;
    let batches = || async { server.queues.depth().await.unwrap().1 };
    assert_eq!(batches().await, 1, "the push's one batch, enqueued with it");
    let now = std::time::SystemTime::now();
    let row = DeliveryRow::not_attempted("phone-000", "cancelled", now);
    let later = [(
        BatchJob {
            push_id,
            registration_ids: vec!["phone-001".into()],
            possibly_sent: vec!["phone-001".into()],
            positions: None,
            list: None,
        },
        now + Duration::from_secs(86_400),
    )];
    let stale = store.claim_batch(push_id, "b1").await.unwrap();
    let latest = store.claim_batch(push_id, "b1").await.unwrap();
    assert!(
        !store
            .finish_batch(push_id, &stale, std::slice::from_ref(&row), &[], &later)
            .await
            .unwrap()
    );
    assert_eq!(batches().await, 1, "a stale run puts nothing back");
    assert!(
        store
            .finish_batch(push_id, &latest, std::slice::from_ref(&row), &[], &later)
            .await
            .unwrap()
    );
    assert_eq!(
        batches().await,
        2,
        "the run's devices left for later, put back once"
    );
    assert_eq!(
        store
            .recorded(push_id, &["phone-000".into(), "phone-001".into()])
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store.claim_batch(push_id, "b1").await.unwrap().finished);
}

/// A batch recorded again (its worker died after the commit, before the queue heard) writes
/// no row twice, and its push's tally counts each row once, whichever write meets the rows.
async fn a_batch_recorded_twice_is_counted_once(db: Db) {
    let server = Server::start(db).await;
    let push_id = push_to(&server, &["phone-a", "gone-b", "phone-c"]).await;
    let run = server.store.claim_batch(push_id, "b1").await.unwrap();
    let first = [
        row("phone-a", OutcomeKind::Accepted, None),
        row("gone-b", OutcomeKind::Rejected, Some("NotRegistered")),
    ];
    for _ in 0..2 {
        server
            .store
            .record_batch(push_id, &run, &first, &[])
            .await
            .unwrap();
    }
    // Again as the run's last write, with one row new and one that differs from the one kept.
    let second = [
        row("phone-a", OutcomeKind::Failed, Some("later")),
        row("phone-c", OutcomeKind::NotAttempted, Some("cancelled")),
    ];
    assert!(
        server
            .store
            .finish_batch(push_id, &run, &second, &[], &[])
            .await
            .unwrap()
    );
    let message = server.store.push(push_id).await.unwrap().unwrap();
    assert_eq!(
        message.tally,
        OutcomeTally {
            accepted: 1,
            rejected: 1,
            failed: 0,
            not_attempted: 1
        }
    );
    assert_eq!(message.counts.accepted, 1);
    assert_eq!(message.counts.rejected["NotRegistered"], 1);
    assert_eq!(message.counts.failed, 0);
}

async fn budget_reservations_never_exceed_the_day_together(db: Db) {
    let database = db.fresh().await;
    let (store, _) = open_database(&database.url, &WorkerOptions::default())
        .await
        .unwrap();
    // 40 reservations of 7 at once against a budget of 100: 100 granted, not one more.
    let grants = futures::future::join_all((0..40).map(|_| {
        let store = store.clone();
        async move {
            store
                .reserve_budget("acct", 20_000, 100, 7)
                .await
                .unwrap()
                .granted
        }
    }))
    .await;
    assert_eq!(grants.iter().sum::<u64>(), 100, "{grants:?}");
    // What is given back can be reserved again, the same day only; a new day starts at 0.
    store.release_budget("acct", 20_000, 30).await.unwrap();
    assert_eq!(
        store
            .reserve_budget("acct", 20_000, 100, 50)
            .await
            .unwrap()
            .granted,
        30
    );
    store.release_budget("acct", 19_999, 30).await.unwrap();
    assert_eq!(
        store
            .reserve_budget("acct", 20_000, 100, 50)
            .await
            .unwrap()
            .granted,
        0
    );
    assert_eq!(
        store.reserve_budget("acct", 20_001, 100, 50).await.unwrap(),
        Reservation {
            granted: 50,
            left: 50
        }
    );
    // Another account has its own budget.
    assert_eq!(
        store.reserve_budget("other", 20_001, 100, 5).await.unwrap(),
        Reservation {
            granted: 5,
            left: 95
        }
    );
}

/// Moves every queued job's due time by `seconds` (earlier when negative), in whichever
/// database the store is on.
async fn shift_jobs(store: &c2dm_server::store::Store, seconds: i64) {
    if let Some(pool) = store.sqlite_pool() {
        sqlx::query("UPDATE Jobs SET run_at = run_at + $1")
            .bind(seconds)
            .execute(pool)
            .await
            .unwrap();
    }
    if let Some(pool) = store.postgres_pool() {
        sqlx::query("UPDATE apalis.jobs SET run_at = run_at + make_interval(secs => $1)")
            .bind(seconds as f64)
            .execute(pool)
            .await
            .unwrap();
    }
}

async fn the_oldest_due_job_s_age_counts_only_jobs_due(db: Db) {
    let server = Server::start(db).await;
    let queues = &server.queues;
    assert_eq!(
        queues.oldest_due().await.unwrap(),
        (Duration::ZERO, Duration::ZERO)
    );
    // A push's job, no worker to take it, made as if two minutes ago.
    server.register("phone-1", None, &[]).await;
    server.push(json!("all")).await;
    shift_jobs(&server.store, -120).await;
    let (pushes, batches) = queues.oldest_due().await.unwrap();
    assert!(
        pushes >= Duration::from_secs(120) && pushes < Duration::from_secs(600),
        "{pushes:?}"
    );
    assert_eq!(batches, Duration::ZERO);
    // The same job due in an hour (as a batch left for the budget's next period is) waits,
    // but is not late.
    shift_jobs(&server.store, 3720).await;
    assert_eq!(
        queues.oldest_due().await.unwrap(),
        (Duration::ZERO, Duration::ZERO)
    );
}

async fn an_accounts_pause_is_extended_never_shortened(db: Db) {
    let database = db.fresh().await;
    let (store, _) = open_database(&database.url, &WorkerOptions::default())
        .await
        .unwrap();
    assert_eq!(store.shared_pause("acct").await.unwrap(), None);
    let now = std::time::SystemTime::now();
    let later = now + Duration::from_secs(120);
    store
        .pause_account("acct", later, Some("503 Service Unavailable"))
        .await
        .unwrap();
    // A shorter pause changes neither the end nor the reason.
    store
        .pause_account("acct", now + Duration::from_secs(60), Some("shorter"))
        .await
        .unwrap();
    let until = store.shared_pause("acct").await.unwrap().unwrap();
    let off = until.duration_since(later).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_millis(2), "{until:?} vs {later:?}");
    assert_eq!(store.shared_pause("other").await.unwrap(), None);
    // A pause that has ended is no pause, and has no reason.
    store
        .pause_account("past", now - Duration::from_secs(1), Some("gone by"))
        .await
        .unwrap();
    let accounts = store.accounts().await.unwrap();
    let names: Vec<_> = accounts.iter().map(|a| a.account.as_str()).collect();
    assert_eq!(names, ["acct", "past"]);
    assert_eq!(
        accounts[0].pause_reason.as_deref(),
        Some("503 Service Unavailable")
    );
    assert!(accounts[0].paused_until.is_some());
    assert_eq!(
        (
            accounts[1].paused_until,
            accounts[1].pause_reason.as_deref()
        ),
        (None, None)
    );
    // A longer pause without a reason of its own keeps the one it extends.
    store
        .pause_account("acct", later + Duration::from_secs(60), None)
        .await
        .unwrap();
    let accounts = store.accounts().await.unwrap();
    assert_eq!(
        accounts[0].pause_reason.as_deref(),
        Some("503 Service Unavailable")
    );
    assert_eq!(store.shared_pause("past").await.unwrap(), None);
}

/// On PostgreSQL a process learns at once of a cancel (or an end) that another process wrote:
/// the database tells every store listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_s_cancel_reaches_this_one_s_watchers_on_postgres() {
    let database = Db::Postgres.fresh().await;
    let options = WorkerOptions::default();
    let (here, _) = open_database(&database.url, &options).await.unwrap();
    let (there, _) = open_database(&database.url, &options).await.unwrap();
    let made = there
        .create_push(&c2dm_server::store::NewPush {
            idempotency_key: None,
            audience: c2dm_server::store::Audience::All(c2dm_server::store::Everyone::All),
            collapse_key: "k".into(),
            data: Vec::new(),
            delay_while_idle: false,
        })
        .await
        .unwrap()
        .1;
    let (mut finishes, mut cancels) = (here.finishes(), here.cancels());
    finishes.borrow_and_update();
    cancels.borrow_and_update();
    there.request_cancel(made.id).await.unwrap();
    // Bounded, never slept: the news comes within a moment.
    let told = tokio::time::timeout(Duration::from_secs(10), async {
        finishes.changed().await.unwrap();
        cancels.changed().await.unwrap();
    })
    .await;
    assert!(
        told.is_ok(),
        "this process never heard of the other's cancel"
    );
}

on_each_database!(
    a_worker_killed_mid_batch_leaves_its_batch_to_another,
    a_cancel_stops_a_batch_under_way,
    a_worker_readies_its_next_batch_but_sends_no_more_at_once,
    a_spent_daily_budget_leaves_the_rest_for_tomorrow_unsent,
    each_provider_account_has_a_daily_budget_of_its_own,
    a_walk_that_died_goes_on_where_it_was_and_enqueues_no_page_twice,
    a_device_that_stops_being_active_after_the_walk_is_not_sent_to,
    a_batch_mark_only_grows_is_its_own_and_goes_with_its_push,
    a_batch_recorded_twice_is_counted_once,
    a_batch_that_finished_its_push_is_not_taken_for_taken_over,
    a_finished_batch_puts_back_once_and_is_not_run_again,
    budget_reservations_never_exceed_the_day_together,
    an_accounts_pause_is_extended_never_shortened,
    the_oldest_due_job_s_age_counts_only_jobs_due,
);

/// Processes started at once on a fresh SQLite file all open it: one of them creates the
/// tables (the store's and the queues'), the others find them made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_started_at_once_on_a_fresh_sqlite_file_all_open_it() {
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c2dm.db").display());
        let options = WorkerOptions::default();
        let opened = futures::future::join_all((0..4).map(|_| open_database(&url, &options))).await;
        for result in opened {
            assert!(result.is_ok(), "round {round}: {:?}", result.err());
        }
    }
}
