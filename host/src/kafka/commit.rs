//! Offset commits: one at a time, in order, off the ingest loop, each result counted.
//!
//! Invariants:
//! - Offsets only grow: a later commit never names an earlier offset for a partition than
//!   one this committer already committed, so commits cannot move the group back.
//! - Every commit is synchronous, in a blocking thread, so its result is known and counted
//!   (librdkafka tells the result of an asynchronous manual commit to no one the Rust client
//!   hears). The ingest loop never waits for the broker: offsets handed over while a commit
//!   is under way are merged and sent together after it.
//! - [`Committer::close`] sends what is pending and waits for the broker's answer (bounded),
//!   so a daemon that stops after a batch leaves its offsets on the broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Context;
use super::status::{IngestStatus, RateLimited};

/// partition -> next offset to read.
pub(super) type Offsets = HashMap<i32, i64>;

pub(super) struct Committer {
    wanted: watch::Sender<Offsets>,
    task: JoinHandle<()>,
}

impl Committer {
    pub(super) fn start(
        consumer: Arc<StreamConsumer<Context>>,
        topic: String,
        status: IngestStatus,
    ) -> Committer {
        let (wanted, rx) = watch::channel(Offsets::new());
        let task = tokio::spawn(run(consumer, topic, status, rx));
        Committer { wanted, task }
    }

    /// Asks for the offsets of an applied batch to be committed.
    pub(super) fn commit(&self, next_offsets: &Offsets) {
        self.wanted.send_modify(|w| {
            for (&partition, &next) in next_offsets {
                let at = w.entry(partition).or_insert(next);
                *at = (*at).max(next);
            }
        });
    }

    /// Commits what is pending and waits for the answer, at most `wait` (a broker that is
    /// gone would otherwise hold the stop forever). False: it did not finish in time.
    pub(super) async fn close(self, wait: Duration) -> bool {
        let Committer { wanted, mut task } = self;
        drop(wanted);
        match tokio::time::timeout(wait, &mut task).await {
            Ok(_) => true,
            Err(_) => {
                task.abort();
                tracing::warn!(
                    ?wait,
                    "the last offset commit got no answer in time; those messages will be read again"
                );
                false
            }
        }
    }
}

async fn run(
    consumer: Arc<StreamConsumer<Context>>,
    topic: String,
    status: IngestStatus,
    mut wanted: watch::Receiver<Offsets>,
) {
    let mut done = Offsets::new();
    let log = RateLimited::new(Duration::from_secs(30));
    loop {
        // Closed: one last round for what was asked before the close.
        let closed = wanted.changed().await.is_err();
        let todo: Offsets = wanted
            .borrow_and_update()
            .iter()
            .filter(|(p, o)| done.get(p).is_none_or(|d| d < o))
            .map(|(&p, &o)| (p, o))
            .collect();
        if !todo.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (&partition, &next) in &todo {
                if let Err(e) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next)) {
                    tracing::warn!(error = %e, partition, "building the offset commit");
                }
            }
            let c = consumer.clone();
            match tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await {
                Ok(Ok(())) => {
                    status.count_commit();
                    done.extend(todo);
                }
                Ok(Err(e)) => {
                    // Retried with the next batch's offsets; until then a restart would
                    // read these messages again, which changes nothing.
                    status.count_commit_failure();
                    log.log(|suppressed| {
                        tracing::warn!(error = %e, suppressed, "committing Kafka offsets failed; the messages may be read again");
                    });
                }
                Err(e) => {
                    status.count_commit_failure();
                    tracing::error!(error = %e, "the offset commit thread failed");
                }
            }
        }
        if closed {
            break;
        }
    }
}
