//! The API's contract: the OpenAPI 3.1 document, generated from the handlers and types.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::error::{ErrorBody, ErrorDetail};
use super::{accounts, deliveries, devices, finish, ops, pushes};

/// The API's contract, generated from the handlers and types above.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "c2dm-server",
        description = "The C2DM application server: devices register, operators push, every device gets a record of what became of each push. Keys travel as `Authorization: Bearer <key>`: the device key on the device routes, the admin token on every route.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        devices::register, devices::unregister, devices::device, devices::list_devices,
        devices::device_counts, devices::device_history, pushes::push, pushes::list_pushes,
        pushes::status, pushes::cancel, finish::finish, deliveries::deliveries, accounts::accounts,
        ops::healthz, ops::metrics_text,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerKeys),
    tags(
        (name = "devices", description = "Phones register their ids; operators look them up."),
        (name = "pushes", description = "Pushes, their progress, and a row per device."),
        (name = "operations", description = "Health, figures and the sender accounts' pauses."),
    )
)]
pub(super) struct ApiDoc;

/// Declares the two keys, both `Authorization: Bearer`.
pub(super) struct BearerKeys;

impl utoipa::Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("admin_token", "the admin token: every route"),
            (
                "device_key",
                "the device key: registering and unregistering devices",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// The API's OpenAPI 3.1 document, as `GET /openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    add_links(&mut doc);
    doc
}

/// A link of the document: from an operation's answers (`method`, `path`, `statuses`), by
/// `name`, to operation `to`, its path parameter `parameter` filled from the answer's body's
/// property of the same name.
struct LinkRule {
    method: &'static str,
    path: &'static str,
    statuses: &'static [&'static str],
    name: &'static str,
    to: &'static str,
    parameter: &'static str,
}

const fn link(
    (method, path): (&'static str, &'static str),
    statuses: &'static [&'static str],
    name: &'static str,
    to: &'static str,
    parameter: &'static str,
) -> LinkRule {
    LinkRule {
        method,
        path,
        statuses,
        name,
        to,
        parameter,
    }
}

/// What a client (or schemathesis' stateful phase) can do next with an answer.
const LINKS: &[LinkRule] = &[
    link(
        ("post", "/v1/devices"),
        &["200", "201"],
        "device",
        "device",
        "registration_id",
    ),
    link(
        ("post", "/v1/devices"),
        &["200", "201"],
        "history",
        "device_history",
        "registration_id",
    ),
    link(
        ("post", "/v1/devices"),
        &["200", "201"],
        "unregister",
        "unregister",
        "registration_id",
    ),
    link(
        ("get", "/v1/devices/{registration_id}"),
        &["200"],
        "history",
        "device_history",
        "registration_id",
    ),
    link(
        ("post", "/v1/pushes"),
        &["200", "202"],
        "status",
        "status",
        "id",
    ),
    link(
        ("post", "/v1/pushes"),
        &["200", "202"],
        "deliveries",
        "deliveries",
        "id",
    ),
    link(
        ("post", "/v1/pushes"),
        &["200", "202"],
        "cancel",
        "cancel",
        "id",
    ),
    link(
        ("get", "/v1/pushes/{id}"),
        &["200"],
        "deliveries",
        "deliveries",
        "id",
    ),
    link(
        ("get", "/v1/pushes/{id}"),
        &["200"],
        "cancel",
        "cancel",
        "id",
    ),
    link(
        ("get", "/v1/pushes/{id}"),
        &["200"],
        "finish",
        "finish",
        "id",
    ),
    link(
        ("post", "/v1/pushes/{id}/cancel"),
        &["200"],
        "status",
        "status",
        "id",
    ),
    link(
        ("post", "/v1/pushes/{id}/cancel"),
        &["200"],
        "finish",
        "finish",
        "id",
    ),
    link(
        ("post", "/v1/pushes/{id}/finish"),
        &["200", "202"],
        "status",
        "status",
        "id",
    ),
    link(
        ("post", "/v1/pushes/{id}/finish"),
        &["200", "202"],
        "deliveries",
        "deliveries",
        "id",
    ),
];

/// Adds [`LINKS`] to the document's answers.
fn add_links(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::link::Link;

    for LinkRule {
        method,
        path,
        statuses,
        name,
        to,
        parameter,
    } in LINKS
    {
        let item = doc.paths.paths.get_mut(*path).expect("a documented path");
        let operation = match *method {
            "get" => item.get.as_mut(),
            "post" => item.post.as_mut(),
            _ => item.delete.as_mut(),
        }
        .expect("a documented operation");
        for status in *statuses {
            let Some(RefOr::T(response)) = operation.responses.responses.get_mut(*status) else {
                panic!("{method} {path} documents no {status}");
            };
            response.links.insert(
                (*name).to_owned(),
                RefOr::T(
                    Link::builder()
                        .operation_id(*to)
                        .parameter(*parameter, format!("$response.body#/{parameter}"))
                        .build(),
                ),
            );
        }
    }
}

/// The contract is public: it holds no secret, and clients (and fuzzers) read it first.
pub(super) async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(|| openapi().to_pretty_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], text.as_str()).into_response()
}

#[cfg(test)]
mod tests {
    use super::openapi;

    /// The API's table, one row an operation in the document's order: the method and path
    /// with its query parameters, the key it takes, and its summary.
    fn table() -> String {
        let doc = serde_json::to_value(openapi()).expect("serializes");
        let mut rows = vec![
            "| method and path | key | what |".to_owned(),
            "|---|---|---|".to_owned(),
        ];
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                let query: Vec<String> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| Some(format!("{}=", p["name"].as_str()?)))
                    .collect();
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", query.join("&"))
                };
                let schemes: Vec<&str> = op["security"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_object()?.keys().next().map(String::as_str))
                    .collect();
                let key = match (
                    schemes.contains(&"device_key"),
                    schemes.contains(&"admin_token"),
                ) {
                    (true, _) => "device or admin",
                    (false, true) => "admin",
                    (false, false) => "none",
                };
                let what = op["summary"]
                    .as_str()
                    .unwrap_or_default()
                    .replace('\n', " ");
                let method = method.to_uppercase();
                rows.push(format!("| `{method} {path}{query}` | {key} | {what} |"));
            }
        }
        rows.join("\n")
    }

    /// Every link leads to a documented operation, filling a path parameter it has from a
    /// property the answer's schema has.
    #[test]
    fn every_link_leads_somewhere() {
        let doc = serde_json::to_value(openapi()).expect("a document");
        let mut operations = std::collections::HashMap::new();
        for item in doc["paths"].as_object().expect("paths").values() {
            for op in item.as_object().expect("a path item").values() {
                operations.insert(op["operationId"].as_str().expect("an id").to_owned(), op);
            }
        }
        let mut links = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                for (status, response) in op["responses"].as_object().expect("responses") {
                    for (name, link) in response["links"].as_object().into_iter().flatten() {
                        links += 1;
                        let target = link["operationId"].as_str().expect("an operationId");
                        let target = operations.get(target).unwrap_or_else(|| {
                            panic!("{method} {path} {status} {name}: no {target}")
                        });
                        for (parameter, expression) in
                            link["parameters"].as_object().expect("parameters")
                        {
                            assert!(
                                target["parameters"].as_array().is_some_and(|ps| ps
                                    .iter()
                                    .any(|p| p["name"] == *parameter && p["in"] == "path")),
                                "{method} {path} {status} {name}: {parameter} is no path parameter"
                            );
                            let pointer = expression
                                .as_str()
                                .and_then(|e| e.strip_prefix("$response.body#/"))
                                .expect("a body pointer");
                            let schema = response["content"]["application/json"]["schema"]["$ref"]
                                .as_str()
                                .expect("a schema")
                                .trim_start_matches("#/components/schemas/");
                            let example = &doc["components"]["schemas"][schema]["example"];
                            assert!(
                                example.get(pointer).is_some(),
                                "{method} {path} {status} {name}: {schema} has no {pointer}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(links, 22);
    }

    /// docs/SERVER.md's table of the API is this document's: written from it (with
    /// `C2DM_WRITE_DOCS=1`), and checked against it, so the two never drift.
    #[test]
    fn the_servers_doc_has_the_documents_table() {
        const START: &str = "<!-- api:start -->\n";
        const END: &str = "<!-- api:end -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/SERVER.md");
        let doc = std::fs::read_to_string(path).expect("docs/SERVER.md");
        let (Some(start), Some(end)) = (doc.find(START), doc.find(END)) else {
            panic!("docs/SERVER.md has no {START:?} … {END:?} block");
        };
        let table = format!("{}\n", table());
        let shown = &doc[start + START.len()..end];
        if std::env::var_os("C2DM_WRITE_DOCS").is_some() {
            let written = format!("{}{table}{}", &doc[..start + START.len()], &doc[end..]);
            std::fs::write(path, written).expect("docs/SERVER.md written");
        } else {
            assert_eq!(
                shown, table,
                "docs/SERVER.md's API table is not the OpenAPI document's: \
                 `C2DM_WRITE_DOCS=1 cargo test -p c2dm-server --lib api::openapi` writes it"
            );
        }
    }
}
