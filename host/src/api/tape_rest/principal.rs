//! Who is calling the Tape REST API, and what they may do: the one place the facade's
//! access is decided.
//!
//! Invariants:
//! - With neither API tokens (`[server.auth]`) nor token issuers configured, only loopback
//!   clients are served (the daemon says so at start); anyone else gets 403.
//! - Otherwise every request holds a bearer token (or a client certificate named as an API
//!   token): an API token by its secret, or a WLCG token verified offline against a
//!   configured issuer. Without one: 401 with `WWW-Authenticate: Bearer`. A token is
//!   never logged; its name (an API token's) or identity (`iss#sub`) is, in the span.
//! - An API token with `submit` may stage, cancel and release any path; `read` may poll
//!   any request and ask for archive info; `admin` may do everything. A WLCG token's
//!   `storage.stage:/p` covers stage, cancel and release under `/p`, `storage.read:` or
//!   `storage.stage:` archive info; a request may be polled or changed by the identity
//!   that made it, or by a token with `storage.stage:/`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Span;

use super::Problem;
use crate::api::AppState;
use crate::api::tls::PeerCertName;
use crate::auth::Scope;
use crate::config::Config;
use crate::wlcg_token::{Claims, Verifier};

/// The client's address, given to every request by the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The WLCG token issuers in force, swapped whole on SIGHUP.
#[derive(Default)]
pub struct Verifiers {
    current: arc_swap::ArcSwapOption<Verifier>,
}

impl Verifiers {
    pub fn from_config(config: &Config) -> anyhow::Result<Verifiers> {
        let v = Verifiers::default();
        v.replace(config)?;
        Ok(v)
    }

    /// Puts `config`'s issuers in force; on an error the ones in force stay.
    pub fn replace(&self, config: &Config) -> anyhow::Result<()> {
        let issuers = &config.tape_rest.issuers;
        let next = if issuers.is_empty() {
            None
        } else {
            Some(Arc::new(
                Verifier::load(issuers).map_err(|e| anyhow::anyhow!("tape_rest.issuers: {e}"))?,
            ))
        };
        if let Some(v) = &next {
            tracing::info!(
                issuers = v.issuers().collect::<Vec<_>>().join(","),
                "WLCG token issuers in force"
            );
        }
        self.current.store(next);
        Ok(())
    }

    pub fn is_on(&self) -> bool {
        self.current.load().is_some()
    }
}

/// A caller of the facade.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No authentication is configured, and the client is on loopback.
    Anyone,
    /// An API token of `[server.auth]`.
    Token {
        name: Arc<str>,
        stage: bool,
        read: bool,
        admin: bool,
    },
    /// A WLCG token of a configured issuer.
    Wlcg(Box<Claims>),
}

impl Principal {
    /// Who made a request, as its row records it.
    pub fn identity(&self) -> Option<String> {
        match self {
            Principal::Anyone => None,
            Principal::Token { name, .. } => Some(name.to_string()),
            Principal::Wlcg(c) => Some(c.identity()),
        }
    }

    /// May stage, cancel or release `path` (a client path).
    pub fn may_stage(&self, path: &str) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Token { stage, admin, .. } => *stage || *admin,
            Principal::Wlcg(c) => c.scopes.may_stage(path),
        }
    }

    /// May ask for archive info of `path`.
    pub fn may_read(&self, path: &str) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Token {
                stage, read, admin, ..
            } => *stage || *read || *admin,
            Principal::Wlcg(c) => c.scopes.may_read(path),
        }
    }

    /// May see a request made by `owner`.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Token {
                name, read, admin, ..
            } => *read || *admin || owner == Some(&**name),
            Principal::Wlcg(c) => {
                c.scopes.may_stage_everything() || owner == Some(c.identity().as_str())
            }
        }
    }

    /// May change (cancel, delete, release) a request made by `owner`.
    pub fn may_change(&self, owner: Option<&str>) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Token {
                name, stage, admin, ..
            } => *admin || (*stage && owner == Some(&**name)),
            Principal::Wlcg(c) => {
                c.scopes.may_stage_everything() || owner == Some(c.identity().as_str())
            }
        }
    }
}

fn unauthorized(detail: impl Into<String>) -> Response {
    let mut p = Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized").detail(detail);
    p.challenge = true;
    p.into_response()
}

/// The middleware: finds the request's [`Principal`] and hands it to the handler.
pub async fn authenticate(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(facade) = app.tape_rest.as_ref() else {
        return Problem::new(StatusCode::NOT_FOUND, "Not Found").into_response();
    };
    let table = app.auth.table();
    let principal = if !table.is_on() && !facade.verifier.is_on() {
        let loopback = req
            .extensions()
            .get::<PeerAddr>()
            .is_some_and(|p| p.0.ip().is_loopback());
        if !loopback {
            return Problem::forbidden(
                "this Tape REST API has no authentication configured and serves loopback clients only",
            )
            .into_response();
        }
        Principal::Anyone
    } else {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .unwrap_or("")
                    .trim()
                    .to_string()
            });
        let token = match &bearer {
            Some(secret) => table.by_secret(secret),
            None => req
                .extensions()
                .get::<PeerCertName>()
                .and_then(|peer| table.by_name(&peer.0)),
        };
        let verifier = facade.verifier.current.load_full();
        let submits = req.method() == axum::http::Method::POST
            && req.uri().path().trim_end_matches('/').ends_with("/stage");
        if submits
            && let Some(t) = token
            && let Err(wait) = app.auth.admit_submission(t)
        {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            tracing::info!(
                retry_after = secs,
                "refused: over the token's submission rate"
            );
            let mut resp = Problem::new(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
                .detail(format!(
                    "token {:?} is over its submission rate; retry after {secs} s",
                    &*t.name
                ))
                .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
            return resp;
        }
        match (token, bearer, verifier) {
            (Some(t), _, _) => Principal::Token {
                name: t.name.clone(),
                stage: t.has(Scope::Submit),
                read: t.has(Scope::Read),
                admin: t.has(Scope::Admin),
            },
            (None, None, _) => return unauthorized("a bearer token is required"),
            (None, Some(jwt), Some(v)) => match v.verify(&jwt) {
                Ok(claims) => Principal::Wlcg(Box::new(claims)),
                Err(e) => {
                    tracing::info!(reason = %e, "refused a WLCG token");
                    return unauthorized(format!("the token is not valid: {e}"));
                }
            },
            (None, Some(_), None) => return unauthorized("the token is not valid"),
        }
    };
    if let Some(who) = principal.identity() {
        Span::current().record("token", who.as_str());
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}
