//! What `tern-bench` and `tern-compile-bench` share: timing and
//! statistics, a keep-alive HTTP/1.1 client for the agent's socket, and
//! the coordinator's CLI run as a child.

use anyhow::{Context, Result, bail, ensure};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tern_proto::TENSORS_MEDIA_TYPE;

/// Percentiles and mean of a set of latencies, in ms.
pub struct Stats {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
}

/// The [`Stats`] of `ms` (not empty).
pub fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    Stats { p50: q(0.5), p99: q(0.99), mean: ms.iter().sum::<f64>() / ms.len() as f64 }
}

/// `warmup` untimed calls of `f`, then the ms of each of `iters` timed ones.
pub fn time_runs(iters: usize, warmup: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// A keep-alive HTTP/1.1 client, the same for the Unix socket and TCP, so
/// that the two agent paths differ only in the transport.
pub struct Http1<S: Read + Write> {
    /// The connection, written to.
    pub write: S,
    /// The same connection, read from.
    pub read: BufReader<S>,
    /// `(queue, run, handler)` ms from each answer's Server-Timing header.
    pub timings: Vec<[f64; 3]>,
}

fn server_timing(v: &str) -> Option<[f64; 3]> {
    let mut out = [f64::NAN; 3];
    for part in v.split(',') {
        let (name, dur) = part.trim().split_once(";dur=")?;
        let i = ["queue", "run", "handler"].iter().position(|n| *n == name)?;
        out[i] = dur.trim().parse().ok()?;
    }
    Some(out)
}

impl<S: Read + Write> Http1<S> {
    /// POSTs a tensors body to `path`; the answer's body, or an error
    /// unless it is 200.
    pub fn post(&mut self, path: &str, body: &[u8]) -> Result<Vec<u8>> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: {TENSORS_MEDIA_TYPE}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.write.write_all(&req)?;
        let mut line = String::new();
        self.read.read_line(&mut line)?;
        let status: u16 = line.split(' ').nth(1).context("no status line")?.parse()?;
        let mut len = None;
        loop {
            line.clear();
            self.read.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = Some(v.trim().parse::<usize>()?);
                } else if k.eq_ignore_ascii_case("server-timing") {
                    self.timings.extend(server_timing(v));
                }
            }
        }
        let mut out = vec![0; len.context("response without content-length")?];
        self.read.read_exact(&mut out)?;
        ensure!(status == 200, "agent answered {status}: {}", String::from_utf8_lossy(&out));
        Ok(out)
    }
}

/// Child processes, killed when dropped.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it gives a value; an error after 60 s.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `tern --data-dir DATA ARGS…` from `bin`; its stdout, or an error.
pub fn cli(bin: &Path, data: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin.join("tern")).arg("--data-dir").arg(data).args(args).output()?;
    ensure!(out.status.success(), "tern {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}
