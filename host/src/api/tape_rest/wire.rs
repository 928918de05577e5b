//! The facade's bodies, as the handlers send and read them and as `/openapi.json`
//! describes them: one set of types for both, so the document cannot drift from the wire.
//!
//! Invariants:
//! - Every answer body the facade sends is one of these types, serialized; the request
//!   bodies are read into these types (so what the document calls required is what the
//!   handlers require, with their own error wording for a missing field).
//! - The document's paths are the facade's routes under the configured base path, each
//!   with who may call it; [`document`] is the only place they are written.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;
use utoipa::ToSchema;

/// The discovery document (`/.well-known/wlcg-tape-rest-api`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Discovery {
    pub sitename: String,
    pub description: String,
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of the discovery document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Endpoint {
    /// The API's base URL (`tape_rest.public_url` + `tape_rest.base_path`).
    pub uri: String,
    /// Always `v1`.
    pub version: String,
    /// Always empty.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// `POST {base}/stage`'s body. Keys other than `files` are tolerated.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StageRequest {
    #[schema(required = true, min_items = 1)]
    pub files: Option<Vec<StageFile>>,
}

/// One file of a stage request. `diskLifetime` and `targetedMetadata` are accepted and
/// not used (the tape system keeps no pin), as are keys of other sites.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StageFile {
    /// The file's path, as in its URL (`/mwa/123/f.fits`).
    #[schema(required = true)]
    pub path: Option<String>,
    /// An ISO-8601 duration; accepted and ignored.
    #[serde(rename = "diskLifetime", default)]
    #[schema(value_type = Option<String>, example = "PT24H")]
    pub disk_lifetime: Option<IgnoredAny>,
    /// Per-site metadata keyed by site name; accepted and ignored.
    #[serde(rename = "targetedMetadata", default)]
    #[schema(value_type = Option<Object>)]
    pub targeted_metadata: Option<IgnoredAny>,
}

/// The body of cancel, release and archiveinfo.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PathsRequest {
    #[schema(required = true, min_items = 1)]
    pub paths: Option<Vec<String>>,
}

/// `POST {base}/stage`'s answer (201, with `Location`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageCreated {
    pub request_id: String,
}

/// `GET {base}/stage/{id}`'s answer. Times are Unix seconds.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    pub id: String,
    pub created_at: i64,
    /// When the tape system first accepted the request's files, else `createdAt`.
    pub started_at: i64,
    /// Once every file is settled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<i64>,
    pub files: Vec<FileStatus>,
}

/// One file of a polled request.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileStatus {
    /// As the client sent it (slashes collapsed).
    pub path: String,
    pub state: FileState,
    /// Only on `FAILED`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
}

/// A file's state. Cancellation is spelt `CANCELED`, as gfal2 (FTS's client) knows it:
/// it reports the specification's `CANCELLED` as an unrecognised state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FileState {
    Submitted,
    Started,
    Completed,
    Failed,
    Canceled,
}

/// One path's answer in `POST {base}/archiveinfo`: `locality`, or `error`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ArchiveInfo {
    /// As the client sent it.
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ArchiveInfo {
    pub fn locality(path: String, locality: Locality) -> ArchiveInfo {
        ArchiveInfo {
            path,
            locality: Some(locality),
            error: None,
        }
    }

    pub fn error(path: String, error: impl Into<String>) -> ArchiveInfo {
        ArchiveInfo {
            path,
            locality: None,
            error: Some(error.into()),
        }
    }
}

/// Where a file is: `TAPE` while blocks are offline, `DISK_AND_TAPE` online and archived,
/// `DISK` online and not archived, `UNAVAILABLE` when the tape system cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Locality {
    Tape,
    DiskAndTape,
    Disk,
    Unavailable,
}

/// Every error (RFC 7807), as `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemBody {
    /// Always `about:blank`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

const AUTH_STAGE: &str = "Callers: with neither `[server.auth]` tokens nor `[[tape_rest.issuers]]`, \
     loopback clients only. Otherwise an API token with `submit` or `admin`, or a WLCG token \
     whose `storage.stage:` scopes cover every path named.";
const AUTH_REQUEST: &str = "Callers: with neither `[server.auth]` tokens nor `[[tape_rest.issuers]]`, \
     loopback clients only. Otherwise the identity that made the request (API token or WLCG \
     `iss#sub`), an API token with `admin` (or `read`, to poll), or a WLCG token with \
     `storage.stage:/`; someone else's request is 404, as a missing one.";
const AUTH_READ: &str = "Callers: with neither `[server.auth]` tokens nor `[[tape_rest.issuers]]`, \
     loopback clients only. Otherwise an API token with `read`, `submit` or `admin`, or a \
     WLCG token whose `storage.read:` or `storage.stage:` scopes cover every path named.";

/// Discovery: where the API is and which version it speaks.
#[utoipa::path(
    get, path = "/.well-known/wlcg-tape-rest-api", tag = "tape-rest",
    description = "Open to every caller, whatever the auth: a client reads it before it knows where to send a token.",
    responses((status = 200, body = Discovery))
)]
#[allow(dead_code)]
fn discovery() {}

/// Stage files from tape.
///
/// Answered once the request and its files are stored. Duplicates are removed; a file
/// that cannot be staged fails in the poll result, with its reason, never the request.
#[utoipa::path(
    post, path = "/stage", tag = "tape-rest",
    description = AUTH_STAGE,
    request_body = StageRequest,
    responses(
        (status = 201, body = StageCreated, description = "Stored; `Location` is the request's URL"),
        (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "No non-empty `files`, a file without `path`, or more than `tape_rest.max_files_per_request` files"),
        (status = 401, body = ProblemBody, content_type = "application/problem+json", description = "No token or not a valid one (with `WWW-Authenticate: Bearer`)"),
        (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "The token does not allow staging a path named"),
        (status = 429, body = ProblemBody, content_type = "application/problem+json", description = "Over the API token's submission rate (with `Retry-After`)"),
    )
)]
#[allow(dead_code)]
fn stage() {}

/// A stage request's progress.
#[utoipa::path(
    get, path = "/stage/{id}", tag = "tape-rest",
    description = AUTH_REQUEST,
    params(("id" = String, Path, description = "The request's id")),
    responses(
        (status = 200, body = StageStatus),
        (status = 401, body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "No such request (or not the caller's)"),
    )
)]
#[allow(dead_code)]
fn poll() {}

/// Cancel files of a request: all or nothing.
///
/// Cancels at the tape system only the paths no other job or request still wants.
#[utoipa::path(
    post, path = "/stage/{id}/cancel", tag = "tape-rest",
    description = AUTH_REQUEST,
    params(("id" = String, Path, description = "The request's id")),
    request_body = PathsRequest,
    responses(
        (status = 200, description = "Cancelled; the body is empty"),
        (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "No non-empty `paths`, or a path not in the request (named; nothing changed)"),
        (status = 401, body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "Not the request's submitter, or a path the token does not cover"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "No such request (or not the caller's)"),
    )
)]
#[allow(dead_code)]
fn cancel() {}

/// Cancel what is still waiting and forget the request.
#[utoipa::path(
    delete, path = "/stage/{id}", tag = "tape-rest",
    description = AUTH_REQUEST,
    params(("id" = String, Path, description = "The request's id")),
    responses(
        (status = 200, description = "Deleted; later polls are 404"),
        (status = 401, body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "Not the request's submitter"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "No such request (or not the caller's)"),
    )
)]
#[allow(dead_code)]
fn delete() {}

/// Release files: they no longer count as wanted by the request.
///
/// 200 for any id: gfal2 releases with `gfal2-placeholder-id` when it has none.
#[utoipa::path(
    post, path = "/release/{id}", tag = "tape-rest",
    description = AUTH_STAGE,
    params(("id" = String, Path, description = "The request's id, or any other")),
    request_body = PathsRequest,
    responses(
        (status = 200, description = "Released; the body is empty"),
        (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "No non-empty `paths`"),
        (status = 401, body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "Not the request's submitter, or a path the token does not cover"),
    )
)]
#[allow(dead_code)]
fn release() {}

/// Where files are, from the tape system's file status.
///
/// Asked concurrently within the slots `/filestatus/` shares; beyond
/// `tape_rest.archiveinfo_max_paths` the rest of the list is left out, never an error.
#[utoipa::path(
    post, path = "/archiveinfo", tag = "tape-rest",
    description = AUTH_READ,
    request_body = PathsRequest,
    responses(
        (status = 200, body = Vec<ArchiveInfo>),
        (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "No non-empty `paths`"),
        (status = 401, body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "A path the token does not cover"),
    )
)]
#[allow(dead_code)]
fn archive_info() {}

#[derive(OpenApi)]
#[openapi(
    paths(discovery, stage, poll, cancel, delete, release, archive_info),
    components(schemas(
        Discovery,
        Endpoint,
        StageRequest,
        StageFile,
        PathsRequest,
        StageCreated,
        StageStatus,
        FileStatus,
        FileState,
        ArchiveInfo,
        Locality,
        ProblemBody
    ))
)]
struct TapeRestDoc;

/// Adds the facade's operations to `doc`, under `base` (the discovery document stays at
/// the host root), and its schemas to `doc`'s components.
pub fn document(doc: &mut utoipa::openapi::OpenApi, base: &str) {
    use utoipa::openapi::security::SecurityRequirement;
    let mut ours = TapeRestDoc::openapi();
    let paths = std::mem::take(&mut ours.paths.paths);
    for (path, mut item) in paths {
        let full = if path == super::WELL_KNOWN {
            path
        } else {
            format!("{base}{path}")
        };
        let open = full == super::WELL_KNOWN;
        for op in [item.get.as_mut(), item.post.as_mut(), item.delete.as_mut()]
            .into_iter()
            .flatten()
        {
            op.security = Some(vec![if open {
                SecurityRequirement::default()
            } else {
                SecurityRequirement::new("bearer", Vec::<String>::new())
            }]);
        }
        doc.paths.paths.insert(full, item);
    }
    if let Some(schemas) = ours.components.map(|c| c.schemas) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.schemas.extend(schemas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(base: &str) -> serde_json::Value {
        let mut d = crate::api::openapi();
        document(&mut d, base);
        serde_json::to_value(d).unwrap()
    }

    #[test]
    fn every_route_is_documented_under_the_base_path() {
        let d = doc("/tape/v1");
        let paths = d["paths"].as_object().unwrap();
        for (path, methods) in [
            (super::super::WELL_KNOWN, &["get"][..]),
            ("/tape/v1/stage", &["post"]),
            ("/tape/v1/stage/{id}", &["get", "delete"]),
            ("/tape/v1/stage/{id}/cancel", &["post"]),
            ("/tape/v1/release/{id}", &["post"]),
            ("/tape/v1/archiveinfo", &["post"]),
        ] {
            for m in methods {
                assert!(paths[path][m].is_object(), "{m} {path} is documented");
            }
        }
        let ours = paths
            .keys()
            .filter(|p| p.starts_with("/tape/") || p.starts_with("/.well-known"))
            .count();
        assert_eq!(ours, 6, "no other facade path");
        assert!(
            d["paths"]["/staging/"].is_object(),
            "the ASVO API is still there"
        );
    }

    #[test]
    fn only_discovery_is_open() {
        let d = doc("/api/v1");
        assert_eq!(
            d["paths"][super::super::WELL_KNOWN]["get"]["security"],
            serde_json::json!([{}])
        );
        assert_eq!(
            d["paths"]["/api/v1/stage"]["post"]["security"],
            serde_json::json!([{ "bearer": [] }])
        );
    }

    #[test]
    fn a_stage_file_tolerates_any_lifetime_and_metadata() {
        let f: StageFile = serde_json::from_str(
            r#"{"path":"/a","diskLifetime":7,"targetedMetadata":{"x":{"y":[1]}},"other":null}"#,
        )
        .unwrap();
        assert_eq!(f.path.as_deref(), Some("/a"));
    }

    #[test]
    fn states_and_localities_are_spelt_as_clients_expect() {
        let j = |v: serde_json::Result<serde_json::Value>| v.unwrap();
        assert_eq!(j(serde_json::to_value(FileState::Canceled)), "CANCELED");
        assert_eq!(j(serde_json::to_value(FileState::Completed)), "COMPLETED");
        assert_eq!(
            j(serde_json::to_value(Locality::DiskAndTape)),
            "DISK_AND_TAPE"
        );
        assert_eq!(
            j(serde_json::to_value(Locality::Unavailable)),
            "UNAVAILABLE"
        );
    }
}
