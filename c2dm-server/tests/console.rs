//! The operator's console in a real browser: Debian's headless Chromium, driven through
//! chromedriver (WebDriver, with fantoccini), against a real server on a SQLite file with its
//! workers and the emulator standing in for C2DM.
//!
//! Waits happen in the page: a condition is checked there until it holds (bounded by the
//! WebDriver script timeout), never by a sleep here. Each main screen is kept as a PNG in
//! `target/console-screenshots/`.

#[macro_use]
mod common;
mod browser;

use browser::{Page, Session};
use c2dm_server::jobs::{WorkerOptions, run_workers};
use serde_json::{Value, json};

use common::{ADMIN, DEVICE, Db, Server};

/// Workers of this process that can be stopped and waited for.
struct Workers {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), c2dm_server::jobs::JobError>>,
}

fn workers(server: &Server) -> Workers {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sender = server.sender_over(c2dm_hyper::HyperTransport::new().unwrap());
    let done = tokio::spawn(run_workers(
        server.store.clone(),
        sender,
        server.queues.clone(),
        WorkerOptions {
            batch_size: 7,
            ..WorkerOptions::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Workers { stop, done }
}

impl Workers {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.done
            .await
            .expect("the workers stop")
            .expect("without an error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_filters_sends_and_cancels_in_a_real_browser() {
    let server = Server::start(Db::Sqlite).await;
    // 24 phones of two users, 4 gone at C2DM, 2 with ids C2DM calls invalid; a few tagged.
    for i in 0..30 {
        let id = match i {
            0..24 => format!("phone-{i:02}"),
            24..28 => format!("gone-{i:02}"),
            _ => format!("bad-{i:02}"),
        };
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        let tags: &[&str] = if i % 5 == 0 { &["beta"] } else { &[] };
        server.register(&id, Some(user), tags).await;
    }
    let session = Session::open(server.app.clone()).await;
    let (page, base) = (&session.page, session.base.as_str());

    // A wrong token, then the device key: each told apart, nothing shown.
    page.client.goto(&format!("{base}/")).await.unwrap();
    page.fill("#token", "not-the-token").await;
    page.click("#login-button").await;
    page.until("document.querySelector('#login-error').innerText.includes('not accepted')")
        .await;
    assert!(
        page.text("#login-error").await.contains("not accepted"),
        "{}",
        page.text("#login-error").await
    );
    page.fill("#token", DEVICE).await;
    page.click("#login-button").await;
    page.until("document.querySelector('#login-error').innerText.includes('device key')")
        .await;
    let hidden = page
        .client
        .execute(
            "return ['#messages-view', '#nav'].every(s => document.querySelector(s).offsetParent === null);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hidden, json!(true), "nothing but the login is shown");
    page.screenshot("login-refused").await;

    // Logged in: a push made while no worker runs waits queued, then goes to done.
    page.fill("#token", ADMIN).await;
    page.click("#login-button").await;
    page.shown("#messages-view").await;
    let first = server.push(json!("all")).await;
    let card = format!("[data-message='{first}']");
    page.until(&format!(
        "document.querySelector(\"{card}[data-state='queued']\")"
    ))
    .await;
    let running = workers(&server);
    page.until(&format!(
        "document.querySelector(\"{card}[data-state='done']\")"
    ))
    .await;
    let legend = page.text(&format!("{card} .legend")).await;
    assert!(
        legend.contains("accepted 24")
            && legend.contains("rejected 6")
            && legend.contains("pending 0"),
        "{legend}"
    );
    page.screenshot("pushes").await;

    // Its deliveries, filtered to NotRegistered.
    page.click(&format!("{card} h3 a")).await;
    page.shown("#message-counts tr[data-code='NotRegistered']")
        .await;
    let counts = page.rows("#message-counts tbody tr").await;
    assert!(
        counts.contains(&vec!["rejected".into(), "NotRegistered".into(), "4".into()]),
        "{counts:?}"
    );
    page.until("document.querySelectorAll('#deliveries tbody tr').length === 30")
        .await;
    page.select("#filter-outcome", "rejected").await;
    page.select("#filter-error", "NotRegistered").await;
    page.click("#filter-apply").await;
    page.until("document.querySelectorAll('#deliveries tbody tr').length === 4")
        .await;
    let rows = page.rows("#deliveries tbody tr").await;
    let devices: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(devices, ["gone-24", "gone-25", "gone-26", "gone-27"]);
    assert!(
        rows.iter()
            .all(|r| r[1] == "rejected" && r[2] == "NotRegistered"),
        "{rows:?}"
    );
    page.screenshot("push-not-registered").await;

    // One of them: gone, with its history.
    page.click("#deliveries tbody tr a").await;
    page.shown("#device-history tbody tr").await;
    assert!(
        page.text("#device-facts")
            .await
            .contains("gone (NotRegistered)")
    );
    let history = page.rows("#device-history tbody tr").await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0][0], format!("Push {first}"));
    page.screenshot("device").await;

    // Devices by state, and a search by user.
    page.click("#nav-devices").await;
    page.shown("#device-counts dd[data-count='gone']").await;
    page.until(
        "document.querySelector('#device-counts dd[data-count=\"gone\"]').innerText === '6'",
    )
    .await;
    assert_eq!(
        page.text("#device-counts dd[data-count='active']").await,
        "24"
    );
    page.select("#search-by", "user_id").await;
    page.fill("#search-text", "bob").await;
    page.click("#search-button").await;
    page.until("document.querySelectorAll('#device-results tbody tr').length === 15")
        .await;
    let found = page.rows("#device-results tbody tr").await;
    assert!(found.iter().all(|r| r[1] == "C2DM"), "{found:?}");
    page.screenshot("devices").await;

    // A push from the form, to a tag: the confirmation says how many devices it reaches.
    page.click("#nav-send").await;
    page.click("input[name=audience][value=tag]").await;
    page.fill("#send-target", "beta").await;
    page.fill("#send-collapse-key", "promo").await;
    page.fill("#send-data", "text=hello beta\nlevel=3").await;
    page.click("#send-review").await;
    page.shown("#send-confirm").await;
    let confirm = page.text("#confirm-facts").await;
    // Tagged: phone-00, 05, 10, 15 and 20, and gone-25, which is gone by now. The review
    // shows all it sends: audience, collapse key, payload, delay_while_idle.
    for shown in [
        "5 active devices of tag beta",
        "promo",
        "text=hello beta",
        "level=3",
        "delay_while_idle",
    ] {
        assert!(confirm.contains(shown), "{shown:?} in {confirm}");
    }
    // Under a thousand devices of a tag: no number to type.
    let typed_hidden = page
        .client
        .execute(
            "return document.querySelector('#confirm-typed').hidden;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(typed_hidden, json!(true));
    page.screenshot("send-confirm").await;
    page.click("#confirm-send").await;
    page.until(
        "location.hash.startsWith('#/pushes/') \
         && !document.querySelector('#message-view').hidden \
         && document.querySelector('#message-title').innerText === `Push ${location.hash.split('/')[2]}` \
         && document.querySelector('#message-facts dd[data-fact=\"state\"]')?.innerText === 'done'",
    )
    .await;
    let sent = page
        .client
        .execute("return location.hash.split('/')[2];", vec![])
        .await
        .unwrap();
    let sent = sent.as_str().unwrap().to_owned();
    let (_, message) = server
        .call("GET", &format!("/v1/pushes/{sent}"), ADMIN, None)
        .await;
    assert_eq!(message["to"], json!({"tag": "beta"}), "{message}");
    assert_eq!(message["collapse_key"], "promo");
    assert_eq!(message["total"], 5);
    assert_eq!(message["counts"]["accepted"], 5, "{message}");
    let last = server.emulator.inbox("phone-05").pop().expect("a message");
    assert_eq!(last.collapse_key, "promo");
    assert_eq!(
        last.data,
        [
            ("level".into(), "3".into()),
            ("text".into(), "hello beta".into())
        ]
    );

    // The next push starts from an empty form: every active device, no payload.
    page.click("#nav-send").await;
    let form: Value = page
        .client
        .execute(
            "return [document.querySelector('input[name=audience]:checked').value, \
             document.querySelector('#send-target').value, \
             document.querySelector('#send-collapse-key').value, \
             document.querySelector('#send-data').value];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(form, json!(["all", "", "", ""]));
    // A tag with no active device: refused before the review.
    page.click("input[name=audience][value=tag]").await;
    page.fill("#send-target", "nobody").await;
    page.fill("#send-collapse-key", "void").await;
    page.click("#send-review").await;
    page.until("document.querySelector('#send-error')?.innerText.includes('reach no one')")
        .await;
    // Every device: Send waits for the audience's size, typed.
    page.click("input[name=audience][value=all]").await;
    page.click("#send-review").await;
    page.shown("#confirm-count").await;
    assert!(page.text("#confirm-typed").await.contains("24 devices"));
    let send_enabled = "return !document.querySelector('#confirm-send').disabled;";
    let enabled = |page: &Page| {
        let client = page.client.clone();
        async move { client.execute(send_enabled, vec![]).await.unwrap() }
    };
    assert_eq!(enabled(page).await, json!(false));
    page.fill("#confirm-count", "23").await;
    assert_eq!(enabled(page).await, json!(false));
    page.fill("#confirm-count", "24").await;
    assert_eq!(enabled(page).await, json!(true));
    page.screenshot("send-typed-confirmation").await;
    page.click("#confirm-back").await;

    // A push cancelled from its card before any worker took it: every device still gets
    // its row, and none is sent to.
    running.stop().await;
    let sent_before = server.emulator.counters().sends;
    page.click("#nav-messages").await;
    let doomed = server.push(json!("all")).await;
    let card = format!("[data-message='{doomed}']");
    // A running push's page says how long it has run, at what rate, and what is left; each
    // view has a title of its own.
    page.click(&format!("{card} h3 a")).await;
    page.shown("#message-facts dd[data-fact='time left']").await;
    for fact in ["elapsed", "rate", "time left"] {
        let text = page
            .text(&format!("#message-facts dd[data-fact='{fact}']"))
            .await;
        assert!(!text.is_empty(), "{fact}");
    }
    page.until(&format!(
        "document.title === 'Push {doomed} · c2dm console'"
    ))
    .await;
    page.click("#nav-messages").await;
    page.until("document.title === 'Pushes · c2dm console'")
        .await;
    page.click(&format!("{card} button[data-cancel]")).await;
    // It asks first.
    page.client.accept_alert().await.unwrap();
    page.until(&format!(
        "document.querySelector(\"{card} .state\")?.innerText.toLowerCase().includes('cancel asked for')"
    ))
    .await;
    let (_, message) = server
        .call("GET", &format!("/v1/pushes/{doomed}"), ADMIN, None)
        .await;
    assert_eq!(message["cancel_requested"], true, "{message}");
    let _running = workers(&server);
    page.until(&format!(
        "document.querySelector(\"{card}[data-state='cancelled']\")"
    ))
    .await;
    let message = server.finished(&doomed).await;
    assert_eq!(
        message["counts"]["not_attempted"]["cancelled"], 24,
        "{message}"
    );
    assert_eq!(
        server.emulator.counters().sends,
        sent_before,
        "nothing sent"
    );
    // Finished from its page: one action (asked first) sends it to the devices it did not
    // reach, and only them.
    page.click(&format!("{card} h3 a")).await;
    page.shown("#message-finish").await;
    assert!(page.text("#message-finish").await.contains("24 devices"));
    page.click("#message-finish").await;
    page.client.accept_alert().await.unwrap();
    page.until(&format!(
        "location.hash.startsWith('#/pushes/') && location.hash !== '#/pushes/{doomed}' \
         && document.querySelector('#message-facts dd[data-fact=\"state\"]')?.innerText === 'done'"
    ))
    .await;
    assert!(
        page.text("#message-facts")
            .await
            .contains(&format!("the devices push {doomed} did not reach"))
    );
    assert_eq!(server.emulator.counters().sends, sent_before + 24);

    // A device of FCM's says so, in the search's results and on its page.
    let (status, body) = server
        .call(
            "POST",
            "/v1/devices",
            common::DEVICE,
            Some(json!({"registration_id": "fcm-carol", "provider": "fcm"})),
        )
        .await;
    assert_eq!(status, http::StatusCode::CREATED, "{body}");
    page.click("#nav-devices").await;
    page.select("#search-by", "registration_id_prefix").await;
    page.fill("#search-text", "fcm-carol").await;
    page.click("#search-button").await;
    page.until(
        "document.querySelector('#device-results tbody tr td:nth-child(2)')?.innerText === 'FCM'",
    )
    .await;
    page.click("#device-results tbody tr a").await;
    page.until("document.querySelector('#device-facts')?.innerText.includes('FCM')")
        .await;

    // At a phone's width: nothing wider than the screen.
    page.client.set_window_size(390, 844).await.unwrap();
    page.until("document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    page.screenshot("pushes-phone").await;

    // Logging out forgets the token.
    page.click("#logout").await;
    page.shown("#login-view").await;
    let kept: Value = page
        .client
        .execute("return sessionStorage.getItem('c2dm-admin-token');", vec![])
        .await
        .unwrap();
    assert_eq!(kept, Value::Null);
    page.client.clone().close().await.unwrap();
}

/// The console's icon is served, as an SVG, under the console's policy.
#[tokio::test]
async fn the_console_has_an_icon() {
    use tower::ServiceExt;
    let server = Server::start(Db::Sqlite).await;
    let request = http::Request::get("/favicon.svg")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = server.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/svg+xml");
    assert!(response.headers().contains_key("content-security-policy"));
}
