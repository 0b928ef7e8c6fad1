//! The API's contract: the OpenAPI 3.1 document, generated from the handlers and types.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::error::{ErrorBody, ErrorDetail};
use super::{devices, ops, pushes};

/// The API's contract, generated from the handlers and types above.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "c2dm-server",
        description = "The C2DM application server: devices register, operators push, every device gets a record of what became of each push. Keys travel as `Authorization: Bearer <key>`: the device key on the device routes, the admin token on every route.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        devices::register, devices::unregister, devices::device, devices::list,
        devices::device_counts, devices::device_history, pushes::push, pushes::list,
        pushes::status, pushes::cancel, pushes::deliveries, ops::healthz,
        ops::metrics_text,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerKeys),
    tags(
        (name = "devices", description = "Phones register their ids; operators look them up."),
        (name = "pushes", description = "Pushes, their progress, and a row per device."),
        (name = "operations", description = "Health and figures."),
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
