//! Who may call which endpoint: the one table of each endpoint's required scope, and the
//! middleware that enforces it.
//!
//! Invariants this module keeps:
//! - [`RULES`] is the only place an endpoint's access is decided; the OpenAPI document's
//!   `security` entries are written from it ([`document`]), and a test walks it over the
//!   router.
//! - An endpoint the table does not list needs `admin` (fail closed): a new route added
//!   without a rule is not open to everyone.
//! - A request holds a token by its secret (`Authorization: Bearer`), or, without that
//!   header, by a client certificate verified against `server.tls.client_ca` whose name is
//!   the token's.
//! - With auth on, a request without a valid token gets 401 with `WWW-Authenticate:
//!   Bearer`, a valid token without the scope 403, both JSON with `errormsg`; the token's
//!   name is recorded in the request's log span and handed to the handler as a [`Caller`].
//! - Submissions are charged to their token's rate here, before the body is read.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Span;

use super::ApiError;
use super::rate_limit::SubmitLimiter;
use super::tls::PeerCertName;
use crate::auth::{Scope, TokenTable};

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, even with auth on (the probes, the API's own description).
    Open,
    Needs(Scope),
}

use Access::{Needs, Open};

/// Every endpoint's access, by method and path (paths as documented, with their trailing
/// slash; the twin without it has the same rule).
pub const RULES: &[(Method, &str, Access)] = &[
    (Method::POST, "/staging/", Needs(Scope::Submit)),
    (Method::GET, "/staging/", Needs(Scope::Read)),
    (Method::DELETE, "/staging/", Needs(Scope::Cancel)),
    (Method::GET, "/get_stats/", Needs(Scope::Read)),
    (Method::GET, "/get_joblist/", Needs(Scope::Read)),
    (Method::GET, "/get_failed_joblist/", Needs(Scope::Read)),
    (Method::GET, "/get_failed_job/", Needs(Scope::Read)),
    (Method::POST, "/filestatus/", Needs(Scope::Read)),
    (Method::POST, "/admin/adapter/reload", Needs(Scope::Admin)),
    (Method::GET, "/metrics", Needs(Scope::Metrics)),
    (Method::GET, "/dashboard.json", Needs(Scope::Read)),
    // The dashboard's page: static, its data comes from /dashboard.json.
    (Method::GET, "/", Open),
    (Method::GET, "/dashboard.js", Open),
    // The original's liveness probe: says nothing but that the daemon answers, as /livez.
    (Method::GET, "/ping/", Open),
    (Method::GET, "/livez", Open),
    (Method::GET, "/healthz", Open),
    (Method::GET, "/readyz", Open),
    (Method::GET, "/openapi.json", Open),
];

/// The rule for a request: HEAD is GET's, a path with or without its trailing slash the
/// same, anything unlisted `admin`.
pub fn rule(method: &Method, path: &str) -> Access {
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let path = path.trim_end_matches('/');
    RULES
        .iter()
        .find(|(m, p, _)| m == method && p.trim_end_matches('/') == path)
        .map(|(_, _, a)| *a)
        .unwrap_or(Needs(Scope::Admin))
}

/// Who is calling, for handlers that decide by it (a DELETE of another token's job).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name; `None` with auth off.
    pub token: Option<Arc<str>>,
    /// May act on any token's jobs: an `admin` token, or anyone with auth off.
    pub admin: bool,
}

impl Caller {
    pub fn anonymous() -> Caller {
        Caller {
            token: None,
            admin: true,
        }
    }
}

/// The tokens in force (swapped whole on reload) and the submission buckets.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Arc<ArcSwap<TokenTable>>,
    limiter: SubmitLimiter,
}

impl Auth {
    pub fn new(table: TokenTable) -> Auth {
        Auth {
            tokens: Arc::new(ArcSwap::from_pointee(table)),
            limiter: SubmitLimiter::default(),
        }
    }

    /// Puts a new token table in force for the next request.
    pub fn replace(&self, table: TokenTable) {
        tracing::info!(
            tokens = table.names().collect::<Vec<_>>().join(","),
            "API tokens in force"
        );
        self.tokens.store(Arc::new(table));
    }

    pub fn is_on(&self) -> bool {
        self.tokens.load().is_on()
    }

    /// The tokens in force now.
    pub fn table(&self) -> arc_swap::Guard<Arc<TokenTable>> {
        self.tokens.load()
    }

    /// Charges one submission to `token`'s rate (the Tape REST API's stage requests count
    /// as ASVO's jobs do); `Err` is how long to wait.
    pub fn admit_submission(&self, token: &crate::auth::Token) -> Result<(), std::time::Duration> {
        match token.rate {
            Some(rate) => self.limiter.admit(&token.name, rate),
            None => Ok(()),
        }
    }
}

/// The middleware: checks the request against its endpoint's rule.
pub async fn enforce(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let access = rule(req.method(), &path);
    let table = auth.tokens.load();
    let scope = match access {
        Open => {
            req.extensions_mut().insert(Caller::anonymous());
            return next.run(req).await;
        }
        _ if !table.is_on() => {
            req.extensions_mut().insert(Caller::anonymous());
            return next.run(req).await;
        }
        Needs(scope) => scope,
    };
    let presented = match bearer(&req) {
        Ok(p) => p,
        Err(()) => return unauthorized("the Authorization header is not `Bearer <token>`", true),
    };
    let token = match presented {
        Some(presented) => match table.by_secret(presented) {
            Some(t) => t,
            None => {
                tracing::warn!(%scope, "refused: unknown token");
                return unauthorized("the token is not valid", true);
            }
        },
        // A client certificate verified against `server.tls.client_ca` holds the token
        // of its name.
        None => match req.extensions().get::<PeerCertName>() {
            Some(PeerCertName(name)) => match table.by_name(name) {
                Some(t) => t,
                None => {
                    tracing::warn!(%scope, certificate = %name, "refused: no token of the client certificate's name");
                    return unauthorized(
                        &format!(
                            "the client certificate names {name:?}, which is no token of this daemon; send Authorization: Bearer <token>"
                        ),
                        false,
                    );
                }
            },
            None => {
                return unauthorized(
                    "this endpoint needs a token: Authorization: Bearer <token>",
                    false,
                );
            }
        },
    };
    Span::current().record("token", &*token.name);
    if !token.has(scope) {
        tracing::warn!(%scope, "refused: the token lacks the scope");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} does not have the {scope:?} scope this endpoint needs",
                &*token.name
            ),
        )
        .into_response();
    }
    if scope == Scope::Submit
        && let Some(rate) = token.rate
        && let Err(wait) = auth.limiter.admit(&token.name, rate)
    {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        tracing::info!(
            retry_after = secs,
            "refused: over the token's submission rate"
        );
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "token {:?} is over its submission rate of {} per second; retry after {secs} s",
                &*token.name, rate.per_second
            ),
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    req.extensions_mut().insert(Caller {
        token: Some(token.name.clone()),
        admin: token.has(Scope::Admin),
    });
    drop(table);
    next.run(req).await
}

/// The bearer token, `None` when there is no Authorization header, `Err` when it is not
/// a bearer token.
fn bearer(req: &Request) -> Result<Option<&str>, ()> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let (scheme, token) = value.split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(());
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(());
    }
    Ok(Some(token))
}

fn unauthorized(why: &str, invalid: bool) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, why).into_response();
    let challenge = if invalid {
        "Bearer realm=\"staged\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"staged\""
    };
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    r
}

/// Writes each operation's required scope into the OpenAPI document, from [`RULES`].
pub fn document(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error_body = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorResult")))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, op) in [
            (Method::GET, item.get.as_mut()),
            (Method::POST, item.post.as_mut()),
            (Method::PUT, item.put.as_mut()),
            (Method::DELETE, item.delete.as_mut()),
            (Method::PATCH, item.patch.as_mut()),
        ] {
            let Some(op) = op else { continue };
            let (requirement, note) = match rule(&method, path) {
                // An empty requirement: no authentication.
                Open => (
                    SecurityRequirement::default(),
                    "Open to every caller.".to_string(),
                ),
                Needs(scope) => (
                    SecurityRequirement::new("bearer", [scope.as_str()]),
                    format!(
                        "Needs a token with the `{scope}` scope when `[server.auth]` lists tokens."
                    ),
                ),
            };
            op.security = Some(vec![requirement]);
            if let Needs(scope) = rule(&method, path) {
                let mut refusals = vec![
                    (
                        "401",
                        "No token, or not a valid one (with `WWW-Authenticate: Bearer`)"
                            .to_string(),
                    ),
                    (
                        "403",
                        format!("The token does not have the `{scope}` scope"),
                    ),
                ];
                if scope == Scope::Submit {
                    refusals.push((
                        "429",
                        "Over the token's submission rate (with `Retry-After`)".to_string(),
                    ));
                }
                for (status, text) in refusals {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| {
                            ResponseBuilder::new()
                                .description(text)
                                .content("application/json", error_body.clone())
                                .build()
                                .into()
                        });
                }
            }
            op.description = Some(match op.description.take() {
                Some(d) if !d.is_empty() => format!("{d}\n\n{note}"),
                _ => note,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_both_slash_forms_and_head_and_fail_closed() {
        assert_eq!(rule(&Method::POST, "/staging"), Needs(Scope::Submit));
        assert_eq!(rule(&Method::POST, "/staging/"), Needs(Scope::Submit));
        assert_eq!(rule(&Method::HEAD, "/staging/"), Needs(Scope::Read));
        assert_eq!(rule(&Method::GET, "/livez"), Open);
        assert_eq!(rule(&Method::PUT, "/staging/"), Needs(Scope::Admin));
        assert_eq!(rule(&Method::GET, "/no/such/endpoint"), Needs(Scope::Admin));
    }

    #[test]
    fn every_documented_operation_has_a_rule_and_every_rule_is_documented() {
        let doc = super::super::openapi();
        let mut documented = Vec::new();
        for (path, item) in &doc.paths.paths {
            for (m, op) in [
                (Method::GET, &item.get),
                (Method::POST, &item.post),
                (Method::PUT, &item.put),
                (Method::DELETE, &item.delete),
                (Method::PATCH, &item.patch),
            ] {
                if let Some(op) = op {
                    documented.push((m.clone(), path.clone()));
                    assert!(
                        RULES.iter().any(|(rm, rp, _)| *rm == m && rp == path),
                        "{m} {path} is documented but has no access rule"
                    );
                    let security = op.security.as_ref().expect("security written");
                    assert_eq!(security.len(), 1);
                }
            }
        }
        for (m, p, _) in RULES {
            if matches!(*p, "/openapi.json" | "/healthz" | "/" | "/dashboard.js") {
                continue; // the document itself, an alias of /livez, the dashboard's page
            }
            assert!(
                documented.iter().any(|(dm, dp)| dm == m && dp == p),
                "{m} {p} has a rule but is not in the OpenAPI document"
            );
        }
    }
}
