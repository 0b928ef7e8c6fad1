//! Pushes end to end: the API on a real SQLite file, the workers' durable jobs, and the
//! emulator standing in for C2DM. Waits follow the store's change signal, never a clock.

#[macro_use]
mod common;

use c2dm_server::jobs::WorkerOptions;
use http::StatusCode;
use serde_json::{Value, json};

use common::{ADMIN, DEVICE, Db};

use common::Server;

async fn a_push_to_all_reaches_every_active_device_once_and_disables_the_gone(db: Db) {
    let server = Server::start(db).await;
    for i in 0..40 {
        let id = match i % 10 {
            3 => format!("gone-{i}"),
            7 => format!("bad-{i}"),
            _ => format!("phone-{i:02}"),
        };
        server.register(&id, Some("alice"), &[]).await;
    }
    server
        .call("DELETE", "/v1/devices/phone-00", DEVICE, None)
        .await;
    let _workers = server.workers(WorkerOptions {
        batch_size: 9,
        ..WorkerOptions::default()
    });
    let id = server.push(json!("all")).await;
    let message = server.finished(&id).await;
    assert_eq!(message["state"], "done", "{message}");
    assert_eq!(
        message["total"], 39,
        "the unregistered device is not in the audience"
    );
    assert_eq!(message["counts"]["accepted"], 31, "{message}");
    assert_eq!(
        message["counts"]["rejected"]["NotRegistered"], 4,
        "{message}"
    );
    assert_eq!(
        message["counts"]["rejected"]["InvalidRegistration"], 4,
        "{message}"
    );
    assert_eq!(message["counts"]["pending"], 0);

    let rows = server.rows(&id, "").await;
    assert_eq!(rows.len(), 39, "one row per device");
    for row in &rows {
        let device = row["registration_id"].as_str().unwrap();
        let inbox = server.emulator.inbox(device);
        match row["outcome"].as_str().unwrap() {
            "accepted" => {
                assert_eq!(inbox.len(), 1, "{device}: exactly once");
                assert_eq!(
                    row["message_id"].as_str(),
                    Some(inbox[0].message_id.as_str())
                );
            }
            "rejected" => assert!(inbox.is_empty(), "{device}"),
            other => panic!("{device}: {other}"),
        }
    }
    let rejected = server.rows(&id, "&outcome=rejected").await;
    assert_eq!(rejected.len(), 8);

    // The gone devices are gone, with their code, and the next push skips them.
    let (_, gone) = server
        .call("GET", "/v1/devices?state=gone", ADMIN, None)
        .await;
    let gone = gone["devices"].as_array().unwrap();
    assert_eq!(gone.len(), 8);
    assert!(gone.iter().any(|d| d["reason"] == "NotRegistered"));
    let again = server.push(json!("all")).await;
    let message = server.finished(&again).await;
    assert_eq!(message["total"], 31);
    assert_eq!(message["counts"]["accepted"], 31);

    // The figures, for the admin only. Counters are per process, and other tests run in this
    // one too: at least this test's figures are there. A worker counts rows once they are
    // written, a moment after the push reads as done: the figures are awaited (each look
    // yields to the workers; none sleeps), for ten seconds at most.
    let wanted = [
        ("c2dm_deliveries_total{outcome=\"accepted\"}", 62),
        ("c2dm_deliveries_total{outcome=\"rejected\"}", 8),
        ("c2dm_devices_gone_total", 8),
        ("c2dm_pushes_total", 2),
        ("c2dm_registrations_total{result=\"created\"}", 40),
        ("c2dm_rejections_total{code=\"NotRegistered\"}", 8),
        ("c2dm_push_duration_seconds_count", 2),
        ("c2dm_send_duration_seconds_count{provider=\"c2dm\"}", 70),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let metrics = metrics_text(&server, ADMIN).await;
        let figure = |name: &str| -> u64 {
            metrics
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        if wanted.iter().all(|(name, least)| figure(name) >= *least) {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all of {wanted:?} in:\n{metrics}"
        );
        tokio::task::yield_now().await;
    };
    // As Prometheus users expect: every family described, every known series there before
    // its first event, the build and the process told, and promtool's lint clean.
    for line in [
        "# HELP c2dm_deliveries_total ",
        "# HELP c2dm_push_duration_seconds ",
        "# HELP c2dm_send_duration_seconds ",
        "c2dm_send_duration_seconds_bucket{provider=\"fcm\",le=\"0.005\"} ",
        "c2dm_deliveries_total{outcome=\"failed\"} ",
        "c2dm_rejections_total{code=\"UNREGISTERED\"} ",
        "c2dm_build_info{version=\"",
        "process_resident_memory_bytes ",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    common::promtool_accepts(&metrics);
    let (status, _) = server.call("GET", "/metrics", DEVICE, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// `GET /metrics` as text.
async fn metrics_text(server: &Server, key: &str) -> String {
    use tower::ServiceExt;
    let request = http::Request::get("/metrics")
        .header("authorization", format!("Bearer {key}"))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = server.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn pushes_to_a_user_a_tag_and_a_list_of_ids(db: Db) {
    let server = Server::start(db).await;
    server.register("a-1", Some("alice"), &["news"]).await;
    server.register("a-2", Some("alice"), &[]).await;
    server.register("b-1", Some("bob"), &["news"]).await;
    server.register("b-2", Some("bob"), &[]).await;
    server.call("DELETE", "/v1/devices/b-2", DEVICE, None).await;
    let _workers = server.workers(WorkerOptions::default());

    let alice = server.push(json!({"user_id": "alice"})).await;
    let news = server.push(json!({"tag": "news"})).await;
    let listed = server
        .push(json!({"registration_ids": ["a-1", "b-2", "never-registered", "a-1"]}))
        .await;
    // A push to no active device is refused, and nothing is stored.
    for to in [json!({"user_id": "carol"}), json!({"tag": "none"})] {
        let push = json!({"to": to, "collapse_key": "news"});
        let (status, body) = server.call("POST", "/v1/pushes", ADMIN, Some(push)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], "to", "{body}");
    }
    let (status, body) = server
        .call(
            "POST",
            "/v1/pushes",
            ADMIN,
            Some(json!({"to": {"registration_ids": []}, "collapse_key": "news"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // One whose audience empties after it is made (stored here as the API would have).
    let (_, nobody) = server
        .store
        .create_push(&c2dm_server::store::NewPush {
            idempotency_key: None,
            audience: c2dm_server::store::Audience::User {
                user_id: "carol".into(),
            },
            collapse_key: "news".into(),
            data: Vec::new(),
            delay_while_idle: false,
        })
        .await
        .unwrap();
    let nobody = nobody.id.to_string();

    let ids = |rows: Vec<Value>| -> Vec<String> {
        rows.iter()
            .map(|r| {
                format!(
                    "{}:{}",
                    r["registration_id"].as_str().unwrap(),
                    r["outcome"].as_str().unwrap()
                )
            })
            .collect()
    };
    server.finished(&alice).await;
    assert_eq!(
        ids(server.rows(&alice, "").await),
        ["a-1:accepted", "a-2:accepted"]
    );
    server.finished(&news).await;
    assert_eq!(
        ids(server.rows(&news, "").await),
        ["a-1:accepted", "b-1:accepted"]
    );
    let message = server.finished(&listed).await;
    assert_eq!(
        ids(server.rows(&listed, "").await),
        [
            "a-1:accepted",
            "b-2:not_attempted",
            "never-registered:accepted"
        ],
        "listed ids are sent once each; one the app unregistered is not"
    );
    assert_eq!(message["counts"]["not_attempted"]["unregistered"], 1);
    // An empty audience finishes with zero counts.
    let message = server.finished(&nobody).await;
    assert_eq!(
        (message["state"].as_str(), &message["total"]),
        (Some("done"), &json!(0))
    );
    assert_eq!(message["counts"]["accepted"], 0);
}

async fn a_replayed_idempotency_key_gives_the_same_push_and_never_a_second_one(db: Db) {
    let server = Server::start(db).await;
    server.register("phone", None, &[]).await;
    let _workers = server.workers(WorkerOptions::default());
    let body = json!({"to": "all", "collapse_key": "k"});
    let key = [("idempotency-key", "order-1234")];
    let (status, first) = server
        .call_with("POST", "/v1/pushes", ADMIN, Some(body.clone()), &key)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, second) = server
        .call_with("POST", "/v1/pushes", ADMIN, Some(body), &key)
        .await;
    assert_eq!(status, StatusCode::OK, "a replay");
    assert_eq!(first["id"], second["id"]);
    // The same key for another push is a conflict, and stores nothing.
    let other = json!({"to": "all", "collapse_key": "another"});
    let (status, answer) = server
        .call_with("POST", "/v1/pushes", ADMIN, Some(other), &key)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "idempotency_key_reused");
    server.finished(first["id"].as_str().unwrap()).await;
    assert_eq!(server.emulator.inbox("phone").len(), 1, "sent once");
    // Its audience empty now, the replay is still a replay, not a refusal.
    server
        .call("DELETE", "/v1/devices/phone", DEVICE, None)
        .await;
    let body = json!({"to": "all", "collapse_key": "k"});
    let (status, third) = server
        .call_with("POST", "/v1/pushes", ADMIN, Some(body.clone()), &key)
        .await;
    assert_eq!((status, &third["id"]), (StatusCode::OK, &first["id"]));
    let (status, _) = server.call("POST", "/v1/pushes", ADMIN, Some(body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn a_cancelled_push_still_gives_every_device_a_row(db: Db) {
    let server = Server::start(db).await;
    for i in 0..25 {
        server.register(&format!("phone-{i:02}"), None, &[]).await;
    }
    // Cancelled before any worker runs: nothing is sent, every device gets its row.
    let id = server.push(json!("all")).await;
    let (status, message) = server
        .call("POST", &format!("/v1/pushes/{id}/cancel"), ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(message["cancel_requested"], true);
    let _workers = server.workers(WorkerOptions {
        batch_size: 10,
        ..WorkerOptions::default()
    });
    let message = server.finished(&id).await;
    assert_eq!(message["state"], "cancelled");
    assert_eq!(message["counts"]["not_attempted"]["cancelled"], 25);
    assert_eq!(server.rows(&id, "&outcome=not_attempted").await.len(), 25);
    assert_eq!(server.emulator.counters().accepted, 0);
    // A cancel of a finished push is refused, and changes nothing: cancelled or done.
    let (status, answer) = server
        .call("POST", &format!("/v1/pushes/{id}/cancel"), ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "already_finished");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{answer}"
    );
    let done = server.push(json!("all")).await;
    let before = server.finished(&done).await;
    assert_eq!(before["state"], "done");
    let (status, answer) = server
        .call("POST", &format!("/v1/pushes/{done}/cancel"), ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("done"),
        "{answer}"
    );
    let (_, after) = server
        .call("GET", &format!("/v1/pushes/{done}"), ADMIN, None)
        .await;
    assert_eq!(
        (&after["state"], &after["cancel_requested"]),
        (&json!("done"), &json!(false)),
        "nothing changed"
    );
}

async fn a_cancelled_push_is_finished_for_the_devices_it_did_not_reach_and_only_them(db: Db) {
    let server = Server::start(db).await;
    for i in 0..20 {
        server.register(&format!("phone-{i:02}"), None, &[]).await;
    }
    let listed = json!({"registration_ids": ["phone-00", "phone-01", "never-registered"]});
    let (cancelled, listed) = (server.push(json!("all")).await, server.push(listed).await);
    for id in [&cancelled, &listed] {
        let uri = format!("/v1/pushes/{id}/cancel");
        let (status, _) = server.call("POST", &uri, ADMIN, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let workers = server.stoppable_workers(
        server.sender_over(c2dm_hyper::HyperTransport::new().unwrap()),
        WorkerOptions::default(),
    );
    for id in [&cancelled, &listed] {
        assert_eq!(server.finished(id).await["state"], "cancelled");
    }
    // Since the cancel: two devices unregistered, one new.
    for gone in ["phone-18", "phone-19"] {
        server
            .call("DELETE", &format!("/v1/devices/{gone}"), DEVICE, None)
            .await;
    }
    server.register("phone-new", None, &[]).await;
    let finish = |id: &str| format!("/v1/pushes/{id}/finish");
    let (status, made) = server.call("POST", &finish(&cancelled), ADMIN, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{made}");
    assert_eq!(
        made["to"],
        json!({"remaining_of": cancelled.parse::<i64>().unwrap()})
    );
    assert_eq!(made["collapse_key"], "news");
    let made_id = made["id"].as_str().unwrap().to_owned();
    let done = server.finished(&made_id).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["total"], 18, "{done}");
    assert_eq!(done["counts"]["accepted"], 18, "{done}");
    assert!(
        server.emulator.inbox("phone-new").is_empty(),
        "not in the cancelled push"
    );
    assert!(
        server.emulator.inbox("phone-19").is_empty(),
        "unregistered since"
    );
    assert_eq!(server.emulator.inbox("phone-00").len(), 1);
    // Asked again: the same push, and nothing more sent.
    let (status, again) = server.call("POST", &finish(&cancelled), ADMIN, None).await;
    assert_eq!((status, &again["id"]), (StatusCode::OK, &made["id"]));
    // Only a cancelled push is finished.
    let (status, answer) = server.call("POST", &finish(&made_id), ADMIN, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "not_cancelled");
    // A push to listed ids is finished to the ids it did not reach, registered or not.
    let (status, made) = server.call("POST", &finish(&listed), ADMIN, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{made}");
    assert_eq!(
        made["to"],
        json!({"registration_ids": ["never-registered", "phone-00", "phone-01"]})
    );
    let done = server.finished(made["id"].as_str().unwrap()).await;
    assert_eq!(done["counts"]["accepted"], 3, "{done}");
    assert_eq!(server.emulator.inbox("phone-00").len(), 2);
    workers.stop().await;
    let (status, _) = server
        .call("POST", "/v1/pushes/999/finish", ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn bad_pushes_are_refused_before_anything_is_stored(db: Db) {
    let server = Server::start(db).await;
    let cases = [
        (
            json!({"to": "all"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            None,
        ),
        (
            json!({"to": "all", "collapse_key": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("collapse_key"),
        ),
        (
            json!({"to": "all", "collapse_key": "k", "data": {"m": "x".repeat(2000)}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("data"),
        ),
        (
            json!({"to": "all", "collapse_key": "k", "data": {"from": "x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("data"),
        ),
        (
            json!({"to": "everyone", "collapse_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            None,
        ),
        (
            json!({"to": {"registration_ids": ["has space"]}, "collapse_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("to"),
        ),
        (
            json!({"to": {"registration_ids": ["ok", "x".repeat(4097)]}, "collapse_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("to"),
        ),
        (
            json!({"to": {"registration_ids": ["APA91b\u{202e}x"]}, "collapse_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("to"),
        ),
        (
            json!({"to": {"user_id": ""}, "collapse_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("to"),
        ),
        (
            // More ids than one push may list (the body itself is within the limit).
            json!({
                "to": {"registration_ids": (0..10_001).map(|i| format!("phone-{i}")).collect::<Vec<_>>()},
                "collapse_key": "k"
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("to"),
        ),
    ];
    for (body, status, code, field) in cases {
        let (got, answer) = server
            .call("POST", "/v1/pushes", ADMIN, Some(body.clone()))
            .await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        assert_eq!(answer["error"]["field"].as_str(), field, "{body}: {answer}");
    }
    let (status, _) = server
        .call(
            "POST",
            "/v1/pushes",
            DEVICE,
            Some(json!({"to": "all", "collapse_key": "k"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the device key cannot push");
    for uri in [
        "/v1/pushes/999",
        "/v1/pushes/abc",
        "/v1/pushes/999/deliveries",
    ] {
        let (status, answer) = server.call("GET", uri, ADMIN, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {answer}");
    }
    let (status, _) = server
        .call("POST", "/v1/pushes/999/cancel", ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.register("phone-1", None, &[]).await;
    let id = server.push(json!("all")).await;
    let (status, answer) = server
        .call(
            "GET",
            &format!("/v1/pushes/{id}/deliveries?outcome=lost"),
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("outcome"))
    );
}

/// What the console reads: the pushes newest first with their tallies, rows filtered by
/// code, devices counted by state, one device, and a device's history.
async fn pushes_and_devices_read_as_the_console_reads_them(db: Db) {
    let server = Server::start(db).await;
    for i in 0..12 {
        let id = if i % 4 == 0 {
            format!("gone-{i:02}")
        } else {
            format!("phone-{i:02}")
        };
        let user = if i < 6 { "alice" } else { "bob" };
        server.register(&id, Some(user), &[]).await;
    }
    server
        .call("DELETE", "/v1/devices/phone-11", DEVICE, None)
        .await;
    let _workers = server.workers(WorkerOptions {
        batch_size: 5,
        ..WorkerOptions::default()
    });
    let first = server.push(json!("all")).await;
    server.finished(&first).await;
    let second = server
        .push(json!({"registration_ids": ["gone-04", "phone-01"]}))
        .await;
    server.finished(&second).await;

    // Newest first, each with its tally, paged.
    let (status, page) = server.call("GET", "/v1/pushes?limit=1", ADMIN, None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["pushes"][0]["id"], second.as_str());
    let next = page["next"].as_str().expect("a second page").to_owned();
    let (_, older) = server
        .call("GET", &format!("/v1/pushes?after={next}"), ADMIN, None)
        .await;
    assert_eq!(older["pushes"].as_array().unwrap().len(), 1, "{older}");
    assert_eq!(older["next"], Value::Null);
    let all = &older["pushes"][0];
    assert_eq!(all["id"], first.as_str());
    // 11 active devices, 3 of them gone at C2DM.
    assert_eq!(
        all["tally"],
        json!({"accepted": 8, "rejected": 3, "failed": 0, "not_attempted": 0, "pending": 0}),
        "{all}"
    );
    // A device listed by id that is gone by now is not attempted.
    assert_eq!(
        page["pushes"][0]["tally"],
        json!({"accepted": 1, "rejected": 0, "failed": 0, "not_attempted": 1, "pending": 0}),
    );

    // Rows by code.
    let rows = server.rows(&first, "&error=NotRegistered").await;
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r["registration_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gone-00", "gone-04", "gone-08"]);
    assert!(rows.iter().all(|r| r["outcome"] == "rejected"));
    assert!(
        server
            .rows(&first, "&outcome=accepted&error=NotRegistered")
            .await
            .is_empty()
    );

    // Pushes by state, and by the start of their collapse key.
    let (status, order) = server
        .call(
            "POST",
            "/v1/pushes",
            ADMIN,
            Some(json!({"to": {"registration_ids": ["phone-01"]}, "collapse_key": "order-17"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{order}");
    let order = order["id"].as_str().unwrap().to_owned();
    server.finished(&order).await;
    let listed = |query: &'static str| {
        let server = &server;
        async move {
            let (status, page) = server
                .call("GET", &format!("/v1/pushes?{query}"), ADMIN, None)
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {page}");
            page["pushes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("collapse_key=order").await, [order]);
    assert_eq!(
        listed("collapse_key=news").await,
        [second.clone(), first.clone()]
    );
    assert_eq!(
        listed("collapse_key=new&limit=1&state=done").await,
        std::slice::from_ref(&second)
    );
    assert_eq!(listed("state=done").await.len(), 3);
    assert!(listed("state=sending").await.is_empty());
    assert!(
        listed("collapse_key=NEWS").await.is_empty(),
        "a prefix, as written"
    );

    // Devices by state and by the start of their registration id, paged.
    let devices = |query: &'static str| {
        let server = &server;
        async move {
            let (status, page) = server
                .call("GET", &format!("/v1/devices?{query}"), ADMIN, None)
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {page}");
            let ids = page["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["registration_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>();
            (ids, page["next"].as_str().map(str::to_owned))
        }
    };
    let (gone, _) = devices("registration_id_prefix=gone-").await;
    assert_eq!(gone, ["gone-00", "gone-04", "gone-08"]);
    let (page, next) = devices("registration_id_prefix=phone-0&state=active&limit=4").await;
    assert_eq!(page, ["phone-01", "phone-02", "phone-03", "phone-05"]);
    let next = next.expect("a second page");
    let (status, rest) = server
        .call(
            "GET",
            &format!("/v1/devices?registration_id_prefix=phone-0&state=active&after={next}"),
            ADMIN,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    assert_eq!(
        rest["devices"].as_array().unwrap().len(),
        3,
        "phone-06, 07 and 09: {rest}"
    );
    assert!(
        devices("registration_id_prefix=phone-1&state=gone")
            .await
            .0
            .is_empty()
    );

    // Devices by state, for everyone and for a user.
    let (status, counts) = server.call("GET", "/v1/device-counts", ADMIN, None).await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    assert_eq!(counts, json!({"active": 8, "unregistered": 1, "gone": 3}));
    let (_, bob) = server
        .call("GET", "/v1/device-counts?user_id=bob", ADMIN, None)
        .await;
    assert_eq!(bob, json!({"active": 4, "unregistered": 1, "gone": 1}));

    // One device, and its history, newest first.
    let (status, device) = server.call("GET", "/v1/devices/gone-04", ADMIN, None).await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["state"], "gone");
    assert_eq!(device["reason"], "NotRegistered");
    let (_, history) = server
        .call("GET", "/v1/devices/gone-04/deliveries?limit=1", ADMIN, None)
        .await;
    assert_eq!(
        history["deliveries"][0]["push_id"],
        second.as_str(),
        "{history}"
    );
    assert_eq!(history["deliveries"][0]["outcome"], "not_attempted");
    let next = history["next"].as_str().expect("an older push").to_owned();
    let (_, older) = server
        .call(
            "GET",
            &format!("/v1/devices/gone-04/deliveries?limit=1&after={next}"),
            ADMIN,
            None,
        )
        .await;
    assert_eq!(older["deliveries"][0]["push_id"], first.as_str(), "{older}");
    assert_eq!(older["deliveries"][0]["error"], "NotRegistered");
    assert_eq!(older["next"], Value::Null);
    let (_, bob_history) = server
        .call("GET", "/v1/devices/phone-07/deliveries", ADMIN, None)
        .await;
    assert_eq!(
        bob_history["deliveries"].as_array().unwrap().len(),
        1,
        "{bob_history}"
    );

    // Unknown devices, bad cursors, and the device key.
    for uri in ["/v1/devices/nobody", "/v1/devices/nobody/deliveries"] {
        let (status, body) = server.call("GET", uri, ADMIN, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    for uri in [
        "/v1/pushes?after=x",
        "/v1/pushes?limit=0",
        "/v1/pushes?state=paused",
        "/v1/pushes?collapse_key=",
        "/v1/devices?registration_id_prefix=",
        "/v1/devices/gone-04/deliveries?after=-1",
    ] {
        let (status, body) = server.call("GET", uri, ADMIN, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
    }
    for uri in [
        "/v1/pushes",
        "/v1/device-counts",
        "/v1/devices/gone-04",
        "/v1/devices/gone-04/deliveries",
    ] {
        let (status, _) = server.call("GET", uri, DEVICE, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
    }
}

/// On SQLite the queue forgets the jobs it has done, as batches finish: apalis-sqlite marks a
/// job done with a statement that reads every job its worker has run, done ones included,
/// which made each batch's end slower than the one before for as long as the process ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_queue_keeps_no_job_done_before_the_last_batch() {
    use sqlx::Connection;
    let server = Server::start(Db::Sqlite).await;
    for i in 0..30 {
        server.register(&format!("phone-{i:02}"), None, &[]).await;
    }
    let _workers = server.workers(WorkerOptions {
        workers: 1,
        batch_size: 3,
        ..WorkerOptions::default()
    });
    // Two pushes of ten batches each: 22 jobs, all run.
    for _ in 0..2 {
        let id = server.push(json!("all")).await;
        let message = server.finished(&id).await;
        assert_eq!(message["counts"]["accepted"], 30, "{message}");
    }
    let mut db = sqlx::SqliteConnection::connect(&server.database.url)
        .await
        .unwrap();
    let jobs: Vec<(String, String)> = sqlx::query_as("SELECT job_type, status FROM Jobs")
        .fetch_all(&mut db)
        .await
        .unwrap();
    // Left: only jobs marked done (or not yet) after the second push's last batch wrote its
    // rows: that batch's, the one before it if the queue heard of it late, and the push's
    // own if its batches all finished before the queue heard of it.
    assert!(jobs.len() <= 3, "{jobs:?}");
    assert!(
        jobs.iter()
            .all(|(_, status)| status == "Done" || status == "Running"),
        "{jobs:?}"
    );
}

/// Devices of both providers: one push reaches each through its own service, a gone FCM
/// token is marked gone with FCM's code, and each row keeps its service's message id. Without
/// an FCM sender, FCM's devices get `not_attempted: no_sender` rows, and C2DM's are sent.
async fn a_push_goes_to_each_device_through_its_provider(db: Db) {
    let server = Server::start(db).await;
    for (id, provider) in [
        ("phone-1", "c2dm"),
        ("gone-c1", "c2dm"),
        ("fcm-1", "fcm"),
        ("fcm-2", "fcm"),
        ("gone-f1", "fcm"),
    ] {
        let (status, body) = server
            .call(
                "POST",
                "/v1/devices",
                DEVICE,
                Some(json!({"registration_id": id, "provider": provider})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["provider"], provider, "{body}");
    }
    let senders = c2dm_server::jobs::Senders {
        c2dm: Some(server.sender_over(c2dm_hyper::HyperTransport::new().unwrap())),
        fcm: Some(server.fcm_sender()),
    };
    let workers = server.stoppable_workers(senders, WorkerOptions::default());
    let id = server.push(json!("all")).await;
    let status = server.finished(&id).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["counts"]["accepted"], 3, "{status}");
    assert_eq!(status["counts"]["rejected"]["NotRegistered"], 1, "{status}");
    assert_eq!(status["counts"]["rejected"]["UNREGISTERED"], 1, "{status}");
    let (_, gone) = server.call("GET", "/v1/devices/gone-f1", ADMIN, None).await;
    assert_eq!(
        (&gone["state"], &gone["reason"]),
        (&json!("gone"), &json!("UNREGISTERED")),
        "{gone}"
    );
    let (_, rows) = server
        .call(
            "GET",
            &format!("/v1/pushes/{id}/deliveries?outcome=accepted"),
            ADMIN,
            None,
        )
        .await;
    for row in rows["deliveries"].as_array().unwrap() {
        let device = row["registration_id"].as_str().unwrap();
        let message_id = row["message_id"].as_str().unwrap();
        let inbox = server.emulator.inbox(device);
        assert_eq!(inbox.len(), 1, "{device}");
        if device.starts_with("fcm-") {
            assert_eq!(
                message_id,
                format!("projects/c2dm-emulator/messages/{}", inbox[0].message_id)
            );
        } else {
            assert_eq!(message_id, inbox[0].message_id);
        }
    }
    let stats = server.emulator.stats();
    assert_eq!(stats.fcm.accepted, 2, "{stats:?}");
    // A push FCM cannot carry goes to C2DM's devices only, and says why for FCM's.
    let (status, body) = server
        .call(
            "POST",
            "/v1/pushes",
            ADMIN,
            Some(json!({"to": "all", "collapse_key": "k", "delay_while_idle": true})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let idle = server.finished(body["id"].as_str().unwrap()).await;
    assert_eq!(idle["counts"]["accepted"], 1, "{idle}");
    assert_eq!(
        idle["counts"]["not_attempted"]["unsupported_by_provider"], 2,
        "{idle}"
    );
    workers.stop().await;

    // Workers without an FCM sender: FCM's devices are not sent to, and say why.
    server.emulator.clear_inbox();
    let c2dm = server.sender_over(c2dm_hyper::HyperTransport::new().unwrap());
    let workers = server.stoppable_workers(c2dm, WorkerOptions::default());
    let id = server.push(json!("all")).await;
    let status = server.finished(&id).await;
    assert_eq!(status["counts"]["accepted"], 1, "{status}");
    assert_eq!(
        status["counts"]["not_attempted"]["no_sender"], 2,
        "{status}"
    );
    assert!(server.emulator.inbox("fcm-1").is_empty());
    workers.stop().await;

    // Workers with FCM's sender alone (a process for an FCM project only): C2DM's devices
    // are not sent to, and say why.
    server.emulator.clear_inbox();
    let workers = server.stoppable_workers(server.fcm_sender(), WorkerOptions::default());
    let id = server.push(json!("all")).await;
    let status = server.finished(&id).await;
    assert_eq!(status["counts"]["accepted"], 2, "{status}");
    assert_eq!(
        status["counts"]["not_attempted"]["no_sender"], 1,
        "{status}"
    );
    assert!(server.emulator.inbox("phone-1").is_empty());
    assert_eq!(server.emulator.inbox("fcm-1").len(), 1);
    workers.stop().await;
}

async fn a_paused_account_says_until_when_and_why(db: Db) {
    let server = Server::start_with(
        db,
        |config| {
            config.unavailable = c2dm_emulator::FaultRate::Every(2);
            config.retry_after = std::time::Duration::from_secs(3);
        },
        &WorkerOptions::default(),
    )
    .await;
    let (status, before) = server.call("GET", "/v1/accounts", ADMIN, None).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(before, json!({"accounts": []}));
    for id in ["phone-1", "phone-2"] {
        server.register(id, None, &[]).await;
    }
    let _workers = server.workers(WorkerOptions::default());
    let id = server.push(json!("all")).await;
    // The second send meets a 503 with Retry-After: 3; the pause reaches the database at
    // once, and the accounts say so until it ends. Each look yields to the workers; none
    // sleeps, for ten seconds at most.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let account = loop {
        let (_, accounts) = server.call("GET", "/v1/accounts", ADMIN, None).await;
        let account = accounts["accounts"][0].clone();
        if !account["paused_until"].is_null() {
            break account;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pause in {accounts}"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(account["account"], "default", "{account}");
    let reason = account["pause_reason"].as_str().expect("a reason");
    assert!(reason.contains("503"), "{reason}");
    let message = server.finished(&id).await;
    assert_eq!(message["counts"]["accepted"], 2, "{message}");
    let (status, body) = server.call("GET", "/v1/accounts", DEVICE, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

async fn a_push_to_a_short_list_is_enqueued_as_its_one_batch(db: Db) {
    let server = Server::start(db).await;
    for id in ["phone-1", "phone-2", "gone-3"] {
        server.register(id, None, &[]).await;
    }
    // Made while no worker runs: its size is known at once (no walk), each id once.
    let id = server
        .push(json!({"registration_ids": ["phone-1", "phone-2", "gone-3", "phone-1"]}))
        .await;
    let (_, made) = server
        .call("GET", &format!("/v1/pushes/{id}"), ADMIN, None)
        .await;
    assert_eq!(
        (made["state"].as_str(), made["total"].as_u64()),
        (Some("queued"), Some(3))
    );
    let (pushes, batches) = server.queues.depth().await.unwrap();
    assert_eq!((pushes, batches), (0, 1), "one batch job, no push job");
    // A longer list is walked by its push job, as any audience.
    let long: Vec<String> = (0..1001).map(|i| format!("listed-{i:04}")).collect();
    let walked = server.push(json!({"registration_ids": long})).await;
    let (_, made) = server
        .call("GET", &format!("/v1/pushes/{walked}"), ADMIN, None)
        .await;
    assert_eq!(made["total"], Value::Null, "{made}");
    assert_eq!(server.queues.depth().await.unwrap(), (1, 1));

    let _workers = server.workers(WorkerOptions::default());
    let message = server.finished(&id).await;
    assert_eq!(message["state"], "done", "{message}");
    assert_eq!(message["counts"]["accepted"], 2, "{message}");
    assert_eq!(
        message["counts"]["rejected"]["NotRegistered"], 1,
        "{message}"
    );
    assert_eq!(server.emulator.inbox("phone-1").len(), 1, "sent once");
    let message = server.finished(&walked).await;
    assert_eq!(message["total"], 1001, "{message}");
}

on_each_database!(
    a_push_to_a_short_list_is_enqueued_as_its_one_batch,
    a_paused_account_says_until_when_and_why,
    pushes_and_devices_read_as_the_console_reads_them,
    a_push_to_all_reaches_every_active_device_once_and_disables_the_gone,
    pushes_to_a_user_a_tag_and_a_list_of_ids,
    a_replayed_idempotency_key_gives_the_same_push_and_never_a_second_one,
    a_cancelled_push_still_gives_every_device_a_row,
    a_cancelled_push_is_finished_for_the_devices_it_did_not_reach_and_only_them,
    bad_pushes_are_refused_before_anything_is_stored,
    a_push_goes_to_each_device_through_its_provider,
);
