//! The control sessions of connected devices: one per device. A new session
//! of a device replaces its old one (the old connection is closed), a second
//! control stream on one connection is refused, and a change to a device's
//! desired state wakes that device's session only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use tern_proto::DeviceId;
use tokio::sync::watch;
use tracing::warn;

/// QUIC close codes the coordinator uses.
pub mod close {
    /// A newer session of the same device took over.
    pub const REPLACED: u32 = 2;
    /// The device was removed from the fleet.
    pub const REVOKED: u32 = 3;
    /// Too many connections without a certificate; try again later.
    pub const BUSY: u32 = 4;
}

struct Session {
    /// `quinn::Connection::stable_id` of its connection.
    conn_id: usize,
    conn: quinn::Connection,
    remote: SocketAddr,
    wake: watch::Sender<u64>,
}

/// A session that was opened: wait on `wake` for changes to the device's
/// desired state; give `id` back to [`Sessions::end`].
pub struct Opened {
    /// Which connection holds it.
    pub id: usize,
    /// Changes whenever the device's desired state does.
    pub wake: watch::Receiver<u64>,
}

/// This connection already carries the device's control session.
#[derive(Debug)]
pub struct AlreadyOpen;

/// Every open control session, by device.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<DeviceId, Session>>,
}

impl Sessions {
    /// Opens `device`'s session on `conn`. A session of the device on
    /// another connection is closed and replaced (logged with both
    /// addresses); one on this connection already is an error.
    pub fn open(&self, device: &DeviceId, conn: &quinn::Connection) -> Result<Opened, AlreadyOpen> {
        let mut open = self.open.lock().expect("lock");
        let conn_id = conn.stable_id();
        if let Some(old) = open.get(device) {
            if old.conn_id == conn_id {
                return Err(AlreadyOpen);
            }
            warn!(device = %device, old = %old.remote, new = %conn.remote_address(),
                "a second session for this device's certificate: closing the older one");
            old.conn.close(close::REPLACED.into(), b"replaced by a newer session of this device");
        }
        let (wake, rx) = watch::channel(0);
        open.insert(device.clone(), Session { conn_id, conn: conn.clone(), remote: conn.remote_address(), wake });
        Ok(Opened { id: conn_id, wake: rx })
    }

    /// Forgets the session that `opened` the device's, unless a newer one replaced it.
    pub fn end(&self, device: &DeviceId, id: usize) {
        let mut open = self.open.lock().expect("lock");
        if open.get(device).is_some_and(|s| s.conn_id == id) {
            open.remove(device);
        }
    }

    /// Tells the device's session, if it has one, that its desired state changed.
    pub fn wake(&self, device: &DeviceId) {
        if let Some(s) = self.open.lock().expect("lock").get(device) {
            s.wake.send_modify(|n| *n += 1);
        }
    }

    /// Closes the device's session at once (it was removed).
    pub fn kick(&self, device: &DeviceId, code: u32, reason: &str) {
        if let Some(s) = self.open.lock().expect("lock").remove(device) {
            s.conn.close(code.into(), reason.as_bytes());
        }
    }

    /// How many devices are connected.
    pub fn len(&self) -> usize {
        self.open.lock().expect("lock").len()
    }
}
