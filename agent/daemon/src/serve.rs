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
//! its previous answer (so idle keep-alive connections close too), and its
//! body within the API's body deadline. When every connection slot is taken
//! a new client still gets in: the oldest connection not running a model
//! (reading a request, idle, or stuck writing an answer) is closed for it.
//! Only connections whose request is running a model are never closed, so
//! slow or hostile local clients cannot lock out the others.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

/// Open connections per listener at most (each holds a thread).
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this of the connection opening or
/// of the previous answer, or the connection closes.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack of a connection thread; models run on it.
const STACK: usize = 2 << 20;

/// One connection, as its requests see it: whether one of them is running a
/// model now (which makes the connection one that is never evicted).
#[derive(Debug, Default)]
pub struct ConnState {
    running: AtomicUsize,
}

/// Marks a connection as running a model until dropped.
pub struct Running(Arc<ConnState>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
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

impl Conn {
    /// A handle that closes the connection from another thread.
    fn closer(&self) -> std::io::Result<Box<dyn Fn() + Send>> {
        Ok(match self {
            Conn::Tcp(s) => {
                let s = s.try_clone()?;
                Box::new(move || drop(s.shutdown(Shutdown::Both)))
            }
            Conn::Unix(s) => {
                let s = s.try_clone()?;
                Box::new(move || drop(s.shutdown(Shutdown::Both)))
            }
        })
    }
}

struct Entry {
    id: u64,
    state: Arc<ConnState>,
    close: Box<dyn Fn() + Send>,
}

/// The open connections of one listener, oldest first.
struct Table {
    open: Mutex<Vec<Entry>>,
    freed: Notify,
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
            (victim.close)();
            info!(connection = victim.id, "local API: every connection slot in use; closed the oldest idle one");
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
    let table = Arc::new(Table { open: Mutex::new(Vec::new()), freed: Notify::new(), next: AtomicU64::new(0) });
    loop {
        let conn = match accept().await {
            Ok(conn) => conn,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let close = match conn.closer() {
            Ok(c) => c,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let id = table.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        let mut entry = Some(Entry { id, state: state.clone(), close });
        while !table.admit(&mut entry) {
            table.freed.notified().await;
        }
        spawn(conn, router.clone(), id, state, table.clone());
    }
}

/// Out of file descriptors and the like: wait a little instead of spinning.
async fn accept_failed(e: std::io::Error) {
    warn!("local API: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn(conn: Conn, router: Router, id: u64, state: Arc<ConnState>, table: Arc<Table>) {
    let done = table.clone();
    let started = std::thread::Builder::new().name("api-conn".into()).stack_size(STACK).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
            Ok(rt) => rt,
            Err(e) => return error!("local API: cannot start a connection runtime: {e}"),
        };
        rt.block_on(async move {
            match conn {
                Conn::Tcp(s) => serve(tokio::net::TcpStream::from_std(s), router, state).await,
                Conn::Unix(s) => serve(tokio::net::UnixStream::from_std(s), router, state).await,
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
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        .await;
    if let Err(e) = served {
        debug!("local API connection ended: {e}");
    }
}
