//! Operator endpoints that are not part of the original API.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use crate::adapter::ReloadError;

/// Load the configured adapter file again and swap it in.
///
/// Calls already running finish on the previous adapter. If the file does not load or fails
/// its checks, the previous adapter stays in service and the answer says why.
#[utoipa::path(
    post, path = "/admin/adapter/reload", tag = "admin",
    responses(
        (status = 200, description = "Swapped in; the body names the adapter now in service"),
        (status = 409, description = "No adapter is configured", body = super::models::ErrorResult),
        (status = 422, description = "The file did not load; the previous adapter stays", body = super::models::ErrorResult),
    )
)]
pub async fn reload_adapter(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    match app.adapters.reload().await {
        Ok(loaded) => Ok(Json(json!({ "reloaded": true, "adapter": loaded.info() }))),
        Err(e @ ReloadError::NotConfigured) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e @ ReloadError::Load(_)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.to_string(),
        )),
    }
}

/// The OpenAPI document, with the adapter in service's observation schema as the `obs`
/// field of `NewJob` (it changes when the adapter is swapped, so it is built per request).
pub async fn openapi_json(State(app): State<AppState>) -> Json<Value> {
    let mut doc = super::openapi();
    if let Some(facade) = &app.tape_rest {
        super::tape_rest::wire::document(&mut doc, &facade.cfg.base_path);
    }
    let mut doc = serde_json::to_value(doc).unwrap_or(Value::Null);
    if let Some(adapter) = app.adapters.current() {
        let mut schema = adapter.observation_schema().clone();
        if let Some(obj) = schema.as_object_mut() {
            // OpenAPI 3.1 takes JSON Schema, but the dialect is the document's.
            obj.remove("$schema");
            obj.entry("description").or_insert_with(|| {
                json!(format!(
                    "Observation for the {} adapter",
                    adapter.info().name
                ))
            });
        }
        if let Some(schemas) = doc
            .pointer_mut("/components/schemas")
            .and_then(Value::as_object_mut)
        {
            schemas.insert("Observation".into(), schema);
        }
        if let Some(obs) = doc.pointer_mut("/components/schemas/NewJob/properties/obs") {
            *obs = json!({
                "description": "Telescope-specific observation whose files should be staged",
                "oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Observation"}]
            });
        }
    }
    Json(doc)
}
