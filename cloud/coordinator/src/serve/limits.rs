//! What one coordinator lets the network make it hold: connections in all,
//! connections that have not shown a device certificate (in all and per
//! source address), and log lines about refused peers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Caps on connections (flags of `tern serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// All connections at once, devices included.
    pub connections: usize,
    /// Connections without a device certificate (handshaking or enrolling).
    pub anonymous: usize,
    /// ... of those, from one source address.
    pub anonymous_per_address: usize,
}

/// Why a connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// All connection slots are taken.
    Connections,
    /// All slots for peers without a certificate are taken.
    Anonymous,
    /// This address has as many of those as it may.
    PerAddress,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Connections => "every connection slot is taken",
            Refused::Anonymous => "every slot for connections without a certificate is taken",
            Refused::PerAddress => "this address has as many connections without a certificate as it may",
        })
    }
}

#[derive(Default)]
struct Anonymous {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Live connection counts.
pub struct Counters {
    caps: Caps,
    total: AtomicUsize,
    anonymous: Mutex<Anonymous>,
}

/// A connection's place in the counts, given back when dropped. It counts
/// as anonymous until [`Slot::authenticated`].
pub struct Slot {
    counters: Arc<Counters>,
    anonymous: Option<IpAddr>,
}

impl Counters {
    /// Counters under `caps`.
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self { caps, total: AtomicUsize::new(0), anonymous: Mutex::new(Anonymous::default()) })
    }

    /// A slot for a new connection from `ip`, anonymous until it shows a
    /// certificate, or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let mut anon = self.anonymous.lock().expect("lock");
        if self.total.load(Ordering::Acquire) >= self.caps.connections {
            return Err(Refused::Connections);
        }
        if anon.total >= self.caps.anonymous {
            return Err(Refused::Anonymous);
        }
        let here = anon.by_address.entry(ip).or_default();
        if *here >= self.caps.anonymous_per_address {
            return Err(Refused::PerAddress);
        }
        *here += 1;
        anon.total += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        Ok(Slot { counters: self.clone(), anonymous: Some(ip) })
    }

    /// Connections open now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Connections without a device certificate open now.
    pub fn anonymous(&self) -> usize {
        self.anonymous.lock().expect("lock").total
    }

    fn release_anonymous(&self, ip: IpAddr) {
        let mut anon = self.anonymous.lock().expect("lock");
        anon.total -= 1;
        if let Some(n) = anon.by_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                anon.by_address.remove(&ip);
            }
        }
    }
}

impl Slot {
    /// The peer showed a device certificate: it no longer counts as anonymous.
    pub fn authenticated(&mut self) {
        if let Some(ip) = self.anonymous.take() {
            self.counters.release_anonymous(ip);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.authenticated();
        self.counters.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most `max` log lines per `window` about one kind of event; the rest
/// are counted and the count is reported with the next line let through,
/// so a peer cannot flood the log.
pub struct LogLimit {
    max: u32,
    window: Duration,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimit {
    /// `max` lines per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self { max, window, state: Mutex::new((Instant::now(), 0, 0)) }
    }

    /// `Some(n)`: log this one, and say that `n` were suppressed before it.
    /// `None`: suppressed.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().expect("lock");
        if now.duration_since(s.0) >= self.window {
            *s = (now, 0, s.2);
        }
        if s.1 < self.max {
            s.1 += 1;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_connections_are_capped_in_all_and_per_address() {
        let c = Counters::new(Caps { connections: 4, anonymous: 3, anonymous_per_address: 2 });
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let a1 = c.admit(ip("10.0.0.1")).unwrap();
        let _a2 = c.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(c.admit(ip("10.0.0.1")).err(), Some(Refused::PerAddress));
        let mut b1 = c.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(c.admit(ip("10.0.0.2")).err(), Some(Refused::Anonymous));
        // A device certificate frees its anonymous place, not its connection slot.
        b1.authenticated();
        assert_eq!((c.anonymous(), c.total()), (2, 3));
        let _c1 = c.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(c.admit(ip("10.0.0.4")).err(), Some(Refused::Connections));
        drop(b1);
        assert_eq!(c.admit(ip("10.0.0.4")).err(), Some(Refused::Anonymous));
        drop(a1);
        assert_eq!((c.anonymous(), c.total()), (2, 2));
        assert!(c.admit(ip("10.0.0.4")).is_ok());
    }

    #[test]
    fn log_lines_are_limited_per_window_and_the_rest_counted() {
        let l = LogLimit::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(2));
    }
}
