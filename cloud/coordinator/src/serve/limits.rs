//! What one coordinator lets the network make it hold: connections in all,
//! handshakes and connections that have not shown a device certificate (in
//! all and per source address), and log lines about refused peers.
//! Addresses count by /64 for IPv6 (one host holds a whole /64) and as they
//! are for IPv4. Addresses enrolled devices recently connected from have a
//! handshake pool of their own, with room at each address for twice the
//! devices seen there, so a flood of anonymous handshakes cannot keep the
//! fleet from reconnecting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Caps on connections (flags of `tern serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// All connections at once: handshaking, anonymous and devices.
    pub connections: usize,
    /// Handshakes in progress (each lasts a round trip, 5 s at most).
    pub handshakes: usize,
    /// Connections past their handshake without a device certificate
    /// (enrolling), in all.
    pub anonymous: usize,
    /// Handshakes, and anonymous connections, from one source address.
    pub per_address: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// All connection slots are taken.
    Connections,
    /// As many handshakes are in progress as may be.
    Handshakes,
    /// All slots for connections without a certificate are taken.
    Anonymous,
    /// This address has as many handshakes, or connections without a
    /// certificate, as it may.
    PerAddress,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Connections => "every connection slot is taken",
            Refused::Handshakes => "as many handshakes are in progress as may be",
            Refused::Anonymous => "every slot for connections without a certificate is taken",
            Refused::PerAddress => "this address has as many connections of its kind as it may",
        })
    }
}

/// Counts of one kind of connection, in all and by address.
#[derive(Default)]
struct Pool {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl Pool {
    fn take(&mut self, ip: IpAddr, cap: usize, per_address: usize, full: Refused) -> Result<(), Refused> {
        if self.total >= cap {
            return Err(full);
        }
        let here = self.by_address.entry(ip).or_default();
        if *here >= per_address {
            return Err(Refused::PerAddress);
        }
        *here += 1;
        self.total += 1;
        Ok(())
    }

    fn give_back(&mut self, ip: IpAddr) {
        self.total -= 1;
        if let Some(n) = self.by_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&ip);
            }
        }
    }
}

#[derive(Default)]
struct Pools {
    handshaking: Pool,
    /// Handshakes from addresses devices were seen at.
    returning: Pool,
    anonymous: Pool,
    /// Where each device last connected from: one entry per enrolled
    /// device that connected, so no more than the fleet has.
    device_at: HashMap<String, IpAddr>,
    /// How many devices each address holds (from `device_at`).
    devices_per_address: HashMap<IpAddr, usize>,
}

/// The address as the caps count it: IPv6 by its /64, IPv4 (also mapped
/// into IPv6) as it is.
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Live connection counts.
pub struct Counters {
    caps: Caps,
    total: AtomicUsize,
    pools: Mutex<Pools>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    Returning,
    Anonymous,
    Device,
    /// Refused after its handshake, about to be closed: in no pool.
    Refused,
}

/// A connection's place in the counts, given back when dropped: it counts
/// as handshaking, then as anonymous ([`Slot::anonymous`]) or as a device
/// ([`Slot::device`]).
pub struct Slot {
    counters: Arc<Counters>,
    ip: IpAddr,
    phase: Phase,
}

impl Counters {
    /// Counters under `caps`.
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self { caps, total: AtomicUsize::new(0), pools: Mutex::new(Pools::default()) })
    }

    /// A slot for a new connection from `ip` to make its handshake in, or
    /// why not. An address devices connect from gets a place in the
    /// returning pool when the general one is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let ip = bucket(ip);
        let mut pools = self.pools.lock().expect("lock");
        if self.total.load(Ordering::Acquire) >= self.caps.connections {
            return Err(Refused::Connections);
        }
        let phase = match pools.handshaking.take(ip, self.caps.handshakes, self.caps.per_address, Refused::Handshakes) {
            Ok(()) => Phase::Handshaking,
            Err(e) => {
                // Devices behind one NAT share an address: room for twice
                // the devices seen there lately, no more.
                let devices = pools.devices_per_address.get(&ip).copied().unwrap_or(0);
                if devices == 0 {
                    return Err(e);
                }
                pools.returning.take(ip, self.caps.handshakes, devices.saturating_mul(2), Refused::Handshakes)?;
                Phase::Returning
            }
        };
        self.total.fetch_add(1, Ordering::AcqRel);
        Ok(Slot { counters: self.clone(), ip, phase })
    }

    /// Whether handshakes are getting crowded: then the endpoint asks
    /// unvalidated addresses to prove they are theirs (a QUIC retry) first.
    pub fn crowded(&self) -> bool {
        self.pools.lock().expect("lock").handshaking.total >= self.caps.handshakes / 2
    }

    /// Connections open now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Connections past their handshake without a device certificate.
    pub fn anonymous(&self) -> usize {
        self.pools.lock().expect("lock").anonymous.total
    }

    /// Handshakes in progress.
    pub fn handshaking(&self) -> usize {
        let pools = self.pools.lock().expect("lock");
        pools.handshaking.total + pools.returning.total
    }
}

impl Slot {
    fn leave(&mut self, pools: &mut Pools) {
        match self.phase {
            Phase::Handshaking => pools.handshaking.give_back(self.ip),
            Phase::Returning => pools.returning.give_back(self.ip),
            Phase::Anonymous => pools.anonymous.give_back(self.ip),
            Phase::Device | Phase::Refused => {}
        }
    }

    /// The handshake showed the certificate of enrolled device `id`: its
    /// address is remembered as the one it connects from.
    pub fn device(&mut self, id: &str) {
        let counters = self.counters.clone();
        let mut pools = counters.pools.lock().expect("lock");
        self.leave(&mut pools);
        self.phase = Phase::Device;
        let Pools { device_at, devices_per_address, .. } = &mut *pools;
        if let Some(old) = device_at.insert(id.to_owned(), self.ip) {
            forget(devices_per_address, old);
        }
        *devices_per_address.entry(self.ip).or_default() += 1;
    }

    /// The device was removed: its address no longer counts for it.
    pub fn forget_device(counters: &Counters, id: &str) {
        let mut pools = counters.pools.lock().expect("lock");
        let Pools { device_at, devices_per_address, .. } = &mut *pools;
        if let Some(ip) = device_at.remove(id) {
            forget(devices_per_address, ip);
        }
    }

    /// The handshake showed no certificate: the connection may only enroll,
    /// and only while there is an anonymous slot for it.
    pub fn anonymous(&mut self) -> Result<(), Refused> {
        let counters = self.counters.clone();
        let mut pools = counters.pools.lock().expect("lock");
        self.leave(&mut pools);
        let caps = counters.caps;
        match pools.anonymous.take(self.ip, caps.anonymous, caps.per_address, Refused::Anonymous) {
            Ok(()) => {
                self.phase = Phase::Anonymous;
                Ok(())
            }
            Err(e) => {
                self.phase = Phase::Refused;
                Err(e)
            }
        }
    }
}

fn forget(per_address: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_address.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_address.remove(&ip);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counters = self.counters.clone();
        let mut pools = counters.pools.lock().expect("lock");
        self.leave(&mut pools);
        counters.total.fetch_sub(1, Ordering::AcqRel);
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
    fn handshakes_and_anonymous_connections_are_capped_in_all_and_per_address() {
        let c = Counters::new(Caps { connections: 6, handshakes: 3, anonymous: 2, per_address: 2 });
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut a1 = c.admit(ip("10.0.0.1")).unwrap();
        let mut a2 = c.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(c.admit(ip("10.0.0.1")).err(), Some(Refused::PerAddress));
        let mut b1 = c.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(c.admit(ip("10.0.0.3")).err(), Some(Refused::Handshakes));
        assert!(c.crowded());
        // Handshakes done: a device, and two without certificates.
        a1.device("a1");
        a2.anonymous().unwrap();
        assert_eq!(b1.anonymous(), Ok(()));
        assert_eq!((c.anonymous(), c.handshaking(), c.total()), (2, 0, 3));
        // The anonymous pool is full; a third is refused after its handshake
        // (and only counts in the total until it is dropped).
        let mut c1 = c.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(c1.anonymous(), Err(Refused::Anonymous));
        drop(c1);
        // A device's connection takes no anonymous slot.
        let mut d1 = c.admit(ip("10.0.0.2")).unwrap();
        d1.device("d1");
        let _h = (c.admit(ip("10.0.0.4")).unwrap(), c.admit(ip("10.0.0.5")).unwrap());
        assert_eq!(c.admit(ip("10.0.0.6")).err(), Some(Refused::Connections));
        drop(a2);
        assert_eq!((c.anonymous(), c.handshaking(), c.total()), (1, 2, 5));
        drop((a1, b1, d1));
        assert_eq!(c.total(), 2);
    }

    #[test]
    fn addresses_devices_came_from_get_handshakes_when_a_flood_holds_the_rest() {
        let c = Counters::new(Caps { connections: 100, handshakes: 4, anonymous: 10, per_address: 2 });
        let nat: IpAddr = "10.0.0.9".parse().unwrap();
        for id in ["cam-1", "cam-2"] {
            c.admit(nat).unwrap().device(id);
        }
        let _flood: Vec<Slot> = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]
            .iter()
            .map(|a| c.admit(a.parse().unwrap()).unwrap())
            .collect();
        assert_eq!(c.admit("10.0.0.3".parse().unwrap()).err(), Some(Refused::Handshakes));
        // The NAT with two devices gets handshakes anyway: twice as many as
        // its devices, more than the per-address cap, but not without end.
        let back: Vec<Slot> = (0..4).map(|_| c.admit(nat).unwrap()).collect();
        assert!(c.admit(nat).is_err(), "no more than twice its devices");
        drop(back);
        // Removed devices take their share with them.
        Slot::forget_device(&c, "cam-1");
        Slot::forget_device(&c, "cam-2");
        assert_eq!(c.admit(nat).err(), Some(Refused::Handshakes), "no devices there any more");
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        assert_eq!(bucket("2001:db8:1:2:aaaa::1".parse().unwrap()), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(bucket("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.3".parse::<IpAddr>().unwrap());
        let c = Counters::new(Caps { connections: 100, handshakes: 100, anonymous: 10, per_address: 2 });
        let _a = c.admit("2001:db8::1".parse().unwrap()).unwrap();
        let _b = c.admit("2001:db8::2".parse().unwrap()).unwrap();
        assert_eq!(c.admit("2001:db8::3".parse().unwrap()).err(), Some(Refused::PerAddress));
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
