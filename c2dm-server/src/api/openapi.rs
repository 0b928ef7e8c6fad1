//! The API's contract: the OpenAPI 3.1 document, generated from the handlers and types.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::error::{ErrorBody, ErrorDetail};
use super::{accounts, devices, finish, ops, pushes};

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
        pushes::status, pushes::cancel, finish::finish, pushes::deliveries, accounts::accounts,
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
    doc
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
