//! The device registry's API on a real SQLite file: registration, unregistration, listing by
//! page and filter, keys, and every bad input answered with a clear JSON error, never a 500.

#[macro_use]
mod common;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use c2dm_server::api::{BODY_LIMIT, InvalidKey, Key, Keys};
use c2dm_server::store::Store;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use common::{ADMIN, DEVICE, Db};

struct Server {
    app: Router,
    store: Store,
    _database: common::Database,
}

impl Server {
    /// The API over a fresh SQLite file.
    async fn start(db: Db) -> Self {
        let api = common::Api::start(db).await;
        Self {
            app: api.app,
            store: api.store,
            _database: api.database,
        }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Body>,
    ) -> (StatusCode, Value) {
        common::call(&self.app, method, uri, key, body, &[]).await
    }

    async fn register(&self, body: Value) -> (StatusCode, Value) {
        self.call(
            "POST",
            "/v1/devices",
            Some(DEVICE),
            Some(Body::from(body.to_string())),
        )
        .await
    }

    /// Every device of a listing, page after page.
    async fn list_all(&self, query: &str, limit: u32) -> Vec<Value> {
        let mut devices = Vec::new();
        let mut after = String::new();
        loop {
            let uri = format!("/v1/devices?limit={limit}{query}{after}");
            let (status, page) = self.call("GET", &uri, Some(ADMIN), None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            devices.extend(page["devices"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => return devices,
            }
        }
    }
}

fn error_of(value: &Value) -> (&str, Option<&str>) {
    (
        value["error"]["code"].as_str().unwrap(),
        value["error"]["field"].as_str(),
    )
}

async fn register_update_unregister_and_register_again(db: Db) {
    let server = Server::start(db).await;
    let (status, device) = server
        .register(json!({
            "registration_id": "APA91b-phone-1",
            "device_id": "pixel",
            "user_id": "alice",
            "tags": ["news", "beta", "news"],
            "app_version": "1.0"
        }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{device}");
    assert_eq!(device["state"], "active");
    assert_eq!(device["tags"], json!(["beta", "news"]), "sorted, once each");
    assert!(device["created_at"].as_str().unwrap().ends_with('Z'));

    let (status, device) = server
        .register(
            json!({"registration_id": "APA91b-phone-1", "user_id": "alice", "tags": ["sport"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["tags"], json!(["sport"]));
    assert_eq!(device["device_id"], "pixel", "a field left out is kept");

    let (status, device) = server
        .call("DELETE", "/v1/devices/APA91b-phone-1", Some(DEVICE), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(device["state"], "unregistered");
    let (status, body) = server
        .call("DELETE", "/v1/devices/never-seen", Some(DEVICE), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body).0, "not_found");

    let (status, device) = server
        .register(json!({"registration_id": "APA91b-phone-1"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        device["state"], "active",
        "registering again makes it active"
    );
}

/// An app that registers again with its id alone (as many do at each start) keeps its user,
/// tags and version, and so stays in their audiences; `null` (or `[]` for tags) clears one.
async fn registering_again_keeps_what_the_body_leaves_out(db: Db) {
    let server = Server::start(db).await;
    let full = json!({
        "registration_id": "APA91b-phone-2",
        "device_id": "pixel",
        "user_id": "bob",
        "tags": ["news"],
        "app_version": "1.0"
    });
    let (status, _) = server.register(full).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, device) = server
        .register(json!({"registration_id": "APA91b-phone-2"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{device}");
    for (field, kept) in [
        ("device_id", json!("pixel")),
        ("user_id", json!("bob")),
        ("tags", json!(["news"])),
        ("app_version", json!("1.0")),
    ] {
        assert_eq!(device[field], kept, "{field}: {device}");
    }
    assert_eq!(server.list_all("&user_id=bob", 10).await.len(), 1);
    assert_eq!(server.list_all("&tag=news", 10).await.len(), 1);
    // One field changed, the others kept.
    let (_, device) = server
        .register(json!({"registration_id": "APA91b-phone-2", "app_version": "1.1"}))
        .await;
    assert_eq!(
        (&device["app_version"], &device["user_id"]),
        (&json!("1.1"), &json!("bob"))
    );
    // `null` and `[]` clear.
    let (status, device) = server
        .register(json!({
            "registration_id": "APA91b-phone-2",
            "user_id": null,
            "tags": [],
            "device_id": null
        }))
        .await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["user_id"], Value::Null);
    assert_eq!(device["device_id"], Value::Null);
    assert_eq!(device["tags"], json!([]));
    assert_eq!(device["app_version"], "1.1", "left out: kept");
    assert!(server.list_all("&user_id=bob", 10).await.is_empty());
    assert!(server.list_all("&tag=news", 10).await.is_empty());
    let (_, device) = server
        .register(json!({"registration_id": "APA91b-phone-2", "tags": ["a"]}))
        .await;
    assert_eq!(device["tags"], json!(["a"]));
    let (_, device) = server
        .register(json!({"registration_id": "APA91b-phone-2", "tags": null}))
        .await;
    assert_eq!(device["tags"], json!([]), "null clears the tags too");
    // A new device registered with its id alone has nothing to keep.
    let (status, device) = server
        .register(json!({"registration_id": "APA91b-phone-3"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        (&device["user_id"], &device["tags"]),
        (&Value::Null, &json!([]))
    );
}

async fn a_gone_device_stays_gone_until_registered_again(db: Db) {
    let server = Server::start(db).await;
    server
        .register(json!({"registration_id": "old-phone"}))
        .await;
    let gone = server
        .store
        .mark_gone("old-phone", "NotRegistered")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gone.reason.as_deref(), Some("NotRegistered"));
    let listed = server.list_all("&state=gone", 10).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["reason"], "NotRegistered");
    assert!(server.list_all("&state=active", 10).await.is_empty());
    assert!(
        server
            .store
            .mark_gone("unknown", "NotRegistered")
            .await
            .unwrap()
            .is_none()
    );

    let (status, device) = server
        .register(json!({"registration_id": "old-phone"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (device["state"].as_str(), &device["reason"]),
        (Some("active"), &Value::Null)
    );
}

async fn listing_pages_through_everything_once_and_filters(db: Db) {
    let server = Server::start(db).await;
    for i in 0..250 {
        let user = format!("user-{}", i % 5);
        let tags = if i % 10 == 0 {
            json!(["vip"])
        } else {
            json!([])
        };
        let (status, _) = server
            .register(
                json!({"registration_id": format!("phone-{i:03}"), "user_id": user, "tags": tags}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    server
        .call("DELETE", "/v1/devices/phone-007", Some(DEVICE), None)
        .await;

    let all = server.list_all("", 100).await;
    assert_eq!(all.len(), 250);
    let ids: Vec<&str> = all
        .iter()
        .map(|d| d["registration_id"].as_str().unwrap())
        .collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), 250, "no device twice");
    assert_eq!(ids[0], "phone-000");

    assert_eq!(server.list_all("&user_id=user-3", 7).await.len(), 50);
    assert_eq!(server.list_all("&tag=vip", 7).await.len(), 25);
    assert_eq!(
        server.list_all("&tag=vip&user_id=user-0", 3).await.len(),
        25
    );
    assert_eq!(server.list_all("&state=unregistered", 100).await.len(), 1);
    assert_eq!(server.list_all("&state=active", 100).await.len(), 249);
    let (_, page) = server
        .call("GET", "/v1/devices?limit=250", Some(ADMIN), None)
        .await;
    assert_eq!(page["next"], Value::Null, "the last page says so");
}

async fn keys_are_checked_on_every_route_but_healthz(db: Db) {
    let server = Server::start(db).await;
    let body = || Some(Body::from(json!({"registration_id": "p"}).to_string()));
    for (key, expected) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some("wrong"), StatusCode::UNAUTHORIZED),
        (Some(DEVICE), StatusCode::CREATED),
        (Some(ADMIN), StatusCode::OK),
    ] {
        let (status, answer) = server.call("POST", "/v1/devices", key, body()).await;
        assert_eq!(status, expected, "{key:?}: {answer}");
    }
    let (status, answer) = server.call("GET", "/v1/devices", Some(DEVICE), None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the device key on an admin route"
    );
    assert_eq!(error_of(&answer).0, "forbidden");
    // The key is checked before anything else: the device key on an admin route is refused
    // 403 whatever it sends (a body that is not a push, a query that is not a listing's), and
    // no key 401.
    for (method, uri, body) in [
        ("POST", "/v1/pushes", Some("{\"not\": \"a push\"}")),
        ("POST", "/v1/pushes", Some("not JSON")),
        ("GET", "/v1/devices?limit=0&colour=red", None),
        ("GET", "/v1/pushes/not-an-id?wait=999", None),
    ] {
        for (key, expected) in [
            (Some(DEVICE), StatusCode::FORBIDDEN),
            (None, StatusCode::UNAUTHORIZED),
        ] {
            let (status, answer) = server.call(method, uri, key, body.map(Body::from)).await;
            assert_eq!(status, expected, "{method} {uri} {key:?}: {answer}");
        }
    }
    let (status, answer) = server.call("GET", "/v1/devices", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&answer).0, "unauthorized");
    let (status, answer) = server.call("GET", "/healthz", None, None).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    // Keys never show in Debug.
    let keys = Keys::new(Key::new(ADMIN).unwrap(), Key::new(DEVICE).unwrap()).unwrap();
    let shown = format!("{keys:?}");
    assert!(!shown.contains(ADMIN) && !shown.contains(DEVICE), "{shown}");
    assert!(Key::new("").is_err() && Key::new("has space, and long").is_err());
    // Weak keys: short ones, and the same key for both.
    assert_eq!(
        Key::new("fifteen-chars-x").unwrap_err(),
        InvalidKey::TooShort
    );
    assert!(Key::new("sixteen-chars-xx").is_ok());
    assert_eq!(
        Keys::new(Key::new(ADMIN).unwrap(), Key::new(ADMIN).unwrap()).unwrap_err(),
        InvalidKey::Same
    );
    // The scheme's name is matched whatever its case (RFC 9110).
    let with_authorization = |value: String| {
        let app = server.app.clone();
        async move {
            let header = [("authorization", value.as_str())];
            common::call(&app, "GET", "/v1/devices", None, None, &header).await
        }
    };
    for scheme in ["bearer", "BEARER", "Bearer", "bEaReR"] {
        let (status, answer) = with_authorization(format!("{scheme} {ADMIN}")).await;
        assert_eq!(status, StatusCode::OK, "{scheme}: {answer}");
    }
    for wrong in [
        format!("Basic {ADMIN}"),
        format!("Bearer{ADMIN}"),
        ADMIN.to_owned(),
    ] {
        let (status, _) = with_authorization(wrong.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
}

async fn bad_input_gets_a_clear_error_and_is_not_stored(db: Db) {
    let server = Server::start(db).await;
    let long = "x".repeat(300);
    let cases: Vec<(&str, String, StatusCode, &str, Option<&str>)> = vec![
        ("malformed JSON", "{\"registration_id\": ".into(), StatusCode::BAD_REQUEST, "malformed_body", None),
        ("not an object", "[1, 2]".into(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", None),
        ("no registration id", "{}".into(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", None),
        ("an unknown field", json!({"registration_id": "a", "color": "red"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", None),
        ("a registration id with a space", json!({"registration_id": "a b"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("registration_id")),
        ("an empty registration id", json!({"registration_id": ""}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("registration_id")),
        ("an empty user id", json!({"registration_id": "a", "user_id": ""}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("user_id")),
        ("a tag too long", json!({"registration_id": "a", "tags": [long]}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("tags")),
        ("too many tags", json!({"registration_id": "a", "tags": (0..40).map(|i| i.to_string()).collect::<Vec<_>>()}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("tags")),
        ("a control character", json!({"registration_id": "a", "device_id": "x\u{7}"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("device_id")),
        ("a registration id over 4,096 bytes", json!({"registration_id": "r".repeat(4097)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("registration_id")),
        ("a registration id of 4,096 bytes in 2,048 characters, and one more", json!({"registration_id": format!("{}r", "é".repeat(2048))}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("registration_id")),
        ("a zero-width space in a registration id", json!({"registration_id": "APA91b\u{200b}x"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("registration_id")),
        ("a direction override in a registration id", json!({"registration_id": "APA91b\u{202e}x"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("registration_id")),
        ("tags that are not a list", json!({"registration_id": "a", "tags": "news"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", None),
        ("a body over the limit", format!("{{\"registration_id\": \"{}\"}}", "y".repeat(BODY_LIMIT)), StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
    ];
    for (what, body, status, code, field) in cases {
        let (got, answer) = server
            .call("POST", "/v1/devices", Some(DEVICE), Some(Body::from(body)))
            .await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(error_of(&answer), (code, field), "{what}: {answer}");
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }
    // Without a JSON content type.
    let request = Request::post("/v1/devices")
        .header("authorization", format!("Bearer {DEVICE}"))
        .body(Body::from(json!({"registration_id": "a"}).to_string()))
        .unwrap();
    let response = server.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Bad listings.
    for query in [
        "state=lost",
        "limit=0",
        "limit=1001",
        "after=abc",
        "after=-3",
        "limit=x",
        "colour=red",
    ] {
        let (status, answer) = server
            .call("GET", &format!("/v1/devices?{query}"), Some(ADMIN), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        assert_eq!(error_of(&answer).0, "invalid_query", "{query}: {answer}");
    }
    let (status, answer) = server.call("GET", "/v2/nothing", Some(ADMIN), None).await;
    assert_eq!(
        (status, error_of(&answer).0),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // Nothing was stored.
    assert!(server.list_all("", 10).await.is_empty());
}

/// Fifty registrations of one id at once: exactly one creates it.
async fn simultaneous_registrations_of_one_id_create_it_once(db: Db) {
    let server = Arc::new(Server::start(db).await);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                server
                    .register(
                        json!({"registration_id": "same-phone", "app_version": i.to_string()}),
                    )
                    .await
                    .0
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("{other}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(server.list_all("", 10).await.len(), 1);
}

on_each_database!(
    register_update_unregister_and_register_again,
    registering_again_keeps_what_the_body_leaves_out,
    a_gone_device_stays_gone_until_registered_again,
    listing_pages_through_everything_once_and_filters,
    keys_are_checked_on_every_route_but_healthz,
    bad_input_gets_a_clear_error_and_is_not_stored,
    simultaneous_registrations_of_one_id_create_it_once,
);
