//! The local API's connections, each on a thread of its own running a
//! current-thread runtime: a request is read, run and answered on that one
//! thread, with no hand-over between threads on its way. (Measured on
//! 2 cores: handing the run to a worker thread, or `block_in_place` on the
//! shared runtime, cost 0.2–1 ms on a 2–3 ms CNN, mostly as a slower run
//! while other threads woke around it; see docs/performance.md.)
//!
//! An HTTP/1.1 connection carries one request at a time, so a run that
//! blocks its thread blocks no one else; each model's `Gate` bounds how many
//! run at once. At most `MAX_CONNECTIONS` are open per listener. A client
//! must send a request's headers within `HEADER_TIMEOUT` of connecting or of
//! its previous answer (so idle keep-alive connections close too), its
//! body within the API's body deadline, and take its answer: a write that
//! cannot proceed for `WRITE_TIMEOUT`, or an answer not all taken within
//! the API's answer deadline, ends the connection. When every
//! connection slot is taken a new client still gets in: the oldest
//! connection not running a model (reading a request, idle, waiting in a
//! model's queue, or writing an answer) is cancelled for it — its
//! request is dropped where it stands, with the memory it held, and its
//! thread ends. Only connections whose request is running a model are never
//! cancelled, so slow or hostile local clients cannot lock out the others.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

/// Open connections per listener at most (each holds a thread).
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this of the connection opening or
/// of the previous answer, or the connection closes.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to a client that stays blocked this long (it does not read its
/// answer) ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack of a connection thread; models run on it.
const STACK: usize = 2 << 20;

/// One connection, as its requests see it: whether one of them is running a
/// model now (which makes the connection one that is never evicted).
#[derive(Debug)]
pub struct ConnState {
    running: AtomicUsize,
    /// The listener's: told when this connection may be evicted again.
    freed: Arc<Notify>,
}

/// Marks a connection as running a model until dropped.
pub struct Running(Arc<ConnState>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A client waiting for a slot may now evict this connection.
            self.0.freed.notify_one();
        }
    }
}

impl ConnState {
    /// Marks the connection as running a model while the guard lives.
    pub fn busy(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::AcqRel);
        Running(self.clone())
    }
}

enum Conn {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

struct Entry {
    id: u64,
    state: Arc<ConnState>,
    /// Wakes the connection's thread to cancel it.
    cancel: Arc<Notify>,
}

/// The open connections of one listener, oldest first.
struct Table {
    open: Mutex<Vec<Entry>>,
    /// Told when a connection ends or stops running a model.
    freed: Arc<Notify>,
    next: AtomicU64,
}

impl Table {
    /// Admits a connection if there is room, or makes room by closing the
    /// oldest one that is not running a model. `false`: every slot is
    /// running a model; wait for [`Table::freed`].
    fn admit(&self, entry: &mut Option<Entry>) -> bool {
        let mut open = self.open.lock().expect("lock");
        if open.len() >= MAX_CONNECTIONS {
            let Some(victim) = open.iter().position(|e| e.state.running.load(Ordering::Acquire) == 0) else {
                return false;
            };
            let victim = open.remove(victim);
            victim.cancel.notify_one();
            info!(connection = victim.id, "local API: every connection slot in use; cancelled the oldest idle one");
        }
        open.push(entry.take().expect("admitted once"));
        true
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("lock").retain(|e| e.id != id);
        self.freed.notify_one();
    }
}

/// Accepts on TCP (loopback).
pub async fn tcp(listener: tokio::net::TcpListener, router: Router) {
    accept_loop(router, || async {
        let (s, _) = listener.accept().await?;
        // Small request/response pairs: Nagle's algorithm would only add latency.
        s.set_nodelay(true)?;
        Ok(Conn::Tcp(s.into_std()?))
    })
    .await
}

/// Accepts on the Unix socket.
pub async fn unix(listener: tokio::net::UnixListener, router: Router) {
    accept_loop(router, || async { Ok(Conn::Unix(listener.accept().await?.0.into_std()?)) }).await
}

/// Hands each accepted connection a thread, at most `MAX_CONNECTIONS` at once.
async fn accept_loop<F, Fut>(router: Router, mut accept: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Conn>>,
{
    let table =
        Arc::new(Table { open: Mutex::new(Vec::new()), freed: Arc::new(Notify::new()), next: AtomicU64::new(0) });
    loop {
        let conn = match accept().await {
            Ok(conn) => conn,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let id = table.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState { running: AtomicUsize::new(0), freed: table.freed.clone() });
        let cancel = Arc::new(Notify::new());
        let mut entry = Some(Entry { id, state: state.clone(), cancel: cancel.clone() });
        while !table.admit(&mut entry) {
            table.freed.notified().await;
        }
        spawn(conn, router.clone(), id, state, cancel, table.clone());
    }
}

/// Out of file descriptors and the like: wait a little instead of spinning.
async fn accept_failed(e: std::io::Error) {
    warn!("local API: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn(conn: Conn, router: Router, id: u64, state: Arc<ConnState>, cancel: Arc<Notify>, table: Arc<Table>) {
    let done = table.clone();
    let started = std::thread::Builder::new().name("api-conn".into()).stack_size(STACK).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
            Ok(rt) => rt,
            Err(e) => return error!("local API: cannot start a connection runtime: {e}"),
        };
        rt.block_on(async move {
            let served = async {
                match conn {
                    Conn::Tcp(s) => serve(tokio::net::TcpStream::from_std(s), router, state).await,
                    Conn::Unix(s) => serve(tokio::net::UnixStream::from_std(s), router, state).await,
                }
            };
            // Cancelled: dropping the connection's future drops its request
            // wherever it waits (body, queue, write), and the socket with it.
            tokio::select! {
                _ = served => {}
                _ = cancel.notified() => debug!(connection = id, "local API connection cancelled"),
            }
        });
        done.remove(id);
    });
    if let Err(e) = started {
        error!("local API: cannot start a connection thread: {e}");
        table.remove(id);
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    io: std::io::Result<S>,
    router: Router,
    state: Arc<ConnState>,
) {
    let io = match io {
        Ok(io) => io,
        Err(e) => return warn!("local API: cannot register a connection: {e}"),
    };
    // Each request carries its connection's state, so a handler can mark
    // the connection as running a model.
    let router = router.layer(axum::Extension(state));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(WriteDeadline::new(io)), TowerToHyperService::new(router))
        .await;
    if let Err(e) = served {
        debug!("local API connection ended: {e}");
    }
}

/// A stream whose writes fail once one has been blocked for `WRITE_TIMEOUT`
/// (hyper has no write timeout of its own).
struct WriteDeadline<S> {
    io: S,
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(io: S) -> Self {
        Self { io, blocked: None }
    }

    /// Maps a write's outcome through the deadline.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match poll {
            Poll::Pending => {
                let deadline = self.blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client did not take its answer",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.blocked = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
