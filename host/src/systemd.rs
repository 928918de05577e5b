//! systemd's notification protocol (`Type=notify`, see config/staged.service): `READY=1`
//! once the store is migrated and the listener bound, `WATCHDOG=1` while the runtime runs
//! tasks, `RELOADING=1` then `READY=1` around a SIGHUP reload, `STOPPING=1` on shutdown.
//!
//! Invariant: outside systemd (no `NOTIFY_SOCKET`) every function here does nothing, and a
//! failed notification is logged, never fatal: the daemon's work does not depend on its
//! supervisor hearing about it.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

fn send(what: &'static str, states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, notification = what, "telling systemd failed");
    }
}

/// The daemon is serving.
pub fn ready() {
    send("READY=1", &[NotifyState::Ready]);
}

/// A reload begins; [`ready`] ends it. systemd needs the monotonic time with it to tell
/// this reload from an earlier one.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("RELOADING=1", &[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!(error = %e, "reading the monotonic clock for RELOADING=1 failed"),
    }
}

/// The daemon is shutting down.
pub fn stopping() {
    send("STOPPING=1", &[NotifyState::Stopping]);
}

/// When systemd asks for a watchdog (`WatchdogSec=`), a task that sends `WATCHDOG=1` at half
/// the interval. It is an ordinary task on the daemon's runtime, so a runtime that stops
/// running tasks stops the pings and systemd restarts the daemon.
pub fn start_watchdog() -> Option<JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
    )?;
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send("WATCHDOG=1", &[NotifyState::Watchdog]);
        }
    }))
}

/// The watchdog interval systemd asks of this process, as `sd_watchdog_enabled(3)` reads it:
/// `WATCHDOG_USEC` set and positive, and `WATCHDOG_PID`, when set, this process's id. (The
/// `sd-notify` crate's version also demands `WATCHDOG_PID`, which libsystemd does not.)
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_ours_only_when_systemd_means_us() {
        let me = std::process::id().to_string();
        let other = (std::process::id() + 1).to_string();
        let us = |u, p| watchdog_interval(u, p);
        assert_eq!(us(Some("200000"), None), Some(Duration::from_millis(200)));
        assert_eq!(
            us(Some("200000"), Some(&me)),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            us(Some("200000"), Some(&other)),
            None,
            "another process's watchdog"
        );
        assert_eq!(us(Some("0"), None), None);
        assert_eq!(us(Some("soon"), None), None);
        assert_eq!(us(None, Some(&me)), None);
    }
}
