//! The HTTP/1.1 server in front of the [router](super::router): our own accept loop on
//! hyper, so that no client can hold more than the `[server]` bounds give it.
//!
//! Invariant: whatever clients do, what they hold is bounded, and every answer, including
//! the ones hyper writes itself, is JSON with `errormsg`:
//! - **connections**: at most [`Bounds::connection_cap`] at once, which stays below the
//!   open-file limit the daemon started with. When full and a new client arrives, the
//!   connection idle longest is closed to let it in (a cap merely reached closes nothing);
//!   when every connection has a request in hand, that client waits (one, holding one
//!   descriptor of `reserved_fds`) and the next ones in the kernel's backlog. Accept errors (`EMFILE` and the like) back off instead
//!   of spinning, and are logged at most once every 10 s, with their count.
//! - **time**: a request head must arrive within `header_timeout_secs` of the connection
//!   being ready for it (hyper's header timer, so slowloris heads are closed); with
//!   `[server.tls]`, the TLS handshake before it must finish within the same time, holding
//!   its slot under the cap meanwhile (a client that never sends its hello is closed then,
//!   one that speaks plain HTTP at its first bytes); a body must be read within
//!   `body_timeout_secs` (408); a connection with nothing in hand and no bytes moving is
//!   closed after `idle_timeout_secs`.
//! - **memory**: request bodies held at once are charged to one budget
//!   (`body_budget_bytes`): an announced length is reserved before the handler runs, a
//!   chunked body as it arrives; what does not fit gets 503 with `Retry-After`. The charge is
//!   released when the answer is ready.
//! - **answers**: hyper answers a bad request line or an oversized head itself, with an
//!   empty body and no hook to change it. [`Io`] recognises such an answer in the bytes
//!   written (a response head when every request handed to the service has had its answer)
//!   and writes a JSON body in its place. A refused request whose body was not read (413,
//!   503, hyper's own errors) closes with a bounded drain, so that a client that writes its
//!   whole body before reading sees the answer rather than a reset.
//!
//! HTTP/1.1 only, like the original service (uvicorn); hyper's HTTP/2 has no header or body
//! timers to bound it with. Over TLS too: ALPN offers only `http/1.1` (see [`super::tls`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

use super::ApiError;
use super::tls::{PeerCertName, Tls};
use crate::config::ServerConfig;

mod stream;
use stream::Stream;

/// Seconds a client is asked to wait after a 503 for lack of body budget: about the time a
/// large body takes to read and store.
const RETRY_AFTER_SECS: u64 = 2;

/// The budget is counted in KiB so that one reservation fits the semaphore's `u32`.
const BUDGET_UNIT: usize = 1024;

/// The bounds, from `[server]`, with the connection cap worked out from the file limit.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub connection_cap: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub body_budget_bytes: usize,
    pub drain_max_bytes: usize,
    pub drain_timeout: Duration,
}

impl Bounds {
    /// Reads `RLIMIT_NOFILE` now: the cap is `max_connections`, or the soft file limit less
    /// `reserved_fds` when that is lower (never below 1).
    pub fn from_config(c: &ServerConfig) -> Bounds {
        let files = open_file_limit();
        let by_files = files.map(|f| f.saturating_sub(c.reserved_fds as u64).max(1));
        let connection_cap = match by_files {
            Some(f) if f < c.max_connections as u64 => {
                tracing::info!(
                    open_file_limit = files,
                    reserved_fds = c.reserved_fds,
                    max_connections = c.max_connections,
                    cap = f,
                    "the open-file limit caps client connections below server.max_connections"
                );
                f as usize
            }
            _ => c.max_connections.max(1),
        };
        Bounds {
            connection_cap,
            header_timeout: Duration::from_secs(c.header_timeout_secs.max(1)),
            body_timeout: Duration::from_secs(c.body_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(c.idle_timeout_secs.max(1)),
            max_header_bytes: c.max_header_bytes,
            max_body_bytes: c.max_body_bytes,
            // A budget below the body limit would refuse the largest bodies forever.
            body_budget_bytes: c.body_budget_bytes.max(c.max_body_bytes),
            drain_max_bytes: c.drain_max_bytes,
            drain_timeout: Duration::from_secs(c.drain_timeout_secs),
        }
    }
}

/// The soft `RLIMIT_NOFILE`, if there is a finite one.
fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we pass and nothing else.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        // rlim_t is u64 on Linux, not on every unix.
        #[allow(clippy::unnecessary_cast)]
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// The shortest time between two warnings about accept errors.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// What the accept loop and every connection share.
struct Shared {
    bounds: Bounds,
    epoch: Instant,
    budget: Arc<Semaphore>,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    all_closed: Notify,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Asks the connection idle longest (no request in hand) to close; false if every
    /// connection is busy.
    fn evict_idlest(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let victim = conns
            .values()
            .filter(|c| {
                c.in_service.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Acquire)
            })
            .min_by_key(|c| c.last_io_ms.load(Ordering::Acquire));
        match victim {
            Some(v) => {
                v.evicted.store(true, Ordering::Release);
                v.kill.notify_one();
                true
            }
            None => false,
        }
    }
}

/// One connection's state, seen by its I/O, its service and the accept loop.
struct ConnState {
    /// Requests handed to the service whose answer body has not been sent yet.
    in_service: AtomicUsize,
    /// Requests handed to the service so far.
    dispatched: AtomicU64,
    /// When bytes last moved either way (ms since [`Shared::epoch`]).
    last_io_ms: AtomicU64,
    /// Close with a drain: request bytes may still be on their way.
    linger: AtomicBool,
    evicted: AtomicBool,
    kill: Notify,
}

impl ConnState {
    fn touch(&self, shared: &Shared) {
        self.last_io_ms.store(shared.now_ms(), Ordering::Release);
    }
}

/// Serves `router` on `listener` (over TLS with `tls`, whose files are watched meanwhile)
/// until `stop` resolves, then lets every connection finish its request in hand and returns
/// once all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    tls: Option<Tls>,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let _watch = tls.as_ref().and_then(Tls::watch).map(AbortOnDrop);
    let slots = Arc::new(Semaphore::new(bounds.connection_cap));
    let shared = Arc::new(Shared {
        budget: Arc::new(Semaphore::new(
            bounds.body_budget_bytes.div_ceil(BUDGET_UNIT),
        )),
        bounds,
        epoch: Instant::now(),
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        all_closed: Notify::new(),
    });
    tracing::info!(
        connection_cap = shared.bounds.connection_cap,
        body_budget_bytes = shared.bounds.body_budget_bytes,
        tls = tls.is_some(),
        "HTTP server bounds"
    );
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(shared.bounds.header_timeout)
        .max_header_size(shared.bounds.max_header_bytes)
        // One contiguous buffer per write lets `Io` see where hyper's own answers begin.
        .writev(false);
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::pin!(stop);

    let mut backoff = Duration::ZERO;
    // Descriptors running out can last: each freed one is taken at once and the next
    // accept fails again. Warnings are spaced out, each counting the errors since the last.
    let mut failed_accepts: u64 = 0;
    let mut last_warning: Option<tokio::time::Instant> = None;
    let mut warned_this_run = false;
    'accept: loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                if warned_this_run {
                    tracing::info!("accepting connections again");
                    warned_this_run = false;
                }
                backoff = Duration::ZERO;
                stream
            }
            // The peer gave up before we took it: nothing to wait for.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: retrying at once would spin. Close an idle
                // connection to free one and wait a little longer each time.
                failed_accepts += 1;
                if last_warning.is_none_or(|t| t.elapsed() >= ACCEPT_WARNING_EVERY) {
                    tracing::warn!(error = %e, failed_accepts, "accept error; backing off");
                    last_warning = Some(tokio::time::Instant::now());
                    failed_accepts = 0;
                    warned_this_run = true;
                }
                shared.evict_idlest();
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = &mut stop => break,
                }
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full, with a client waiting: make room by closing the connection idle
                // longest, and try again while every connection is busy (one may turn
                // idle, or close). Only a client in hand evicts anyone: a cap that is
                // merely reached closes nothing.
                let mut waiting_logged = false;
                loop {
                    if !shared.evict_idlest() && !waiting_logged {
                        tracing::warn!(
                            cap = shared.bounds.connection_cap,
                            "every client connection has a request in hand; new ones wait"
                        );
                        waiting_logged = true;
                    }
                    tokio::select! {
                        p = slots.clone().acquire_owned() => break p.expect("the slot semaphore is never closed"),
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = &mut stop => break 'accept,
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        spawn_connection(
            &shared,
            &http,
            router.clone(),
            stream,
            permit,
            stopping.clone(),
            tls.clone(),
        );
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    loop {
        let closed = shared.all_closed.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        if shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            break;
        }
        closed.await;
    }
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Aborts a task when dropped, so that it ends with the function that started it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_connection(
    shared: &Arc<Shared>,
    http: &hyper::server::conn::http1::Builder,
    router: Router,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    mut stopping: watch::Receiver<bool>,
    tls: Option<Tls>,
) {
    let state = Arc::new(ConnState {
        in_service: AtomicUsize::new(0),
        dispatched: AtomicU64::new(0),
        last_io_ms: AtomicU64::new(shared.now_ms()),
        linger: AtomicBool::new(false),
        evicted: AtomicBool::new(false),
        kill: Notify::new(),
    });
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, state.clone());
    let http = http.clone();
    let shared = shared.clone();
    let addr = stream
        .peer_addr()
        .ok()
        .map(super::tape_rest::principal::PeerAddr);
    tokio::spawn(async move {
        let _registered = Registered {
            shared: shared.clone(),
            id,
        };
        let (stream, peer) = match tls {
            None => (Stream::Plain(stream), None),
            Some(tls) => match handshake(&tls, stream, &state, &shared, &mut stopping).await {
                Some((stream, peer)) => (Stream::Tls(Box::new(stream)), peer),
                // The slot is given back as the socket closes.
                None => return,
            },
        };
        let io = Io {
            stream: Some(stream),
            permit: Some(permit),
            conn: state.clone(),
            shared: shared.clone(),
            heads_seen: 0,
            pending: Vec::new(),
            pending_pos: 0,
            saw_eof: false,
        };
        let service = Service {
            router,
            conn: state.clone(),
            shared: shared.clone(),
            peer,
            addr,
        };
        let conn = http.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = shared.bounds.idle_timeout;
        let mut graceful = *stopping.borrow();
        if graceful {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            let wake = match state.in_service.load(Ordering::Acquire) {
                0 => {
                    shared.epoch
                        + Duration::from_millis(state.last_io_ms.load(Ordering::Acquire))
                        + idle
                }
                _ => Instant::now() + idle,
            };
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let quiet = shared.now_ms().saturating_sub(state.last_io_ms.load(Ordering::Acquire));
                    if state.in_service.load(Ordering::Acquire) == 0 && quiet >= idle.as_millis() as u64 {
                        tracing::debug!(quiet_ms = quiet, "closing an idle connection");
                        break;
                    }
                }
                _ = state.kill.notified() => {
                    // A request may have arrived since it was chosen: that one stays.
                    if state.in_service.load(Ordering::Acquire) > 0 {
                        state.evicted.store(false, Ordering::Release);
                        continue;
                    }
                    tracing::debug!("closing the connection idle longest to make room");
                    break;
                }
                _ = stopping.changed(), if !graceful => {
                    graceful = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    });
}

/// The server side of a TLS handshake, bounded by the header timeout; `None` (logged at
/// debug) when it failed (a client that does not speak TLS among them), took too long, or
/// the connection was chosen to make room or the server is stopping.
async fn handshake(
    tls: &Tls,
    stream: TcpStream,
    state: &ConnState,
    shared: &Shared,
    stopping: &mut watch::Receiver<bool>,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Option<PeerCertName>,
)> {
    let timeout = shared.bounds.header_timeout;
    tokio::select! {
        done = tokio::time::timeout(timeout, tls.accept(stream)) => match done {
            Ok(Ok(accepted)) => {
                // The request head's own timer starts now.
                state.touch(shared);
                Some(accepted)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(?timeout, "TLS handshake not finished within the header timeout");
                None
            }
        },
        _ = state.kill.notified() => {
            tracing::debug!("closing a connection in its TLS handshake to make room");
            None
        }
        _ = stopping.wait_for(|stopping| *stopping) => None,
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.remove(&self.id);
        if conns.is_empty() {
            self.shared.all_closed.notify_waiters();
        }
    }
}

/// Why a request body stopped being read, for the answer the handler could not give.
#[derive(Default)]
struct BodyFault {
    timed_out: AtomicBool,
    over_budget: AtomicBool,
}

/// Hands requests to the router with their bodies bounded in time and budget.
#[derive(Clone)]
struct Service {
    router: Router,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
    /// The connection's verified client certificate, given to every request on it.
    peer: Option<PeerCertName>,
    /// The client's address, given to every request on it.
    addr: Option<super::tape_rest::principal::PeerAddr>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(peer.clone());
        }
        if let Some(addr) = self.addr {
            req.extensions_mut().insert(addr);
        }
        self.conn.dispatched.fetch_add(1, Ordering::AcqRel);
        self.conn.in_service.fetch_add(1, Ordering::AcqRel);
        let in_service = InService(self.conn.clone());
        let router = self.router.clone();
        let conn = self.conn.clone();
        let shared = self.shared.clone();
        Box::pin(async move {
            let response = handle(req, router, &conn, &shared).await;
            Ok(response.map(|inner| TrackedBody {
                inner,
                in_service: Some(in_service),
            }))
        })
    }
}

async fn handle(
    req: Request<Incoming>,
    router: Router,
    conn: &Arc<ConnState>,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let bounds = &shared.bounds;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    // An announced body within the limit is reserved whole before anything reads it; one
    // over the limit is refused by the handler unread and costs nothing.
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    let mut charge_as_read = chunked;
    if let Some(len) = declared
        && !chunked
        && len > 0
        && len <= bounds.max_body_bytes as u64
    {
        let units = (len as usize).div_ceil(BUDGET_UNIT) as u32;
        match shared.budget.clone().try_acquire_many_owned(units) {
            Ok(p) => reserved = Some(p),
            Err(_) => {
                tracing::warn!(
                    content_length = len,
                    budget_bytes = bounds.body_budget_bytes,
                    "request body refused: the body budget is in use"
                );
                conn.linger.store(true, Ordering::Release);
                return over_budget();
            }
        }
        charge_as_read = false;
    }
    let fault = Arc::new(BodyFault::default());
    let held = Arc::new(Mutex::new(reserved));
    let (parts, incoming) = req.into_parts();
    let body = BoundedBody {
        inner: incoming,
        deadline: Box::pin(tokio::time::sleep(bounds.body_timeout)),
        budget: charge_as_read.then(|| shared.budget.clone()),
        held: held.clone(),
        bytes_charged: 0,
        fault: fault.clone(),
    };
    let req = Request::from_parts(parts, Body::new(body));
    let mut response = match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    if fault.timed_out.load(Ordering::Acquire) {
        tracing::info!(timeout = ?bounds.body_timeout, "request body not read in time");
        response = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body was not received within {} s",
                bounds.body_timeout.as_secs()
            ),
        )
        .into_response();
        close_after(&mut response);
    } else if fault.over_budget.load(Ordering::Acquire) {
        tracing::warn!(
            budget_bytes = bounds.body_budget_bytes,
            "chunked request body refused: the body budget is in use"
        );
        conn.linger.store(true, Ordering::Release);
        response = over_budget();
    } else if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The body is left unread: close, after draining what the client still sends.
        conn.linger.store(true, Ordering::Release);
        close_after(&mut response);
    }
    // The body's bytes are gone once the answer is ready.
    drop(held.lock().unwrap_or_else(|p| p.into_inner()).take());
    response
}

fn over_budget() -> Response<Body> {
    let mut r = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many large request bodies at once; retry later",
    )
    .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    close_after(&mut r);
    r
}

fn close_after(r: &mut Response<Body>) {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Counts a request as in hand until its answer's body has been sent (or dropped).
struct InService(Arc<ConnState>);

impl Drop for InService {
    fn drop(&mut self) {
        self.0.in_service.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, ending the request's [`InService`] when it ends.
pub struct TrackedBody {
    inner: Body,
    in_service: Option<InService>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.in_service = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body bounded in time and, when its length was not announced, charged to the
/// budget as it arrives.
struct BoundedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    budget: Option<Arc<Semaphore>>,
    held: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    bytes_charged: usize,
    fault: Arc<BodyFault>,
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body was not received in time")]
    TimedOut,
    #[error("the request body does not fit in the body budget")]
    OverBudget,
}

impl BoundedBody {
    fn charge(&mut self, len: usize) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        let before = self.bytes_charged.div_ceil(BUDGET_UNIT);
        let after = (self.bytes_charged + len).div_ceil(BUDGET_UNIT);
        self.bytes_charged += len;
        if after == before {
            return true;
        }
        let Ok(units) = u32::try_from(after - before) else {
            return false;
        };
        match budget.clone().try_acquire_many_owned(units) {
            Ok(p) => {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                match held.as_mut() {
                    Some(h) => h.merge(p),
                    None => *held = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }
}

impl HttpBody for BoundedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.deadline.is_elapsed() {
            this.fault.timed_out.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(BodyError::TimedOut.into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len());
                if !this.charge(len) {
                    this.fault.over_budget.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(BodyError::OverBudget.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    this.fault.timed_out.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(BodyError::TimedOut.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket under hyper: notes when bytes move, puts a JSON body into the answers hyper
/// writes itself, and hands the socket to a bounded drain when it closes with request bytes
/// possibly still coming.
struct Io {
    stream: Option<Stream>,
    /// The connection's slot under the cap, held until the socket is closed (drain included).
    permit: Option<OwnedSemaphorePermit>,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
    /// Response heads written for requests the service handled.
    heads_seen: u64,
    /// Bytes written in place of a hyper answer, still to go out.
    pending: Vec<u8>,
    pending_pos: usize,
    saw_eof: bool,
}

impl Io {
    fn stream(&mut self) -> &mut Stream {
        self.stream
            .as_mut()
            .expect("the stream is taken only on drop")
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_pos < self.pending.len() {
            let pos = self.pending_pos;
            let mut pending = std::mem::take(&mut self.pending);
            let polled = Pin::new(self.stream()).poll_write(cx, &pending[pos..]);
            std::mem::swap(&mut self.pending, &mut pending);
            let n = ready!(polled)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_pos += n;
            self.conn.touch(&self.shared);
        }
        self.pending.clear();
        self.pending_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// What `buf`, the start of a write, is: the head of an answer to a request the
    /// service had, or of one hyper wrote itself (for a request it could not parse), or
    /// anything else.
    fn classify(&mut self, buf: &[u8]) -> Written {
        if !(buf.starts_with(b"HTTP/1.1 ") || buf.starts_with(b"HTTP/1.0 ")) || buf.len() < 12 {
            return Written::Other;
        }
        let Some(status) = std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
        else {
            return Written::Other;
        };
        // 100 Continue belongs to a request in hand, and is followed by its real answer.
        if (100..200).contains(&status) {
            return Written::Other;
        }
        if self.heads_seen < self.conn.dispatched.load(Ordering::Acquire) {
            return Written::ServiceHead;
        }
        match self.own_answer(status, buf) {
            Some(replacement) => Written::OwnAnswer(replacement),
            None => Written::Other,
        }
    }

    /// The JSON answer to write in place of hyper's answer `buf` with `status`.
    fn own_answer(&mut self, status: u16, buf: &[u8]) -> Option<Vec<u8>> {
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let status = StatusCode::from_u16(status).ok()?;
        let message = match status {
            StatusCode::BAD_REQUEST => "the request line or a header could not be parsed".into(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => format!(
                "the request head is larger than the limit of {} bytes",
                self.shared.bounds.max_header_bytes
            ),
            StatusCode::URI_TOO_LONG => "the request URI is too long".into(),
            other => other.canonical_reason().unwrap_or("error").to_string(),
        };
        let body = serde_json::json!({ "errormsg": message }).to_string();
        let mut out = Vec::with_capacity(head_end + body.len() + 96);
        let head = &buf[..head_end - 2];
        let mut lines = head.split(|&b| b == b'\n');
        if let Some(status_line) = lines.next() {
            out.extend_from_slice(status_line);
            out.push(b'\n');
        }
        for line in lines {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            let keep = !(name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"content-type")
                || name.eq_ignore_ascii_case(b"connection"));
            if keep && !line.is_empty() {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
        }
        out.extend_from_slice(
            format!(
                "content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(&buf[head_end..]);
        tracing::debug!(status = status.as_u16(), "answered a request hyper refused");
        // The rest of what the client sends is never read.
        self.conn.linger.store(true, Ordering::Release);
        Some(out)
    }
}

enum Written {
    ServiceHead,
    OwnAnswer(Vec<u8>),
    Other,
}

impl AsyncRead for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining();
        ready!(Pin::new(self.stream()).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n == 0 && room > 0 {
            self.saw_eof = true;
        } else {
            self.conn.touch(&self.shared);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        let written = self.classify(buf);
        if let Written::OwnAnswer(replacement) = written {
            self.pending = replacement;
            self.pending_pos = 0;
            // Whatever does not go out now goes out on the next write, flush or shutdown.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(self.stream()).poll_write(cx, buf))?;
        // Counted once written: a write that is retried starts with the same head.
        if n > 0 && matches!(written, Written::ServiceHead) {
            self.heads_seen += 1;
        }
        self.conn.touch(&self.shared);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(self.stream()).poll_shutdown(cx)
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        let (Some(stream), Some(permit)) = (self.stream.take(), self.permit.take()) else {
            return;
        };
        let wanted = self.conn.linger.load(Ordering::Acquire)
            && !self.saw_eof
            && !self.conn.evicted.load(Ordering::Acquire);
        if !wanted {
            return;
        }
        let (max, timeout) = (
            self.shared.bounds.drain_max_bytes,
            self.shared.bounds.drain_timeout,
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain_and_close(stream, permit, max, timeout));
        }
    }
}

/// Closes a socket whose client may still be sending a request we will not read: our side
/// is shut first (the client sees the end of the answer), then up to `max` bytes are read
/// and thrown away, for at most `timeout`. Closing with unread bytes would make the kernel
/// reset the connection, and a client still writing would see that reset, not the answer.
async fn drain_and_close(
    mut stream: Stream,
    permit: OwnedSemaphorePermit,
    max: usize,
    timeout: Duration,
) {
    let _ = stream.shutdown().await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut drained = 0usize;
    let _ = tokio::time::timeout(timeout, async {
        while drained < max {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    tracing::trace!(drained, "closed after draining");
    drop(stream);
    drop(permit);
}
