//! SIGKILL at random points of a mixed run, on both backends, several rounds, counted.
//!
//! The real binary runs against the Scout simulator (publishing recall messages to a mock
//! Kafka cluster in the test process) and a callback receiver that answers 500 to its first
//! calls, with the MWA adapter and a metadata service simulator. Concurrent clients post
//! file-list jobs (some sharing a path) and observation jobs, a deleter removes
//! some of the acknowledged ones, and the daemon is killed with SIGKILL at a random moment
//! and restarted on the same store, round after round. Each round's moment is a random
//! delay followed, in turn, by nothing, the next 202, the next delivered callback or the
//! next DELETE answered 200, so that the kills land where a promise is being kept. Then
//! the daemon is left to finish, and every job is accounted for:
//!
//! - every 202 is stored: it reaches a delivered callback, or was removed by a DELETE that
//!   answered 200 (or by one cut short by a kill, after which the job is gone and was never
//!   called back), and nothing acknowledged is still waiting when the run ends;
//! - every acknowledged job is called back exactly once, unless it was deleted; a second
//!   delivery is allowed only when a kill fell between the two and the first came shortly
//!   before that kill (its outcome was in flight when the daemon died);
//! - no callback is sent for a job that was refused or never posted, and each says the
//!   job's files were all staged.
//!
//! The kill schedule and the jobs' shapes come from a seed, printed at the start
//! (`crash seed: N`): `STAGED_FAULT_SEED=N` replays the schedule (the interleaving with the
//! daemon's own timing is not reproducible). `STAGED_FAULT_ROUNDS` sets the number of kills
//! per backend (default 3, a few seconds each, for CI); e.g. `STAGED_FAULT_ROUNDS=30 cargo
//! test -p staged --test it faults::crash::` runs a long campaign.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::common::pipeline::{Receiver, Tape};
use staged_testkit::metadata::{MetadataSim, ObsFiles};

use super::ledger::{self, Row};
use crate::common::daemon::{Daemon, free_port, toml_str, write_pipeline_config};
use crate::common::{Kind, TestDb};
use crate::common::{files_job, obs_job, poll_until};

/// Kills per backend when `STAGED_FAULT_ROUNDS` is not set.
const DEFAULT_ROUNDS: usize = 3;
/// Concurrent clients posting jobs.
const CLIENTS: usize = 6;
/// Most jobs posted per round, so that the finish stays short however fast the machine.
const JOBS_PER_ROUND: i64 = 300;
/// Callbacks answered 500 before the receiver starts accepting them.
const FAIL_FIRST: usize = 25;
/// How long before a kill a delivered callback may be and still count as in flight at it:
/// between the receiver's 200 and the commit that removes the job, on a loaded machine.
const IN_FLIGHT: Duration = Duration::from_secs(5);
/// How long the run may take to finish after the last restart.
const FINISH_LIMIT: Duration = Duration::from_secs(45);
/// Observations the metadata service knows (ids from `OBS_BASE`), and files in each.
const OBS_BASE: i64 = 1_300_000_000;
const OBSERVATIONS: i64 = 40;
const FILES_PER_OBSERVATION: usize = 2;

/// The metadata service's observations: a few jobs ask for the same one, so they share
/// its files.
fn observations() -> HashMap<i64, ObsFiles> {
    (0..OBSERVATIONS)
        .map(|k| {
            let obs = OBS_BASE + k;
            let files = (0..FILES_PER_OBSERVATION)
                .map(|ch| {
                    (
                        format!("{obs}_ch{ch:03}.fits"),
                        Some("crash-vis".to_string()),
                        Some(format!("/{obs}")),
                    )
                })
                .collect();
            (obs, files)
        })
        .collect()
}

crate::both_backends!(sigkill_at_random_points_of_a_mixed_run);

/// What became of one posted job, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Posted {
    /// 202: the daemon promised to keep it.
    Acknowledged,
    /// A 4xx answer: the job was refused, and must never be called back.
    Refused(u16),
    /// No answer (the daemon died or was down) or a 5xx: it may or may not be stored.
    Unknown,
}

/// The moment of a round's kill, after its random delay.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// Then and there, whatever the daemon is doing.
    AtOnce,
    /// Just after a 202 reached a client (intake batches in flight behind it).
    AfterA202,
    /// Just after the receiver answered 200 to a callback, before the daemon can have
    /// recorded it: the job is to be called back again.
    AfterACallback,
    /// Just after a DELETE answered 200 (Scout's cancel and the removal just done).
    AfterADelete,
}

impl KillPoint {
    const ALL: [KillPoint; 4] = [
        KillPoint::AtOnce,
        KillPoint::AfterA202,
        KillPoint::AfterACallback,
        KillPoint::AfterADelete,
    ];

    /// Waits for the moment (at most a few seconds); returns whether it came.
    async fn wait(self, events: &Events, receiver: &Receiver) -> bool {
        let limit = Duration::from_secs(4);
        match self {
            KillPoint::AtOnce => true,
            KillPoint::AfterA202 => tokio::time::timeout(limit, events.acknowledged.notified())
                .await
                .is_ok(),
            KillPoint::AfterADelete => tokio::time::timeout(limit, events.deleted.notified())
                .await
                .is_ok(),
            KillPoint::AfterACallback => {
                let before = receiver.delivered().len();
                let deadline = Instant::now() + limit;
                while Instant::now() < deadline {
                    if receiver.delivered().len() > before {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                false
            }
        }
    }
}

/// What the clients signal to the kill schedule.
#[derive(Default)]
struct Events {
    acknowledged: tokio::sync::Notify,
    deleted: tokio::sync::Notify,
}

/// What became of a DELETE of an acknowledged job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deleted {
    /// 200: removed before its callback was delivered (one may still have been in flight).
    Yes,
    /// 404: already finished, so it must have been called back.
    AlreadyGone,
    /// Cut short by a kill and 404 afterwards: removed by that DELETE or finished.
    Cut,
}

#[derive(Default)]
struct Journal {
    jobs: BTreeMap<i64, (Posted, usize)>,
    deleted: HashMap<i64, Deleted>,
}

async fn sigkill_at_random_points_of_a_mixed_run(kind: Kind) {
    let rounds = std::env::var("STAGED_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    let seed = std::env::var("STAGED_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(rand::random);
    let backend = kind.name();
    eprintln!(
        "crash seed: {seed} ({backend}, {rounds} rounds; replay with STAGED_FAULT_SEED={seed})"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let tape = Tape::start(|s| s.recall_delay = Duration::from_millis(150)).await;
    let receiver = Receiver::start().await;
    receiver
        .fail_first
        .store(FAIL_FIRST, std::sync::atomic::Ordering::SeqCst);
    let db = TestDb::new(kind).await;
    let port = free_port();
    let group = format!("crash-{}", rand::random::<u32>());
    let metadata = MetadataSim::start(observations())
        .await
        .expect("starting the metadata service simulator");
    let config = write_config(db.dir.path(), &db.url, port, &tape, &metadata, &group);
    let mut daemon = Daemon::start(&config, port).await;
    let base = daemon.base.clone();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let journal = Arc::new(Mutex::new(Journal::default()));
    let running = Arc::new(AtomicBool::new(true));
    let next_id = Arc::new(AtomicI64::new(1));
    let id_cap = Arc::new(AtomicI64::new(JOBS_PER_ROUND));
    let (to_delete, deletions) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let events = Arc::new(Events::default());

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let client = Client {
            http: http.clone(),
            base: base.clone(),
            notify: receiver.url(),
            journal: journal.clone(),
            running: running.clone(),
            next_id: next_id.clone(),
            id_cap: id_cap.clone(),
            to_delete: to_delete.clone(),
            events: events.clone(),
            rng: StdRng::seed_from_u64(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        };
        clients.push(tokio::spawn(client.run()));
    }
    drop(to_delete);
    let deleter = tokio::spawn(delete_some(
        http.clone(),
        base.clone(),
        journal.clone(),
        events.clone(),
        deletions,
        StdRng::seed_from_u64(seed.rotate_left(17)),
    ));

    // The kill schedule: a random moment in each round, then a restart on the same store.
    let mut kills: Vec<Instant> = Vec::new();
    let first_point = rng.random_range(0..KillPoint::ALL.len());
    for round in 0..rounds {
        // Each kind of moment in turn, so that even three rounds see three of them.
        let point = KillPoint::ALL[(first_point + round) % KillPoint::ALL.len()];
        let wait = rng.random_range(200..1200u64);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let caught = point.wait(&events, &receiver).await;
        daemon.kill();
        kills.push(Instant::now());
        daemon.wait_exit(Duration::from_secs(10));
        eprintln!(
            "round {round}: killed {point:?} (caught: {caught}) after {wait} ms with {} jobs posted",
            next_id.load(Ordering::Relaxed) - 1
        );
        id_cap.fetch_add(JOBS_PER_ROUND, Ordering::Relaxed);
        daemon = Daemon::start(&config, port).await;
    }
    // A last stretch of traffic on the daemon that will finish the run.
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..800u64))).await;
    running.store(false, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    deleter.await.unwrap();

    // Finish: every acknowledged job that was not deleted is called back, and nothing is
    // left in the store.
    let mut left = None;
    let finished = poll_until(FINISH_LIMIT, async || {
        left = jobs_left(&http, &base).await;
        let waiting = owed_callbacks(&journal.lock().unwrap(), &receiver);
        left == Some(0) && waiting.is_empty()
    })
    .await;
    let left = if finished { 0 } else { left.unwrap_or(-1) };
    // Room for a late, unexplained repeat to show.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let journal = journal.lock().unwrap();
    let tally = Tally::count(&journal, &receiver, &kills, left);
    eprintln!("crash ({backend}): {tally:#?}");
    ledger::record(&Row {
        fault: "sigkill mixed run",
        backend,
        acknowledged: tally.acknowledged,
        stored: tally.stored,
        called_back: tally.called_back,
        lost: tally.lost,
    });
    let log = || daemon.log_text();
    assert!(
        tally.acknowledged > 0,
        "no job was acknowledged; log:\n{}",
        log()
    );
    assert_eq!(
        tally.lost, 0,
        "acknowledged jobs lost (seed {seed}): {:?}",
        tally.lost_ids
    );
    assert!(
        tally.stuck_ids.is_empty(),
        "acknowledged jobs not called back within {FINISH_LIMIT:?} (seed {seed}): {:?}; {left} jobs left in the store; log:\n{}",
        tally.stuck_ids,
        log()
    );
    assert_eq!(left, 0, "jobs left in the store at the end (seed {seed})");
    assert!(
        tally.unexplained_repeats.is_empty(),
        "callbacks repeated without a kill while they were in flight (seed {seed}): {:?}",
        tally.unexplained_repeats
    );
    assert!(
        tally.phantoms.is_empty(),
        "callbacks for jobs that were refused or never posted (seed {seed}): {:?}",
        tally.phantoms
    );
    assert!(
        tally.wrong.is_empty(),
        "callbacks that do not say every file was staged (seed {seed}): {:?}",
        tally.wrong
    );
    drop(daemon);
}

/// A client posting jobs until told to stop, each id once whatever the answer (a repeat
/// after a lost answer could be a second job under the same id).
struct Client {
    http: reqwest::Client,
    base: String,
    notify: String,
    journal: Arc<Mutex<Journal>>,
    running: Arc<AtomicBool>,
    next_id: Arc<AtomicI64>,
    id_cap: Arc<AtomicI64>,
    to_delete: tokio::sync::mpsc::UnboundedSender<i64>,
    events: Arc<Events>,
    rng: StdRng,
}

impl Client {
    async fn run(mut self) {
        while self.running.load(Ordering::Relaxed) {
            let pause = Duration::from_millis(self.rng.random_range(10..50u64));
            tokio::time::sleep(pause).await;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id > self.id_cap.load(Ordering::Relaxed) {
                // This round's budget is spent: wait for the next one.
                self.next_id.fetch_sub(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // A quarter are observations, which the adapter resolves to their files.
            let (body, files) = if self.rng.random_bool(0.25) {
                let obs = OBS_BASE + self.rng.random_range(0..OBSERVATIONS);
                let body = obs_job(id, json!({"obs_id": obs}), &self.notify);
                (body, FILES_PER_OBSERVATION)
            } else {
                // Paths the MWA adapter recognises as its own (under mwa/).
                let mut files: Vec<String> = (0..self.rng.random_range(1..=3))
                    .map(|i| format!("mwa/crash/{id}/f{i}.fits"))
                    .collect();
                if self.rng.random_bool(0.2) {
                    // A path several jobs want: one recall completes them all.
                    files.push(format!(
                        "mwa/crash/shared/s{}.fits",
                        self.rng.random_range(0..5)
                    ));
                }
                let n = files.len();
                (files_job(id, files, &self.notify), n)
            };
            let answer = self
                .http
                .post(format!("{}/staging/", self.base))
                .json(&body)
                .send()
                .await;
            let posted = match answer {
                Ok(r) if r.status() == 202 => Posted::Acknowledged,
                Ok(r) if r.status().is_client_error() => Posted::Refused(r.status().as_u16()),
                // A 5xx promises nothing either way (the commit's fate may be unknown).
                _ => Posted::Unknown,
            };
            self.journal
                .lock()
                .unwrap()
                .jobs
                .insert(id, (posted, files));
            if posted == Posted::Acknowledged {
                self.events.acknowledged.notify_waiters();
            }
            if posted == Posted::Acknowledged && self.rng.random_bool(0.12) {
                let _ = self.to_delete.send(id);
            }
        }
    }
}

/// Deletes the jobs it is sent, after a random delay; a DELETE cut short by a kill is
/// repeated until the daemon answers.
async fn delete_some(
    http: reqwest::Client,
    base: String,
    journal: Arc<Mutex<Journal>>,
    events: Arc<Events>,
    mut ids: tokio::sync::mpsc::UnboundedReceiver<i64>,
    mut rng: StdRng,
) {
    while let Some(id) = ids.recv().await {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300u64))).await;
        let mut cut = false;
        let mut outcome = None;
        for _ in 0..200 {
            match http
                .delete(format!("{base}/staging/?job_id={id}"))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => {
                    outcome = Some(Deleted::Yes);
                    events.deleted.notify_waiters();
                    break;
                }
                Ok(r) if r.status() == 404 => {
                    outcome = Some(if cut {
                        Deleted::Cut
                    } else {
                        Deleted::AlreadyGone
                    });
                    break;
                }
                // A 5xx or no answer: the daemon is down or dying; whether it removed the
                // job is unknown until it answers again.
                _ => {
                    cut = true;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let outcome = outcome.unwrap_or_else(|| panic!("DELETE of job {id} never answered"));
        journal.lock().unwrap().deleted.insert(id, outcome);
    }
}

/// Acknowledged jobs that are not deleted and have no delivered callback yet.
fn owed_callbacks(journal: &Journal, receiver: &Receiver) -> Vec<i64> {
    let delivered = deliveries(receiver);
    journal
        .jobs
        .iter()
        .filter(|(id, (posted, _))| {
            *posted == Posted::Acknowledged
                && !matches!(journal.deleted.get(id), Some(Deleted::Yes | Deleted::Cut))
                && !delivered.contains_key(id)
        })
        .map(|(id, _)| *id)
        .collect()
}

/// Delivered callbacks (answered 200) per job id, in the order they arrived.
fn deliveries(receiver: &Receiver) -> HashMap<i64, Vec<(Instant, Value)>> {
    let mut by_job: HashMap<i64, Vec<(Instant, Value)>> = HashMap::new();
    for r in receiver.delivered() {
        let id = r.body["job_id"].as_i64().unwrap_or(-1);
        by_job.entry(id).or_default().push((r.at, r.body));
    }
    for d in by_job.values_mut() {
        d.sort_by_key(|(at, _)| *at);
    }
    by_job
}

/// Jobs still in the store, or `None` when the daemon does not answer.
async fn jobs_left(http: &reqwest::Client, base: &str) -> Option<i64> {
    let r = http.get(format!("{base}/get_joblist/")).send().await.ok()?;
    let v: Value = r.json().await.ok()?;
    Some(v["jobs"].as_object()?.len() as i64)
}

/// Some figures are only read through `Debug`, in the test's output.
#[allow(dead_code)]
#[derive(Debug, Default)]
struct Tally {
    posted: u64,
    acknowledged: u64,
    refused: u64,
    unknown: u64,
    /// Acknowledged and accounted for by the store: called back, deleted, or (when the run
    /// did not finish) still there.
    stored: u64,
    called_back: u64,
    deleted: u64,
    deleted_by_a_cut_delete: u64,
    lost: u64,
    /// Posts without an answer that were stored all the same (and called back).
    unknown_called_back: u64,
    repeats_in_flight_at_a_kill: u64,
    /// Longest time from a first delivery to the kill that made it repeat.
    longest_in_flight: Duration,
    lost_ids: Vec<i64>,
    stuck_ids: Vec<i64>,
    unexplained_repeats: Vec<i64>,
    phantoms: Vec<i64>,
    wrong: Vec<(i64, Value)>,
}

impl Tally {
    fn count(journal: &Journal, receiver: &Receiver, kills: &[Instant], left: i64) -> Tally {
        let delivered = deliveries(receiver);
        let mut t = Tally {
            posted: journal.jobs.len() as u64,
            ..Tally::default()
        };
        for (id, (posted, files)) in &journal.jobs {
            let got = delivered.get(id).map(Vec::as_slice).unwrap_or(&[]);
            match posted {
                Posted::Acknowledged => {
                    t.acknowledged += 1;
                    let deleted = journal.deleted.get(id);
                    if !got.is_empty() {
                        t.called_back += 1;
                        t.stored += 1;
                    } else {
                        match deleted {
                            Some(Deleted::Yes) => {
                                t.deleted += 1;
                                t.stored += 1;
                            }
                            Some(Deleted::Cut) => {
                                t.deleted_by_a_cut_delete += 1;
                                t.stored += 1;
                            }
                            // Still in the store when the run ran out of time: stored,
                            // but not called back.
                            _ if left > 0 => t.stuck_ids.push(*id),
                            _ => {
                                t.lost += 1;
                                t.lost_ids.push(*id);
                            }
                        }
                    }
                }
                Posted::Refused(_) => {
                    t.refused += 1;
                    if !got.is_empty() {
                        t.phantoms.push(*id);
                    }
                }
                Posted::Unknown => {
                    t.unknown += 1;
                    if !got.is_empty() {
                        t.unknown_called_back += 1;
                    }
                }
            }
            for (_, body) in got {
                if body["return_code"] != 0 || body["ready_files"] != *files as i64 {
                    t.wrong.push((*id, body.clone()));
                }
            }
            for pair in got.windows(2) {
                let (first, second) = (pair[0].0, pair[1].0);
                let kill = kills
                    .iter()
                    .find(|k| **k >= first && **k < second && **k - first <= IN_FLIGHT);
                match kill {
                    Some(k) => {
                        t.repeats_in_flight_at_a_kill += 1;
                        t.longest_in_flight = t.longest_in_flight.max(*k - first);
                    }
                    None => t.unexplained_repeats.push(*id),
                }
            }
        }
        // A stuck job is still stored; the ledger counts it so.
        t.stored += t.stuck_ids.len() as u64;
        for id in delivered.keys() {
            if !journal.jobs.contains_key(id) {
                t.phantoms.push(*id);
            }
        }
        t
    }
}

/// The daemon wired to this test's tape system, receiver and metadata service, with leases
/// of two seconds so that each restart resumes its predecessor's work within the round.
fn write_config(
    dir: &Path,
    db_url: &str,
    port: u16,
    tape: &Tape,
    metadata: &MetadataSim,
    group: &str,
) -> PathBuf {
    let adapter = format!(
        r#"
[adapter]
wasm = {wasm}
http_allow = ["{metadata_addr}"]

[adapter.settings]
data_files_url = "{data_files_url}"
"#,
        wasm = toml_str(&format!("{}/adapter_mwa.wasm", env!("STAGED_ADAPTERS_DIR"))),
        metadata_addr = metadata.addr,
        data_files_url = metadata.data_files_url(),
    );
    write_pipeline_config(dir, db_url, port, tape, group, 2, &adapter)
}
