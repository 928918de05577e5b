//! The dashboard: its JSON on both backends, and the page in a real browser (Debian's
//! chromium, headless, driven through chromedriver) against a daemon with jobs in flight:
//! progress rendered, updated as files complete without a reload, a Scout node going down
//! shown, no script errors, and a screenshot under `target/dashboard/` for a person to look
//! at.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use staged::store::FileEvent;

use crate::common::daemon::free_port;
use crate::common::pipeline::{PIPELINE, Receiver, Tape, quick};
use crate::common::{Kind, NO_CALLBACK, TestApp, files_job, poll_until, wait_for};

both_backends!(the_json_shows_jobs_callbacks_and_history);

/// Jobs in flight with their progress, the outbox, finished jobs with their report links:
/// each list bounded, each figure what the store holds.
async fn the_json_shows_jobs_callbacks_and_history(kind: Kind) {
    let receiver = Receiver::start().await;
    // No Scout and no Kafka: the test settles files itself.
    let app = TestApp::start_with(kind, |c| {
        quick(c);
        c.callbacks.retry_min_secs = 60;
        c.callbacks.retry_max_secs = 60;
    })
    .await;
    for id in 1..=60 {
        assert_eq!(
            app.post_job(files_job(
                id,
                [format!("p/{id}/a"), format!("p/{id}/b")],
                NO_CALLBACK
            ))
            .await
            .0,
            202
        );
    }
    assert_eq!(
        app.post_job(files_job(100, ["q/1", "q/2", "q/3"], receiver.url()))
            .await
            .0,
        202
    );
    let (status, d) = app.get("/dashboard.json").await;
    assert_eq!(status, 200, "{d}");
    let jobs = d["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 50, "one page, however many are in flight");
    assert_eq!(jobs[0]["job_id"], 100, "newest first");
    assert_eq!(
        (&jobs[0]["total"], &jobs[0]["ready"], &jobs[0]["waiting"]),
        (&json!(3), &json!(0), &json!(3))
    );

    app.store()
        .apply_file_events(&[
            event("q/1", None),
            event("q/2", Some("tape error")),
            event("p/1/a", None),
        ])
        .await
        .unwrap();
    let (_, d) = app.get("/dashboard.json").await;
    let j = &d["jobs"][0];
    assert_eq!(
        (&j["ready"], &j["failed"], &j["waiting"]),
        (&json!(1), &json!(1), &json!(1))
    );

    app.store()
        .apply_file_events(&[event("q/3", None)])
        .await
        .unwrap();
    let finished = poll_until(PIPELINE, async || {
        let (_, d) = app.get("/dashboard.json").await;
        d["finished"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["job_id"] == 100))
    })
    .await;
    assert!(finished, "{}", app.describe(100).await);
    let (_, d) = app.get("/dashboard.json").await;
    let f = d["finished"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["job_id"] == 100)
        .unwrap()
        .clone();
    assert_ne!(
        f["return_code"], 0,
        "a failed file gives a code other than 0: {f}"
    );
    assert_eq!(f["report"], "/get_failed_job/?job_id=100");
    assert_eq!(f["delivered"], true);
    let (status, _) = app.get(f["report"].as_str().unwrap()).await;
    assert_eq!(status, 200, "the report link works");
    assert!(
        d["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["job_id"] != 100),
        "a finished job is no longer in flight"
    );
    assert_eq!(d["outbox"]["pending"], 0, "{d}");
    assert!(
        d["throughput"]["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
            >= 61
    );
    // The page and its script are served, open, with a policy refusing inline script.
    let r = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(r.text().await.unwrap().contains("/dashboard.js"));
    let r = app.http.get(app.url("/dashboard.js")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

fn event(path: &str, error: Option<&str>) -> FileEvent {
    FileEvent {
        path: path.into(),
        at_ms: staged::store::now_ms(),
        error: error.map(str::to_string),
    }
}

/// chromedriver on a port of its own, stopped with the test.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromedriver is not installed: apt-get install chromium chromium-driver");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        wait_for(
            "chromedriver to answer",
            Duration::from_secs(20),
            async || {
                reqwest::get(&status)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        Driver { child, url }
    }

    async fn browser(&self, width: u32, height: u32) -> Client {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromium is not installed: apt-get install chromium chromium-driver");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a person finds the screenshots: `target/dashboard/`.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a script in the page returns, as JSON.
async fn eval(b: &Client, script: &str) -> Value {
    b.execute(script, vec![]).await.expect(script)
}

/// Waits until `script` (returning a boolean) holds in the page.
async fn page_until(b: &Client, what: &str, script: &str) {
    let ok = poll_until(PIPELINE, async || eval(b, script).await == json!(true)).await;
    if !ok {
        let text = eval(b, "return document.body.innerText").await;
        panic!(
            "the page never showed {what}; it shows:\n{}",
            text.as_str().unwrap_or("")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_jobs_live_in_a_real_browser() {
    let tape = Tape::start(|s| {
        // Files come back one by one over several seconds, so that the page is seen
        // between states.
        s.recall_delay = Duration::from_secs(4);
        s.recall_spread = Duration::from_secs(6);
    })
    .await;
    let second = tape.sim.serve_loopback().await.unwrap();
    let receiver = Receiver::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
        c.scout.nodes.push(second.url());
        c.scout.eject_secs = 300.0;
        c.jobs.restage_interval_secs = 2;
    })
    .await;
    let driver = Driver::start().await;
    let b = driver.browser(1280, 1400).await;
    b.goto(&app.url("/")).await.unwrap();
    // Set once: a reload of the page would lose it.
    eval(&b, "window.loadedOnce = true; return true").await;
    page_until(
        &b,
        "its first poll",
        "return Number(document.body.dataset.polls || 0) >= 1",
    )
    .await;
    page_until(
        &b,
        "two healthy Scout nodes",
        "return [...document.querySelectorAll('#scout tr[data-node]')].filter(r => r.dataset.ejected === 'false').length === 2",
    )
    .await;

    for id in 1..=3 {
        let files: Vec<String> = (0..4).map(|f| format!("mwa/{id}/f{f}.fits")).collect();
        assert_eq!(
            app.post_job(files_job(id, files, receiver.url())).await.0,
            202
        );
    }
    page_until(
        &b,
        "job 3 in flight with 4 files waiting",
        "const r = document.getElementById('job-3'); return !!r && r.dataset.total === '4' && r.dataset.waiting === '4'",
    )
    .await;
    page_until(
        &b,
        "job 3 partly staged",
        "const r = document.getElementById('job-3'); return !r || Number(r.dataset.ready) > 0",
    )
    .await;
    page_until(
        &b,
        "job 3 finished with code 0",
        "const r = document.getElementById('finished-3'); return !!r && r.innerText.includes('0')",
    )
    .await;

    // The second node goes down: it answers nothing but 503, then not at all.
    second.set_failure_fraction(1.0);
    second.shutdown().await;
    for id in 4..=8 {
        assert_eq!(
            app.post_job(files_job(id, [format!("mwa/{id}/a.fits")], receiver.url()))
                .await
                .0,
            202
        );
    }
    page_until(
        &b,
        "a Scout node ejected",
        "return [...document.querySelectorAll('#scout tr[data-node]')].some(r => r.dataset.ejected === 'true')",
    )
    .await;
    page_until(
        &b,
        "Kafka connected",
        "const k = document.getElementById('kafka-state'); return !!k && k.dataset.connected === 'true'",
    )
    .await;

    assert_eq!(
        eval(&b, "return window.loadedOnce === true").await,
        json!(true),
        "the page reloaded"
    );
    let errors = eval(&b, "return window.stagedErrors").await;
    assert_eq!(errors, json!([]), "script errors in the page");
    let shot = screenshot_dir().join("dashboard.png");
    std::fs::write(&shot, b.screenshot().await.unwrap()).unwrap();
    println!("dashboard screenshot: {}", shot.display());

    // On a phone: nothing wider than the screen but the tables' own scrolling.
    b.set_window_size(390, 844).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let overflow = eval(
        &b,
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
    )
    .await;
    assert!(
        overflow.as_i64().unwrap() <= 1,
        "the page is {overflow} px wider than a phone"
    );
    let shot = screenshot_dir().join("dashboard-phone.png");
    std::fs::write(&shot, b.screenshot().await.unwrap()).unwrap();
    println!("dashboard screenshot (phone): {}", shot.display());
    b.close().await.unwrap();
    app.stop().await;
}

/// With tokens configured the page asks for one, and with a `read` token it shows the data;
/// the token is sent as a bearer token, not put in the page's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_token_when_auth_is_on() {
    let toml = "[[server.auth.tokens]]\nname = \"ops\"\nsecret = \"ops-dashboard-secret-0123\"\nscopes = [\"read\"]\n\
                [[server.auth.tokens]]\nname = \"robot\"\nsecret = \"robot-submit-secret-0123\"\nscopes = [\"submit\"]\n";
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        c.server.auth = staged::config::Config::parse(toml).unwrap().server.auth;
    })
    .await;
    let r = app
        .http
        .post(app.url("/staging/"))
        .bearer_auth("robot-submit-secret-0123")
        .json(&files_job(5, ["p/5"], NO_CALLBACK))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let driver = Driver::start().await;
    let b = driver.browser(1024, 900).await;
    b.goto(&app.url("/")).await.unwrap();
    page_until(
        &b,
        "the token form",
        "return !document.getElementById('login').hidden",
    )
    .await;
    // A token without the read scope is refused as such.
    let set_token = |t: &str| {
        format!(
            "document.getElementById('token').value = {t:?}; \
             document.getElementById('login-form').requestSubmit(); return true"
        )
    };
    eval(&b, &set_token("robot-submit-secret-0123")).await;
    page_until(
        &b,
        "that the token lacks the read scope",
        "return document.getElementById('status').textContent.includes('read scope')",
    )
    .await;
    eval(&b, &set_token("ops-dashboard-secret-0123")).await;
    page_until(
        &b,
        "job 5 once a read token is given",
        "return !!document.getElementById('job-5') && document.getElementById('login').hidden",
    )
    .await;
    assert_eq!(eval(&b, "return window.location.search").await, json!(""));
    assert_eq!(eval(&b, "return window.stagedErrors").await, json!([]));
    b.close().await.unwrap();
    app.stop().await;
}
