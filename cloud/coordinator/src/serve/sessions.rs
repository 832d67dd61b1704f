//! Connected devices: every connection each one has open (a few at most),
//! and its one control session. A new session of a device replaces its old
//! one (that connection is closed), a second control stream on one
//! connection is refused, removing a device closes all its connections, and
//! a change to a device's desired state wakes that device's session only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use tern_proto::DeviceId;
use tokio::sync::watch;
use tracing::warn;

/// Connections one device may have open at once; opening another closes
/// its oldest (an agent needs one; a few cover reconnects in flight).
pub const PER_DEVICE: usize = 4;

/// QUIC close codes the coordinator uses.
pub mod close {
    /// A newer connection or session of the same device took over.
    pub const REPLACED: u32 = 2;
    /// The device was removed from the fleet.
    pub const REVOKED: u32 = 3;
    /// Too many connections without a certificate; try again later.
    pub const BUSY: u32 = 4;
    /// The connection opened no control session in time, or went quiet.
    pub const IDLE: u32 = 5;
}

struct Open {
    /// `quinn::Connection::stable_id`.
    id: usize,
    conn: quinn::Connection,
    remote: SocketAddr,
}

#[derive(Default)]
struct Device {
    /// Oldest first.
    conns: Vec<Open>,
    /// The connection holding the control session, and its wake-up.
    session: Option<(usize, watch::Sender<u64>)>,
}

/// A session that was opened: wait on `wake` for changes to the device's
/// desired state.
pub struct Opened {
    /// Changes whenever the device's desired state does.
    pub wake: watch::Receiver<u64>,
}

/// Why a session was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOpened {
    /// This connection carries the device's control session already.
    AlreadyOpen,
    /// The connection is no longer one of the device's (it ended, was
    /// replaced, or the device was removed).
    Gone,
}

/// Every connected device.
#[derive(Default)]
pub struct Sessions {
    devices: Mutex<HashMap<DeviceId, Device>>,
}

impl Sessions {
    /// Counts a new connection of `device`; past [`PER_DEVICE`] its oldest
    /// connection is closed.
    pub fn connected(&self, device: &DeviceId, conn: &quinn::Connection) {
        let mut devices = self.devices.lock().expect("lock");
        let d = devices.entry(device.clone()).or_default();
        d.conns.push(Open { id: conn.stable_id(), conn: conn.clone(), remote: conn.remote_address() });
        while d.conns.len() > PER_DEVICE {
            let old = d.conns.remove(0);
            warn!(device = %device, old = %old.remote, new = %conn.remote_address(),
                "more than {PER_DEVICE} connections with this device's certificate: closing the oldest");
            old.conn.close(close::REPLACED.into(), b"replaced by a newer connection of this device");
        }
    }

    /// Forgets a connection (and its session, if it held it).
    pub fn disconnected(&self, device: &DeviceId, conn_id: usize) {
        let mut devices = self.devices.lock().expect("lock");
        if let Some(d) = devices.get_mut(device) {
            d.conns.retain(|c| c.id != conn_id);
            if d.session.as_ref().is_some_and(|(id, _)| *id == conn_id) {
                d.session = None;
            }
            if d.conns.is_empty() {
                devices.remove(device);
            }
        }
    }

    /// Opens `device`'s session on `conn`. A session of the device on
    /// another connection is closed with that connection and replaced
    /// (logged with both addresses); one on this connection already is an
    /// error.
    pub fn open(&self, device: &DeviceId, conn: &quinn::Connection) -> Result<Opened, NotOpened> {
        let mut devices = self.devices.lock().expect("lock");
        let conn_id = conn.stable_id();
        let Some(d) = devices.get_mut(device).filter(|d| d.conns.iter().any(|c| c.id == conn_id)) else {
            return Err(NotOpened::Gone);
        };
        if let Some((old, _)) = &d.session {
            if *old == conn_id {
                return Err(NotOpened::AlreadyOpen);
            }
            if let Some(i) = d.conns.iter().position(|c| c.id == *old) {
                let old = d.conns.remove(i);
                warn!(device = %device, old = %old.remote, new = %conn.remote_address(),
                    "a second session for this device's certificate: closing the older one");
                old.conn.close(close::REPLACED.into(), b"replaced by a newer session of this device");
            }
        }
        let (wake, rx) = watch::channel(0);
        d.session = Some((conn_id, wake));
        Ok(Opened { wake: rx })
    }

    /// Whether `conn_id` holds `device`'s control session.
    pub fn has_session(&self, device: &DeviceId, conn_id: usize) -> bool {
        let devices = self.devices.lock().expect("lock");
        devices.get(device).and_then(|d| d.session.as_ref()).is_some_and(|(id, _)| *id == conn_id)
    }

    /// Tells the device's session, if it has one, that its desired state changed.
    pub fn wake(&self, device: &DeviceId) {
        let devices = self.devices.lock().expect("lock");
        if let Some((_, wake)) = devices.get(device).and_then(|d| d.session.as_ref()) {
            wake.send_modify(|n| *n += 1);
        }
    }

    /// Closes every connection of the device at once (it was removed).
    pub fn kick(&self, device: &DeviceId, code: u32, reason: &str) {
        if let Some(d) = self.devices.lock().expect("lock").remove(device) {
            for c in d.conns {
                c.conn.close(code.into(), reason.as_bytes());
            }
        }
    }

    /// Whether the device has a control session now.
    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.devices.lock().expect("lock").get(device).is_some_and(|d| d.session.is_some())
    }

    /// How many devices have a control session.
    pub fn len(&self) -> usize {
        self.devices.lock().expect("lock").values().filter(|d| d.session.is_some()).count()
    }
}
