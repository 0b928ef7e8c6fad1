//! The OpenAPI document's examples, in one place so that they tell one story: user `alice`'s
//! phone registers, push 1 goes to her devices, and one of her old devices is gone at C2DM.
//! Every request and every answer has one (schemathesis' examples phase sends the requests'),
//! and a test checks each against its schema's properties.

use serde_json::{Value, json};

/// The registration id of the examples' phone.
pub(crate) const REGISTRATION_ID: &str = "APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

/// The examples' phone's registration id, as a path parameter's example.
pub(crate) fn registration_id() -> Value {
    Value::from(REGISTRATION_ID)
}

/// A time in the examples.
const AT: &str = "2026-12-08T10:15:30.250Z";

/// `POST /v1/devices`'s body.
pub(crate) fn registration() -> Value {
    json!({
        "registration_id": REGISTRATION_ID,
        "device_id": "pixel-7",
        "user_id": "alice",
        "tags": ["beta"],
        "app_version": "2.4.1",
        "provider": "c2dm"
    })
}

/// A device as the API shows it: what it registered, and what the server keeps of it.
pub(crate) fn device() -> Value {
    let mut device = registration();
    for (key, value) in [
        ("state", json!("active")),
        ("reason", Value::Null),
        ("created_at", json!(AT)),
        ("updated_at", json!(AT)),
        ("state_changed_at", json!(AT)),
    ] {
        device[key] = value;
    }
    device
}

/// A page of devices.
pub(crate) fn device_page() -> Value {
    json!({"devices": [device()], "next": "2"})
}

/// What became of push 1 on a device: accepted, or C2DM's `NotRegistered`.
fn delivery(registration_id: &str, accepted: bool) -> Value {
    json!({
        "registration_id": registration_id,
        "outcome": if accepted { "accepted" } else { "rejected" },
        "message_id": accepted.then_some("0:1765188930250%921c249a00000031"),
        "error": (!accepted).then_some("NotRegistered"),
        "attempts": 1,
        "possible_duplicates": 0,
        "at": AT
    })
}

/// A device's history.
pub(crate) fn device_history() -> Value {
    let mut row = delivery(REGISTRATION_ID, true);
    row["push_id"] = json!("1");
    json!({"deliveries": [row], "next": null})
}

/// `POST /v1/pushes`'s body.
pub(crate) fn push_request() -> Value {
    json!({
        "to": {"user_id": "alice"},
        "collapse_key": "order-17",
        "data": {"text": "Your order has shipped"},
        "delay_while_idle": false
    })
}

/// A push as a list shows it.
fn push_summary() -> Value {
    json!({
        "id": "1",
        "state": "done",
        "to": {"user_id": "alice"},
        "collapse_key": "order-17",
        "cancel_requested": false,
        "total": 2,
        "tally": {"accepted": 1, "rejected": 1, "failed": 0, "not_attempted": 0, "pending": 0},
        "created_at": AT,
        "finished_at": "2026-12-08T10:15:30.310Z",
        "last_error": null
    })
}

/// A push with its counts.
pub(crate) fn push() -> Value {
    let mut push = push_summary();
    push["counts"] = json!({
        "accepted": 1,
        "rejected": {"NotRegistered": 1},
        "failed": 0,
        "not_attempted": {},
        "pending": 0
    });
    push
}

/// A page of pushes.
pub(crate) fn push_page() -> Value {
    json!({"pushes": [push_summary()], "next": null})
}

/// A page of a push's rows.
pub(crate) fn delivery_page() -> Value {
    json!({
        "deliveries": [
            delivery(REGISTRATION_ID, true),
            delivery("APA91bFoi3lMMre9G3XzR1LrF4ZT82_15MsMdEICogXSLB8-MrdkRuRQFwNI5u8Dh0cI90ABD3BOKnxkEla8cGdisbDHl5cVIkZah5QUhSAxzx4Roa7b4xy9tvx9iNSYw", false)
        ],
        "next": null
    })
}

/// The sender accounts, one paused.
pub(crate) fn accounts() -> Value {
    json!({"accounts": [account()]})
}

/// A paused sender account.
pub(crate) fn account() -> Value {
    json!({
        "account": "sender@example.com",
        "paused_until": "2026-12-08T10:16:00.000Z",
        "pause_reason": "the service is unavailable (503), retry after 30 s",
        "budget_day": 20430,
        "budget_used": 12000
    })
}

/// A healthy server.
pub(crate) fn health() -> Value {
    json!({"status": "ok"})
}

/// An error.
pub(crate) fn error() -> Value {
    json!({
        "error": {
            "code": "invalid_field",
            "message": "collapse_key is empty",
            "field": "collapse_key"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::openapi;

    /// Every example of a component schema has the schema's required properties and no other
    /// than it names, one level down too, so that an example cannot drift from its type.
    #[test]
    fn each_example_has_its_schemas_properties() {
        let doc = serde_json::to_value(openapi()).expect("a document");
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let mut checked = 0;
        for (name, schema) in schemas {
            let Some(example) = schema.get("example").or_else(|| {
                schema
                    .get("examples")
                    .and_then(|e| e.as_array())
                    .and_then(|e| e.first())
            }) else {
                continue;
            };
            check(name, schema, example, schemas);
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} schemas have examples");
    }

    fn check(
        name: &str,
        schema: &serde_json::Value,
        example: &serde_json::Value,
        schemas: &serde_json::Map<String, serde_json::Value>,
    ) {
        // A flattened type is an allOf of its parts: every part's properties count.
        let parts: Vec<&serde_json::Value> = match schema.get("allOf").and_then(|a| a.as_array()) {
            Some(parts) => parts
                .iter()
                .map(|part| match part.get("$ref").and_then(|r| r.as_str()) {
                    Some(reference) => {
                        &schemas[reference.trim_start_matches("#/components/schemas/")]
                    }
                    None => part,
                })
                .collect(),
            None => vec![schema],
        };
        let mut properties = std::collections::BTreeSet::new();
        for part in &parts {
            if let Some(props) = part.get("properties").and_then(|p| p.as_object()) {
                properties.extend(props.keys().cloned());
            }
            for required in part
                .get("required")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
            {
                let required = required.as_str().expect("a name");
                assert!(
                    example.get(required).is_some(),
                    "{name}: the example has no {required}: {example}"
                );
            }
        }
        if properties.is_empty() {
            return;
        }
        for key in example.as_object().expect("an object example").keys() {
            assert!(
                properties.contains(key),
                "{name}: the example's {key} is not a property"
            );
        }
    }
}
