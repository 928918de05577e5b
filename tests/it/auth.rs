//! API tokens and scopes (`[server.auth]`), over real HTTP on loopback: every endpoint of
//! the router refuses a request without a token (401) and one whose token lacks the scope
//! (403), and serves one with it; jobs record who submitted them and only that token or an
//! admin one may delete them; submissions beyond a token's rate get 429; tokens are
//! reloaded on SIGHUP; and without tokens the daemon will not listen beyond loopback.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use staged::api::access::{Access, RULES};
use staged::auth::Scope;
use staged::config::{AuthConfig, Config};

use crate::common::daemon::{Daemon, free_port, write_plain_config};
use crate::common::{Kind, NO_CALLBACK, TestApp, files_job, wait_for};

both_backends!(
    every_endpoint_needs_its_scope,
    jobs_record_their_submitter_who_alone_may_delete_them,
);

/// A token per scope (named for it, holding only it), and one holding none of the
/// rate-limited scope's neighbours; secrets are the name repeated.
fn secret(name: &str) -> String {
    format!("{name}-{name}-secret-0123456789")
}

fn token_toml(name: &str, scopes: &[Scope]) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{:?}", s.as_str())).collect();
    format!(
        "[[server.auth.tokens]]\nname = \"{name}\"\nsecret = \"{}\"\nscopes = [{}]\n",
        secret(name),
        scopes.join(", ")
    )
}

fn auth(toml: &str) -> AuthConfig {
    Config::parse(toml).expect("auth config").server.auth
}

/// One token with exactly each scope, and for each scope one with every other scope.
fn per_scope_tokens() -> AuthConfig {
    let mut toml = String::new();
    for s in Scope::ALL {
        toml.push_str(&token_toml(&format!("only-{s}"), &[s]));
        let others: Vec<Scope> = Scope::ALL.into_iter().filter(|o| *o != s).collect();
        toml.push_str(&token_toml(&format!("not-{s}"), &others));
    }
    auth(&toml)
}

/// Every (method, path) the router serves: each rule, in both slash forms, and every
/// operation of the OpenAPI document the daemon serves (so an endpoint documented without
/// a rule is walked too).
async fn endpoints(app: &TestApp) -> Vec<(Method, String)> {
    let mut all: Vec<(Method, String)> = Vec::new();
    for (m, p, _) in RULES {
        all.push((m.clone(), p.to_string()));
        if p.ends_with('/') {
            all.push((m.clone(), p.trim_end_matches('/').to_string()));
        }
    }
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200, "/openapi.json is open");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in item.as_object().unwrap().keys() {
            let m = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            if !all.iter().any(|(am, ap)| *am == m && ap == path) {
                all.push((m, path.clone()));
            }
        }
    }
    all
}

async fn call(
    app: &TestApp,
    m: &Method,
    path: &str,
    token: Option<&str>,
    n: i64,
) -> reqwest::Response {
    let url = match (m.as_str(), path.trim_end_matches('/')) {
        ("GET" | "DELETE", "/staging") => format!("{}?job_id={n}", app.url(path)),
        _ => app.url(path),
    };
    let mut req = app.http.request(m.clone(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    // A body each endpoint could act on: a fresh job for /staging/, paths for /filestatus/.
    req = match (m.as_str(), path.trim_end_matches('/')) {
        ("POST", "/staging") => req.json(&files_job(n, [&format!("p/{n}")], NO_CALLBACK)),
        ("POST", "/filestatus") => req.json(&json!({ "files": ["p/1"] })),
        _ => req,
    };
    req.send().await.unwrap()
}

async fn json_of(r: reqwest::Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}

async fn every_endpoint_needs_its_scope(kind: Kind) {
    let app = TestApp::start_with(kind, |c| c.server.auth = per_scope_tokens()).await;
    let endpoints = endpoints(&app).await;
    assert!(endpoints.len() >= 20, "{endpoints:?}");
    let mut n = 1000;
    for (m, path) in &endpoints {
        n += 1;
        let access = staged::api::access::rule(m, path);
        let what = format!("{m} {path} ({access:?})");
        let Access::Needs(scope) = access else {
            let r = call(&app, m, path, None, n).await;
            assert!(
                r.status() != 401 && r.status() != 403,
                "{what}: open, yet {}",
                r.status()
            );
            continue;
        };

        let r = call(&app, m, path, None, n).await;
        assert_eq!(r.status(), 401, "{what} without a token");
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
        assert!(json_of(r).await["errormsg"].is_string(), "{what}");

        let r = call(&app, m, path, Some("not-a-token-of-this-daemon"), n).await;
        assert_eq!(r.status(), 401, "{what} with an unknown token");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token"),
            "{what}"
        );

        let r = call(&app, m, path, Some(&secret(&format!("not-{scope}"))), n).await;
        assert_eq!(r.status(), 403, "{what} with every scope but {scope}");
        let msg = json_of(r).await["errormsg"].as_str().unwrap().to_string();
        assert!(msg.contains(scope.as_str()), "{what}: {msg}");

        let r = call(&app, m, path, Some(&secret(&format!("only-{scope}"))), n).await;
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(
            status != 401 && status != 403,
            "{what} with the {scope} scope: {status} {body}"
        );
    }
    // A scheme other than Bearer is refused as such, not as a missing token.
    let r = app
        .http
        .get(app.url("/get_stats/"))
        .basic_auth("user", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        json_of(r).await["errormsg"]
            .as_str()
            .unwrap()
            .contains("Bearer")
    );
    app.stop().await;
}

async fn jobs_record_their_submitter_who_alone_may_delete_them(kind: Kind) {
    let toml = [
        token_toml("asvo", &[Scope::Submit, Scope::Read, Scope::Cancel]),
        token_toml("other", &[Scope::Submit, Scope::Cancel]),
        token_toml("ops", &[Scope::Admin, Scope::Cancel]),
    ]
    .concat();
    let app = TestApp::start_with(kind, |c| c.server.auth = auth(&toml)).await;
    let post = async |who: &str, id: i64| {
        app.http
            .post(app.url("/staging/"))
            .bearer_auth(secret(who))
            .json(&files_job(id, [&format!("p/{id}")], NO_CALLBACK))
            .send()
            .await
            .unwrap()
            .status()
    };
    let delete = async |who: &str, id: i64| {
        app.http
            .delete(app.url(&format!("/staging/?job_id={id}")))
            .bearer_auth(secret(who))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(post("asvo", 1).await, 202);
    assert_eq!(post("asvo", 2).await, 202);
    assert_eq!(
        app.store().job_owner(1).await.unwrap(),
        Some(Some("asvo".to_string()))
    );

    let r = delete("other", 1).await;
    assert_eq!(r.status(), 403, "another token deletes asvo's job");
    assert!(
        json_of(r).await["errormsg"]
            .as_str()
            .unwrap()
            .contains("submitter")
    );
    assert!(
        app.store().job_exists(1).await.unwrap(),
        "refused, yet gone"
    );

    assert_eq!(delete("asvo", 1).await.status(), 200);
    assert_eq!(
        delete("ops", 2).await.status(),
        200,
        "an admin token deletes any job"
    );
    assert!(!app.store().job_exists(2).await.unwrap());
    assert_eq!(delete("other", 3).await.status(), 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_beyond_a_tokens_rate_get_429_with_retry_after() {
    let mut toml = token_toml("slow", &[Scope::Submit]);
    toml.push_str("submit_rate = 0.5\nsubmit_burst = 2\n");
    toml.push_str(&token_toml("fast", &[Scope::Submit]));
    let app = TestApp::start_with(Kind::Sqlite, |c| c.server.auth = auth(&toml)).await;
    let post = async |who: &str, id: i64| {
        app.http
            .post(app.url("/staging/"))
            .bearer_auth(secret(who))
            .json(&files_job(id, ["p/1"], NO_CALLBACK))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(post("slow", 1).await.status(), 202);
    assert_eq!(post("slow", 2).await.status(), 202);
    let r = post("slow", 3).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(
        json_of(r).await["errormsg"]
            .as_str()
            .unwrap()
            .contains("rate")
    );
    assert!(
        !app.store().job_exists(3).await.unwrap(),
        "a 429 stored the job"
    );
    // The other token has no limit, and is not charged for this one's.
    for id in 10..20 {
        assert_eq!(post("fast", id).await.status(), 202);
    }
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(post("slow", 3).await.status(), 202, "after Retry-After");
    app.stop().await;
}

/// Without tokens, an address other than loopback is refused at start unless
/// `allow_unauthenticated`; with a token it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_only_loopback_is_served() {
    let db = crate::common::TestDb::new(Kind::Sqlite).await;
    let mut c = db.config();
    c.server.listen = "0.0.0.0:0".parse().unwrap();
    let err = match staged::app::start(&c).await {
        Ok(_) => panic!("started on 0.0.0.0 with no tokens"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("allow_unauthenticated") && err.contains("server.auth"),
        "{err}"
    );
    c.server.allow_unauthenticated = true;
    let server = staged::app::start(&c).await.expect("allowed explicitly");
    server.stop().await.unwrap();
    c.server.allow_unauthenticated = false;
    c.server.auth = auth(&token_toml("asvo", &[Scope::Read]));
    let server = staged::app::start(&c).await.expect("with a token");
    // Reached over loopback only, as every test here.
    let url = format!("http://127.0.0.1:{}/get_stats/", server.addr.port());
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 401);
    server.stop().await.unwrap();
}

/// SIGHUP reads the config file again for its tokens: a new token works and a removed one
/// is refused at once; a file that no longer reads keeps the tokens in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reloaded_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = format!("sqlite://{}", dir.path().join("staged.db").display());
    let path = write_plain_config(dir.path(), &db, port);
    let plain = std::fs::read_to_string(&path).unwrap();
    let write = |tokens: &str| std::fs::write(&path, format!("{plain}\n{tokens}")).unwrap();
    write(&token_toml("first", &[Scope::Read, Scope::Submit]));
    let daemon = Daemon::start(&path, port).await;
    let http = reqwest::Client::new();
    // The log says who submitted a job.
    let r = http
        .post(format!("http://127.0.0.1:{port}/staging/"))
        .bearer_auth(secret("first"))
        .json(&files_job(7, ["p/7"], NO_CALLBACK))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let logged = crate::common::poll_until(Duration::from_secs(10), async || {
        plain_text(&daemon.log_text()).lines().any(|l| {
            l.contains("job accepted") && l.contains("token=\"first\"") && l.contains("job_id=7")
        })
    })
    .await;
    assert!(
        logged,
        "no acceptance naming the token in:\n{}",
        plain_text(&daemon.log_text())
    );
    let stats = async |who: &str| {
        http.get(format!("http://127.0.0.1:{port}/get_stats/"))
            .bearer_auth(secret(who))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(stats("first").await, 200);
    assert_eq!(stats("second").await, 401);

    write(&token_toml("second", &[Scope::Read]));
    daemon.signal(libc::SIGHUP);
    wait_for(
        "the reloaded token to work",
        Duration::from_secs(20),
        async || stats("second").await == 200,
    )
    .await;
    assert_eq!(stats("first").await, 401, "a removed token still works");

    std::fs::write(&path, format!("{plain}\n[server.auth]\nno_such_key = 1\n")).unwrap();
    daemon.signal(libc::SIGHUP);
    wait_for(
        "the daemon to log the bad file",
        Duration::from_secs(20),
        async || {
            daemon
                .log_text()
                .contains("keeping the API tokens in force")
        },
    )
    .await;
    assert_eq!(stats("second").await, 200, "a bad file dropped the tokens");
    assert!(
        !daemon.log_text().contains(&secret("second")),
        "a secret in the daemon's log"
    );
}

/// The log without its terminal colours.
fn plain_text(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
