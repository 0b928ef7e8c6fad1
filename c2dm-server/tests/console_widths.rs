//! The console at a desk's width (1366 px) and a phone's (390 px), in Debian's headless
//! Chromium: every view has its title and fits the screen (below 600 px, tables become stacked
//! cards, no row taller than 120 px, nothing to scroll sideways); a running push shows its pace;
//! pushes filter by state and collapse key; devices browse by state, page, and search by the
//! start of their id; a banner says when sends are paused, until when and why; the icon is
//! there.
//!
//! With `C2DM_WRITE_DOCS=1`, the screenshots at both widths are written to `docs/console/`.

#[macro_use]
mod common;
mod browser;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use browser::{Page, Session};
use c2dm_server::jobs::WorkerOptions;
use serde_json::{Value, json};

use common::{ADMIN, DEVICE, Db, Server};

/// The tallest a stacked card may be, in CSS pixels.
const TALLEST_CARD: f64 = 120.0;

/// Whether the view fits the screen: nothing wider than the window, and (below 600 px) every
/// row of `rows` (a CSS selector) a card no taller than [`TALLEST_CARD`]. Fails naming why.
async fn fits(page: &Page, rows: &str, width: u32) {
    let measured = page
        .client
        .execute(
            "const rows = [...document.querySelectorAll(arguments[0])].filter(r => r.offsetParent !== null);
             return {
               rows: rows.length,
               inner: window.innerWidth,
               scroll: document.documentElement.scrollWidth,
               tallest: Math.max(0, ...rows.map(r => r.getBoundingClientRect().height)),
               stacked: rows.length > 0 && getComputedStyle(rows[0]).display === 'flex',
             };",
            vec![json!(rows)],
        )
        .await
        .expect("a script");
    let number = |key: &str| measured[key].as_f64().unwrap_or(f64::NAN);
    assert!(number("rows") > 0.0, "{rows}: no rows shown ({measured})");
    assert!(
        number("scroll") <= number("inner"),
        "{rows} at {width} px: the page scrolls sideways ({measured})"
    );
    if width < 600 {
        assert_eq!(
            measured["stacked"], true,
            "{rows}: not stacked ({measured})"
        );
        assert!(
            number("tallest") <= TALLEST_CARD,
            "{rows} at {width} px: a card is taller than {TALLEST_CARD} px ({measured})"
        );
    } else {
        assert_eq!(
            measured["stacked"], false,
            "{rows}: a table at a desk ({measured})"
        );
    }
}

/// The ids of the push cards shown.
async fn cards(page: &Page) -> Vec<String> {
    let ids = page
        .client
        .execute(
            "return [...document.querySelectorAll('#message-list [data-message]')].map(c => c.dataset.message);",
            vec![],
        )
        .await
        .expect("a script");
    serde_json::from_value(ids).expect("ids")
}

/// Shows the pushes the filter form asks for, once the list says it shows them (not the
/// last filter's answer).
async fn filter_pushes(page: &Page, state: &str, key: &str, shown: usize) {
    page.select("#pushes-state", state).await;
    page.fill("#pushes-key", key).await;
    page.click("#pushes-apply").await;
    let filter = serde_json::json!([state, key]).to_string();
    page.until(&format!(
        "document.querySelector('#message-list').dataset.shown === {filter:?} \
         && document.querySelectorAll('#message-list [data-message]').length === {shown}"
    ))
    .await;
}

/// Shows the devices the search form asks for, once the table says it shows them (not the
/// last search's answer) and `rows` of them are listed.
async fn browse_devices(page: &Page, by: &str, text: &str, state: &str, rows: usize) {
    page.select("#search-by", by).await;
    page.fill("#search-text", text).await;
    page.select("#search-state", state).await;
    page.click("#search-button").await;
    let search = serde_json::json!([by, text, state]).to_string();
    page.until(&format!(
        "document.querySelector('#device-results').dataset.shown === {search:?} \
         && document.querySelectorAll('#device-results tbody tr').length === {rows}"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_at_a_desk_and_on_a_phone() {
    let server = Server::start(Db::Sqlite).await;
    // 60 phones, 5 gone at C2DM, 5 that unregister.
    for i in 0..70 {
        let id = match i {
            0..60 => format!("phone-{i:02}"),
            60..65 => format!("gone-{i:02}"),
            _ => format!("old-{i:02}"),
        };
        server
            .register(&id, Some(if i % 2 == 0 { "alice" } else { "bob" }), &[])
            .await;
    }
    for i in 65..70 {
        server
            .call("DELETE", &format!("/v1/devices/old-{i:02}"), DEVICE, None)
            .await;
    }
    // Three pushes: one cancelled before any worker took it, one to all, one to one phone.
    let push = |to: Value, key: &str| {
        let server = &server;
        let body = json!({"to": to, "collapse_key": key, "data": {"text": "hello"}});
        async move {
            let (status, made) = server.call("POST", "/v1/pushes", ADMIN, Some(body)).await;
            assert_eq!(status, http::StatusCode::ACCEPTED, "{made}");
            made["id"].as_str().unwrap().to_owned()
        }
    };
    let cancelled = push(json!("all"), "order-18").await;
    server
        .call(
            "POST",
            &format!("/v1/pushes/{cancelled}/cancel"),
            ADMIN,
            None,
        )
        .await;
    let workers = server.stoppable_workers(
        server.sender_over(c2dm_hyper::HyperTransport::new().unwrap()),
        WorkerOptions::default(),
    );
    server.finished(&cancelled).await;
    let news = push(json!("all"), "news").await;
    server.finished(&news).await;
    let order = push(json!({"registration_ids": ["phone-01"]}), "order-17").await;
    server.finished(&order).await;
    // And one waiting, with no worker to take it: a running push's page.
    workers.stop().await;
    let waiting = push(json!("all"), "later").await;
    let session = Session::open(server.app.clone()).await;
    let (page, base) = (&session.page, session.base.as_str());
    let docs = std::env::var_os("C2DM_WRITE_DOCS")
        .map(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/console"));
    let keep = |name: String| {
        let page = &page;
        let docs = docs.clone();
        async move {
            page.screenshot(&name).await;
            if let Some(docs) = docs {
                std::fs::create_dir_all(&docs).unwrap();
                std::fs::copy(
                    page.shots.join(format!("{name}.png")),
                    docs.join(format!("{name}.png")),
                )
                .unwrap();
            }
        }
    };

    page.client.goto(&format!("{base}/")).await.unwrap();
    page.until("document.title === 'Log in · c2dm console'")
        .await;
    page.fill("#token", ADMIN).await;
    page.click("#login-button").await;
    page.shown("#messages-view").await;
    // No pause, no banner. Then C2DM's account is paused (as a 503 storm leaves it), for ten
    // minutes, and the banner says so on every view from the next look on.
    page.until("document.querySelector('#message-list [data-message]') !== null")
        .await;
    assert_eq!(page.text("#paused").await, "");
    server
        .store
        .pause_account(
            "default",
            SystemTime::now() + Duration::from_secs(600),
            Some("the service is unavailable (503): retry after 600 s"),
        )
        .await
        .unwrap();

    for (width, height, name) in [(1366, 900, "desk"), (390, 844, "phone")] {
        page.client.set_window_size(width, height).await.unwrap();
        page.until(&format!("window.innerWidth === {width}")).await;

        // The pushes, and the banner: paused, until when, and why.
        page.click("#nav-messages").await;
        page.until("document.title === 'Pushes · c2dm console'")
            .await;
        page.shown("#paused").await;
        let banner = page.text("#paused").await;
        for said in [
            "C2DM account default",
            "until 20",
            "503",
            "retry after 600 s",
        ] {
            assert!(banner.contains(said), "{said:?} in {banner}");
        }
        filter_pushes(page, "", "", 4).await;
        assert_eq!(
            cards(page).await,
            [
                waiting.as_str(),
                order.as_str(),
                news.as_str(),
                cancelled.as_str()
            ]
        );
        // Push cards are cards at every width: only nothing to scroll sideways.
        page.until("document.documentElement.scrollWidth <= window.innerWidth")
            .await;
        keep(format!("{name}-pushes")).await;
        filter_pushes(page, "cancelled", "", 1).await;
        assert_eq!(cards(page).await, [cancelled.as_str()]);
        filter_pushes(page, "", "order-", 2).await;
        assert_eq!(cards(page).await, [order.as_str(), cancelled.as_str()]);
        filter_pushes(page, "done", "order-", 1).await;
        assert_eq!(cards(page).await, [order.as_str()]);
        filter_pushes(page, "queued", "", 1).await;
        assert_eq!(cards(page).await, [waiting.as_str()]);
        filter_pushes(page, "sending", "", 0).await;
        assert!(page.text("#message-list").await.contains("No push matches"));
        filter_pushes(page, "", "", 4).await;

        // A running push: how long it has run, its rate, and the time left.
        page.click(&format!("[data-message='{waiting}'] h3 a"))
            .await;
        page.shown("#message-facts dd[data-fact='time left']").await;
        for fact in ["elapsed", "rate", "time left"] {
            let text = page
                .text(&format!("#message-facts dd[data-fact='{fact}']"))
                .await;
            assert!(!text.is_empty(), "{fact} at {width} px");
        }
        page.until("document.documentElement.scrollWidth <= window.innerWidth")
            .await;
        page.click("#nav-messages").await;

        // One push: its deliveries as a table at a desk, as cards on a phone.
        page.click(&format!("[data-message='{news}'] h3 a")).await;
        page.until(&format!("document.title === 'Push {news} · c2dm console'"))
            .await;
        page.until("document.querySelectorAll('#deliveries tbody tr').length === 50")
            .await;
        fits(page, "#deliveries tbody tr", width).await;
        page.client
            .execute(
                "document.querySelector('#deliveries-filter').scrollIntoView();",
                vec![],
            )
            .await
            .unwrap();
        keep(format!("{name}-push")).await;
        page.client
            .execute("window.scrollTo(0, 0);", vec![])
            .await
            .unwrap();

        // Devices: browsed by state, paged, and searched by the start of their id.
        page.click("#nav-devices").await;
        page.until("document.title === 'Devices · c2dm console'")
            .await;
        // At first, every device: a page of 50, and the next.
        page.until("document.querySelectorAll('#device-results tbody tr').length === 50")
            .await;
        page.click("#devices-more").await;
        page.until("document.querySelectorAll('#device-results tbody tr').length === 70")
            .await;
        page.until("document.querySelector('#devices-more').hidden")
            .await;
        browse_devices(page, "registration_id_prefix", "", "gone", 5).await;
        let gone = page.rows("#device-results tbody tr").await;
        assert!(
            gone.iter()
                .all(|r| r[0].starts_with("gone-") && r[4].starts_with("gone (NotRegistered)")),
            "{gone:?}"
        );
        browse_devices(page, "registration_id_prefix", "", "unregistered", 5).await;
        browse_devices(page, "registration_id_prefix", "phone-0", "active", 10).await;
        let found = page.rows("#device-results tbody tr").await;
        let ids: Vec<&str> = found.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(ids[0], "phone-00");
        assert!(ids.iter().all(|id| id.starts_with("phone-0")), "{ids:?}");
        browse_devices(page, "user_id", "bob", "gone", 2).await;
        fits(page, "#device-results tbody tr", width).await;
        keep(format!("{name}-devices")).await;
        page.fill("#search-text", "nobody-").await;
        page.select("#search-by", "registration_id_prefix").await;
        page.select("#search-state", "").await;
        page.click("#search-button").await;
        page.shown("#devices-empty").await;

        // One device, its history as cards on a phone.
        browse_devices(page, "registration_id_prefix", "phone-01", "", 1).await;
        page.click("#device-results tbody tr a").await;
        page.until("document.title === 'Device phone-01 · c2dm console'")
            .await;
        page.until("document.querySelectorAll('#device-history tbody tr').length === 3")
            .await;
        fits(page, "#device-history tbody tr", width).await;

        // The send form has its title too; the banner is on every view.
        page.click("#nav-send").await;
        page.until("document.title === 'Send a push · c2dm console'")
            .await;
        page.shown("#paused").await;
        browse_reset(page).await;
    }

    // The icon the page names is served.
    let icon = page
        .client
        .execute_async(
            "const done = arguments[0];
             const link = document.querySelector('link[rel=icon]');
             fetch(link.href).then(r => done([r.status, r.headers.get('content-type')]));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(icon, json!([200, "image/svg+xml"]));

    page.client.clone().close().await.unwrap();
}

/// Leaves the devices' search form as a first visit finds it, for the next width.
async fn browse_reset(page: &Page) {
    page.click("#nav-devices").await;
    page.select("#search-by", "registration_id_prefix").await;
    page.fill("#search-text", "").await;
    page.select("#search-state", "").await;
    page.click("#search-button").await;
    page.until("document.querySelectorAll('#device-results tbody tr').length === 50")
        .await;
}
