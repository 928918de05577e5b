//! Callback endpoints that misbehave, as real HTTP servers on loopback: one that accepts and
//! never answers, one answering 500, one resetting the connection, one answering 302 to
//! another endpoint that records what it gets. Each destination is its own port, so each is
//! its own host for the daemon's per-destination limits.
//!
//! What must hold: healthy destinations' callbacks arrive on time while the bad ones keep
//! retrying; a redirect is not a delivery (the target receives nothing and the job stays);
//! once an endpoint heals, each of its jobs is delivered exactly once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use staged::config::Config;
use staged::store::FileEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::ledger::{self, Row};
use crate::common::{Kind, TestApp};
use crate::common::{files_job, poll_until};

/// How an endpoint treats the next request it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Ok = 0,
    /// Reads the request, then holds the connection without answering.
    Hang = 1,
    Fail = 2,
    /// Reads the request, then resets the connection (RST, no answer).
    Reset = 3,
    /// 302 to the endpoint's `redirect_to`.
    Redirect = 4,
}

/// One request as an endpoint saw it; `status` 0 when it gave no answer.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    job_id: Option<i64>,
    status: u16,
    at: Instant,
}

/// A callback destination on its own loopback port.
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    redirect_to: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Endpoint {
    async fn start(mode: Mode) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = Endpoint {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(mode as u8)),
            redirect_to: Arc::default(),
            seen: Arc::default(),
        };
        let me = e.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(me.clone().serve(stream));
            }
        });
        e
    }

    fn url(&self, job_id: i64) -> String {
        format!("http://{}/cb/{job_id}", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn delivered(&self) -> Vec<i64> {
        self.seen()
            .iter()
            .filter(|s| s.status == 200)
            .filter_map(|s| s.job_id)
            .collect()
    }

    async fn serve(self, mut stream: TcpStream) {
        let Some((method, body)) = read_request(&mut stream).await else {
            return;
        };
        let job_id = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["job_id"].as_i64());
        let mode = match self.mode.load(Ordering::SeqCst) {
            0 => Mode::Ok,
            1 => Mode::Hang,
            2 => Mode::Fail,
            3 => Mode::Reset,
            _ => Mode::Redirect,
        };
        let (status, head) = match mode {
            Mode::Ok => (200, "200 OK".to_string()),
            Mode::Fail => (500, "500 Internal Server Error".to_string()),
            Mode::Redirect => (
                302,
                format!(
                    "302 Found\r\nlocation: {}",
                    self.redirect_to.lock().unwrap()
                ),
            ),
            Mode::Hang | Mode::Reset => (0, String::new()),
        };
        self.seen.lock().unwrap().push(Seen {
            method,
            job_id,
            status,
            at: Instant::now(),
        });
        match mode {
            Mode::Hang => {
                // Until the client gives up.
                let mut buf = [0u8; 256];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            }
            Mode::Reset => {
                let _ = stream.set_zero_linger();
                drop(stream);
            }
            _ => {
                let answer =
                    format!("HTTP/1.1 {head}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        }
    }
}

/// Reads one HTTP/1.1 request: its method and body (by content-length).
async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if data.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let method = head.split(' ').next().unwrap_or_default().to_string();
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
    Some((method, data[head_end..head_end + length].to_vec()))
}

/// The common quick timers, but an attempt times out after 2 s and an attempt unanswered
/// after 200 ms stops holding a delivery slot.
fn quick(c: &mut Config) {
    crate::common::pipeline::quick(c);
    c.callbacks.timeout_secs = 2;
    c.callbacks.per_minute = 120;
    c.callbacks.per_host_concurrency = 2;
    c.callbacks.slow_after_ms = 200;
}

fn path(job_id: i64) -> String {
    format!("cb/{job_id}")
}

/// Posts one single-file job per (id, url); returns the acknowledged ids.
async fn post_jobs(app: &TestApp, jobs: &[(i64, String)]) -> Vec<i64> {
    let mut acked = Vec::new();
    for (id, url) in jobs {
        let (status, body) = app.post_job(files_job(id, [path(*id)], url)).await;
        assert_eq!(status, 202, "job {id}: {body}");
        acked.push(*id);
    }
    acked
}

/// Makes the jobs' files ready, which completes them and queues their callbacks.
async fn complete(app: &TestApp, ids: &[i64]) {
    let events: Vec<FileEvent> = ids
        .iter()
        .map(|id| FileEvent {
            path: path(*id),
            at_ms: 1,
            error: None,
        })
        .collect();
    app.store().apply_file_events(&events).await.unwrap();
}

/// How many of `ids` the API still knows (not yet delivered and removed).
async fn stored(app: &TestApp, ids: &[i64]) -> u64 {
    let mut n = 0;
    for id in ids {
        let (status, _) = app.get(&format!("/staging/?job_id={id}")).await;
        if status == 200 {
            n += 1;
        }
    }
    n
}

/// Delivered callbacks per job over all endpoints.
fn deliveries(endpoints: &[&Endpoint]) -> HashMap<i64, usize> {
    let mut by_job = HashMap::new();
    for e in endpoints {
        for id in e.delivered() {
            *by_job.entry(id).or_insert(0) += 1;
        }
    }
    by_job
}

/// Waits until each of `ids` has a delivery, or `limit`.
async fn wait_all_delivered(endpoints: &[&Endpoint], ids: &[i64], limit: Duration) {
    poll_until(limit, async || {
        let d = deliveries(endpoints);
        ids.iter().all(|id| d.contains_key(id))
    })
    .await;
}

/// Ends the test's figures: every acknowledged job delivered exactly once, nothing left.
async fn settle_and_record(
    fault: &'static str,
    kind: Kind,
    app: &TestApp,
    endpoints: &[&Endpoint],
    acked: &[i64],
    stored_before: u64,
) {
    // A repeat would show within a retry interval.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let d = deliveries(endpoints);
    let still_stored = stored(app, acked).await;
    let called_back = acked.iter().filter(|id| d.contains_key(id)).count() as u64;
    let repeated: Vec<_> = acked
        .iter()
        .filter(|id| d.get(id).copied().unwrap_or(0) > 1)
        .collect();
    let row = Row {
        fault,
        backend: kind.name(),
        acknowledged: acked.len() as u64,
        stored: stored_before,
        called_back,
        // Neither delivered nor still waiting in the store.
        lost: (acked.len() as u64)
            .saturating_sub(called_back)
            .saturating_sub(still_stored),
    };
    ledger::record(&row);
    assert_eq!(row.lost, 0, "{row:?}");
    assert_eq!(
        called_back,
        acked.len() as u64,
        "every job delivered: {row:?}"
    );
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
    assert_eq!(still_stored, 0, "delivered jobs are removed");
    assert_eq!(app.store().pending_callbacks().await.unwrap(), 0);
}

crate::both_backends!(
    bad_endpoints_cost_only_their_own_jobs,
    redirect_is_not_a_delivery,
    failures_do_not_spend_a_healthy_destinations_budget
);

/// Many bad destinations (hanging, 500, resetting, redirecting) with callbacks queued
/// ahead of a healthy destination's: the healthy ones must arrive at once, not after the
/// bad ones' timeouts or budget, while the bad ones keep being retried; healed, every bad
/// job is delivered once.
async fn bad_endpoints_cost_only_their_own_jobs(kind: Kind) {
    let mut bad = Vec::new();
    for mode in [
        Mode::Hang,
        Mode::Hang,
        Mode::Hang,
        Mode::Hang,
        Mode::Fail,
        Mode::Fail,
        Mode::Fail,
        Mode::Fail,
        Mode::Reset,
        Mode::Reset,
        Mode::Redirect,
    ] {
        bad.push((mode, Endpoint::start(mode).await));
    }
    let target = Endpoint::start(Mode::Ok).await;
    for (_, e) in &bad {
        *e.redirect_to.lock().unwrap() = target.url(0);
    }
    let healthy = Endpoint::start(Mode::Ok).await;
    let app = TestApp::start_with(kind, quick).await;

    const PER_BAD: i64 = 8;
    let mut bad_jobs = Vec::new();
    for (i, (_, e)) in bad.iter().enumerate() {
        for k in 0..PER_BAD {
            let id = 1_000 + i as i64 * 100 + k;
            bad_jobs.push((id, e.url(id)));
        }
    }
    let healthy_jobs: Vec<(i64, String)> = (1..=20).map(|id| (id, healthy.url(id))).collect();
    let mut acked = post_jobs(&app, &bad_jobs).await;
    let bad_ids = acked.clone();
    let healthy_ids = post_jobs(&app, &healthy_jobs).await;
    acked.extend(&healthy_ids);
    let stored_before = stored(&app, &acked).await;

    // The bad callbacks are queued first and get going; then the healthy ones come due,
    // in four groups a quarter of a second apart.
    complete(&app, &bad_ids).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut due_at = HashMap::new();
    for group in healthy_ids.chunks(5) {
        complete(&app, group).await;
        let now = Instant::now();
        due_at.extend(group.iter().map(|id| (*id, now)));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let limit = Duration::from_secs(12);
    wait_all_delivered(&[&healthy], &healthy_ids, limit).await;
    let arrived: HashMap<i64, Instant> = healthy
        .seen()
        .iter()
        .filter(|s| s.status == 200)
        .filter_map(|s| Some((s.job_id?, s.at)))
        .collect();
    let mut latency: Vec<Duration> = healthy_ids
        .iter()
        .map(|id| match arrived.get(id) {
            Some(at) => at.saturating_duration_since(due_at[id]),
            None => limit,
        })
        .collect();
    latency.sort();
    let undelivered = healthy_ids.len() - arrived.len();
    println!(
        "healthy callbacks behind {} bad ones ({kind:?}): median {:?}, max {:?}, \
         {undelivered} of {} not delivered within {limit:?}",
        bad_ids.len(),
        latency[latency.len() / 2],
        latency[latency.len() - 1],
        healthy_ids.len()
    );
    assert_eq!(undelivered, 0, "healthy callbacks held up by bad endpoints");
    assert!(
        latency[latency.len() - 1] < Duration::from_secs(1),
        "healthy callbacks late: {latency:?}"
    );

    // The bad ones keep being retried (a hanging one after its 2 s timeout and backoff),
    // and none of their jobs is delivered or removed meanwhile.
    let retried = poll_until(Duration::from_secs(15), async || {
        bad.iter().all(|(_, e)| e.seen().len() >= 2)
    })
    .await;
    assert!(
        retried,
        "bad endpoints not retried: {:?}",
        bad.iter()
            .map(|(m, e)| (*m, e.seen().len()))
            .collect::<Vec<_>>()
    );
    for (mode, e) in &bad {
        assert!(e.delivered().is_empty(), "{mode:?} endpoint delivered to");
    }
    assert!(
        target.seen().is_empty(),
        "the redirect target was reached: {:?}",
        target.seen()
    );
    assert_eq!(stored(&app, &bad_ids).await, bad_ids.len() as u64);
    println!(
        "attempts per bad endpoint before healing: {:?}",
        bad.iter()
            .map(|(m, e)| (*m, e.seen().len()))
            .collect::<Vec<_>>()
    );

    for (_, e) in &bad {
        e.set(Mode::Ok);
    }
    let healed = Instant::now();
    let mut all: Vec<&Endpoint> = bad.iter().map(|(_, e)| e).collect();
    all.push(&healthy);
    all.push(&target);
    wait_all_delivered(&all, &bad_ids, Duration::from_secs(25)).await;
    println!(
        "bad endpoints healed: their {} callbacks delivered in {:?}",
        bad_ids.len(),
        healed.elapsed()
    );
    assert!(target.seen().is_empty(), "the redirect target was reached");
    settle_and_record(
        "callbacks: hang, 500, reset, redirect",
        kind,
        &app,
        &all,
        &acked,
        stored_before,
    )
    .await;
    app.stop().await;
}

/// A 302 is a failed attempt: reqwest would turn the POST into a bodiless GET to the
/// target, whose 200 must not count. The job stays until its endpoint answers 200 itself.
async fn redirect_is_not_a_delivery(kind: Kind) {
    let target = Endpoint::start(Mode::Ok).await;
    let redirecting = Endpoint::start(Mode::Redirect).await;
    *redirecting.redirect_to.lock().unwrap() = target.url(0);
    let app = TestApp::start_with(kind, quick).await;
    let jobs: Vec<(i64, String)> = (1..=5).map(|id| (id, redirecting.url(id))).collect();
    let acked = post_jobs(&app, &jobs).await;
    let stored_before = stored(&app, &acked).await;
    complete(&app, &acked).await;

    // Every job is attempted, then retried, and never reaches the target.
    let retried = poll_until(Duration::from_secs(15), async || {
        assert!(
            target.seen().is_empty(),
            "the redirect was followed: {:?}",
            target.seen()
        );
        redirecting.seen().len() >= 2 * acked.len()
    })
    .await;
    assert!(
        retried,
        "redirected callbacks not retried: {:?}",
        redirecting.seen()
    );
    assert!(
        target.seen().is_empty(),
        "the redirect was followed: {:?}",
        target.seen()
    );
    assert!(redirecting.seen().iter().all(|s| s.method == "POST"));
    assert_eq!(
        stored(&app, &acked).await,
        acked.len() as u64,
        "a redirected callback removed its job"
    );
    assert!(app.store().history(10).await.unwrap().is_empty());

    redirecting.set(Mode::Ok);
    wait_all_delivered(&[&redirecting, &target], &acked, Duration::from_secs(15)).await;
    assert!(target.seen().is_empty(), "the redirect target was reached");
    settle_and_record(
        "callbacks: redirect",
        kind,
        &app,
        &[&redirecting, &target],
        &acked,
        stored_before,
    )
    .await;
    app.stop().await;
}

/// The budget is per destination: a failing endpoint's retries spend its own, and a healthy
/// destination's callbacks go at once even after the failing one has spent all of its.
async fn failures_do_not_spend_a_healthy_destinations_budget(kind: Kind) {
    let failing = Endpoint::start(Mode::Fail).await;
    let healthy = Endpoint::start(Mode::Ok).await;
    const BUDGET: u32 = 20;
    let app = TestApp::start_with(kind, |c| {
        quick(c);
        c.callbacks.per_minute = BUDGET;
    })
    .await;
    let bad: Vec<(i64, String)> = (100..110).map(|id| (id, failing.url(id))).collect();
    let good: Vec<(i64, String)> = (1..=5).map(|id| (id, healthy.url(id))).collect();
    let mut acked = post_jobs(&app, &bad).await;
    let bad_ids = acked.clone();
    let good_ids = post_jobs(&app, &good).await;
    acked.extend(&good_ids);
    let stored_before = stored(&app, &acked).await;

    complete(&app, &bad_ids).await;
    // Long enough for retries of every failing job to spend a budget shared by both.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let spent = failing.seen().len();
    complete(&app, &good_ids).await;
    let due = Instant::now();
    let limit = Duration::from_secs(10);
    wait_all_delivered(&[&healthy], &good_ids, limit).await;
    let last = healthy
        .seen()
        .iter()
        .filter(|s| s.status == 200)
        .map(|s| s.at.saturating_duration_since(due))
        .max();
    println!(
        "healthy callbacks after {spent} failed attempts elsewhere, budget {BUDGET}/min \
         ({kind:?}): {} of {} delivered, last after {last:?}",
        healthy.delivered().len(),
        good_ids.len()
    );
    assert_eq!(
        healthy.delivered().len(),
        good_ids.len(),
        "healthy callbacks waited for a budget others spent"
    );
    assert!(last.is_some_and(|l| l < Duration::from_secs(1)), "{last:?}");
    assert!(failing.delivered().is_empty());
    assert!(
        failing.seen().len() as u32 <= BUDGET,
        "its own budget holds"
    );

    failing.set(Mode::Ok);
    wait_all_delivered(&[&failing], &bad_ids, Duration::from_secs(15)).await;
    settle_and_record(
        "callbacks: budget spent by failures",
        kind,
        &app,
        &[&failing, &healthy],
        &acked,
        stored_before,
    )
    .await;
    app.stop().await;
}
