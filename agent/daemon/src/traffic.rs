//! The bytes each link carried per day (UTC), as the coordinator is told
//! and `tern fleet list` shows: counted at the IP layer (what the transport
//! sent and received plus its IP and UDP headers), kept across restarts in
//! `traffic.json`.

use std::path::PathBuf;
use std::sync::Mutex;
use tern_proto::LinkDay;
use tracing::warn;

/// The counts, shared by every connection of the agent.
pub struct Traffic {
    days: Mutex<Vec<LinkDay>>,
    path: PathBuf,
    /// One write at a time: they share a temporary file.
    saving: Mutex<()>,
}

impl Traffic {
    /// The counts saved at `path`, or none if it is missing or unreadable
    /// (they are a report, not state anything depends on).
    pub fn open(path: PathBuf) -> Traffic {
        let days = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Vec<LinkDay>>(&b).unwrap_or_else(|e| {
                warn!("{}: {e}; counting afresh", path.display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let days = days.into_iter().take(tern_proto::MAX_TRAFFIC_DAYS).collect();
        Traffic { days: Mutex::new(days), path, saving: Mutex::new(()) }
    }

    /// Counts `sent` and `received` bytes on `link` on day `day`.
    pub fn add(&self, link: &str, day: u32, sent: u64, received: u64) {
        if sent == 0 && received == 0 {
            return;
        }
        let mut days = self.days.lock().expect("traffic lock");
        match days.iter_mut().find(|d| d.link == link && d.day == day) {
            Some(d) => {
                d.sent = d.sent.saturating_add(sent);
                d.received = d.received.saturating_add(received);
            }
            None => days.push(LinkDay { link: link.to_owned(), day, sent, received }),
        }
        // Today and the day before, by the clock as it reads now: a later
        // day was counted while it ran ahead, an earlier one is old.
        days.retain(|d| d.day <= day && d.day.saturating_add(1) >= day);
    }

    /// Every day kept, of every link.
    pub fn days(&self) -> Vec<LinkDay> {
        self.days.lock().expect("traffic lock").clone()
    }

    /// Writes the counts down (atomically, fsynced).
    pub fn save(&self) {
        let _one = self.saving.lock().expect("traffic save lock");
        let days = self.days();
        let bytes = serde_json::to_vec(&days).expect("counts encode");
        if let Err(e) = tern_durable::write_atomic(&self.path, &bytes, false) {
            warn!("writing {}: {e}", self.path.display());
        }
    }
}

/// Today, as days since 1970-01-01 by this device's clock (UTC).
pub fn today() -> u32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    u32::try_from(secs / 86_400).unwrap_or(u32::MAX)
}

/// What a QUIC connection carried since it was last read.
#[derive(Debug, Default)]
pub struct Meter {
    sent: u64,
    received: u64,
}

impl Meter {
    /// The bytes sent and received on `conn` since the last call: its UDP
    /// payloads and, per datagram, an IP and a UDP header.
    pub fn take(&mut self, conn: &quinn::Connection) -> (u64, u64) {
        let stats = conn.stats();
        let header = if conn.remote_address().is_ipv4() { 28 } else { 48 };
        let sent = stats.udp_tx.bytes + header * stats.udp_tx.datagrams;
        let received = stats.udp_rx.bytes + header * stats.udp_rx.datagrams;
        let delta = (sent.saturating_sub(self.sent), received.saturating_sub(self.received));
        (self.sent, self.received) = (sent, received);
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_link_and_day_and_only_today_and_the_day_before_stay() {
        let dir = tempfile::tempdir().unwrap();
        let t = Traffic::open(dir.path().join("traffic.json"));
        t.add("quic", 100, 10, 20);
        t.add("quic", 100, 1, 2);
        t.add("mqtt", 100, 5, 0);
        t.add("quic", 101, 7, 7);
        t.add("quic", 102, 3, 4);
        t.add("quic", 102, 0, 0);
        let kept: Vec<_> = t.days().iter().map(|d| (d.link.clone(), d.day)).collect();
        assert_eq!(kept, [("quic".to_owned(), 101), ("quic".to_owned(), 102)], "today and the day before");
        // A clock that ran ahead, then was set right: the day ahead goes
        // (and what it made look old went with it).
        t.add("quic", 500, 1, 1);
        t.add("quic", 102, 0, 1);
        let days = t.days();
        assert_eq!(
            days.iter().map(|d| (d.link.as_str(), d.day, d.sent, d.received)).collect::<Vec<_>>(),
            [("quic", 102, 0, 1)]
        );
        t.add("quic", 103, 2, 2);
        t.add("mqtt", 103, 1, 1);
        let days = t.days();
        let kept: Vec<_> = days.iter().map(|d| (d.link.as_str(), d.day, d.sent, d.received)).collect();
        assert_eq!(kept, [("quic", 102, 0, 1), ("quic", 103, 2, 2), ("mqtt", 103, 1, 1)]);
        t.save();
        let again = Traffic::open(dir.path().join("traffic.json"));
        assert_eq!(again.days(), days, "the counts survive a restart");
        std::fs::write(dir.path().join("traffic.json"), b"{not json").unwrap();
        assert!(Traffic::open(dir.path().join("traffic.json")).days().is_empty());
    }
}
