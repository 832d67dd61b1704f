//! The local API's connections, each on a thread of its own running a
//! current-thread runtime: a request is read, run and answered on that one
//! thread, with no hand-over between threads on its way. (Measured on
//! 2 cores: handing the run to a worker thread, or `block_in_place` on the
//! shared runtime, cost 0.2–1 ms on a 2–3 ms CNN, mostly as a slower run
//! while other threads woke around it; see docs/performance.md.)
//!
//! An HTTP/1.1 connection carries one request at a time, so a run that
//! blocks its thread blocks no one else; each model's `Gate` bounds how many
//! run at once. At most `MAX_CONNECTIONS` are open per listener; further
//! clients wait in the listen backlog.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, warn};

/// Open connections per listener at most (each holds a thread).
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this, or the connection closes.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Stack of a connection thread; models run on it.
const STACK: usize = 2 << 20;

enum Conn {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
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
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = limit.clone().acquire_owned().await.expect("never closed");
        match accept().await {
            Ok(conn) => spawn(conn, router.clone(), slot),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Out of file descriptors and the like: wait a little instead of spinning.
async fn accept_failed(e: std::io::Error) {
    warn!("local API: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn(conn: Conn, router: Router, slot: OwnedSemaphorePermit) {
    let started = std::thread::Builder::new().name("api-conn".into()).stack_size(STACK).spawn(move || {
        let _slot = slot;
        let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
            Ok(rt) => rt,
            Err(e) => return error!("local API: cannot start a connection runtime: {e}"),
        };
        rt.block_on(async move {
            match conn {
                Conn::Tcp(s) => serve(tokio::net::TcpStream::from_std(s), router).await,
                Conn::Unix(s) => serve(tokio::net::UnixStream::from_std(s), router).await,
            }
        });
    });
    if let Err(e) = started {
        error!("local API: cannot start a connection thread: {e}");
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(io: std::io::Result<S>, router: Router) {
    let io = match io {
        Ok(io) => io,
        Err(e) => return warn!("local API: cannot register a connection: {e}"),
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        .await;
    if let Err(e) = served {
        debug!("local API connection ended: {e}");
    }
}
