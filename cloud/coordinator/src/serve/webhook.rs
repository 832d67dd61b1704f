//! The alert webhook (`tern serve --webhook URL`): every alert raised or
//! cleared on a device is POSTed as JSON to each URL, in order, from a
//! queue and thread per URL (one that is down holds up no other). At most
//! once: what is queued when the coordinator stops is not sent. A delivery that fails for a reason that may pass (no
//! connection, a timeout, 408, 429, a 5xx) is tried again after 1, 2, 4, 8
//! and 16 s ([`ATTEMPTS`] in all); the queue holds [`QUEUED`] notices, and
//! past that new ones are dropped and counted.

use prometheus_client::metrics::counter::Counter;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;
use tracing::{info, warn};

/// Tries per notice and URL.
pub const ATTEMPTS: u32 = 6;
/// Notices waiting at most.
pub const QUEUED: usize = 1024;
/// How long one POST may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What happened to notices, for `/metrics`.
#[derive(Clone, Default)]
pub struct Outcomes {
    /// Delivered (a 2xx answer).
    pub delivered: Counter,
    /// Given up on: refused (another 4xx), or every attempt failed.
    pub failed: Counter,
    /// Dropped: the queue was full.
    pub dropped: Counter,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct Webhook {
    queues: Vec<SyncSender<serde_json::Value>>,
    outcomes: Outcomes,
}

impl Webhook {
    /// A notifier posting to `urls`, with a thread each.
    pub fn start(urls: Vec<String>, outcomes: Outcomes) -> std::io::Result<Webhook> {
        let mut queues = Vec::new();
        for url in urls {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUED);
            let o = outcomes.clone();
            std::thread::Builder::new().name("webhook".into()).spawn(move || deliver_all(&url, rx, &o))?;
            queues.push(tx);
        }
        Ok(Webhook { queues, outcomes })
    }

    /// Queues the notice of an alert raised or cleared; never blocks.
    pub fn alert(&self, event: &str, alert: &tern_registry::Alert) {
        let notice = serde_json::json!({ "event": event, "alert": alert });
        for tx in &self.queues {
            match tx.try_send(notice.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.outcomes.dropped.inc();
                    warn!(alert = alert.id, "webhook queue full: notice dropped");
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.outcomes.dropped.inc();
                    warn!(alert = alert.id, "webhook thread gone: notice dropped");
                }
            }
        }
    }
}

/// Checks a `--webhook` URL.
pub fn parse_url(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("http://").ok_or_else(|| {
        "a webhook URL is http://HOST[:PORT]/PATH (https is not built in: point it at a TLS proxy)".to_string()
    })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{s:?} names no host"));
    }
    Ok(s.to_owned())
}

fn deliver_all(url: &str, rx: Receiver<serde_json::Value>, outcomes: &Outcomes) {
    let agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(TIMEOUT)).build().new_agent();
    for notice in rx {
        match deliver(&agent, url, &notice) {
            Ok(attempts) => {
                outcomes.delivered.inc();
                info!(url, attempts, event = %notice["event"], alert = %notice["alert"]["id"], "webhook delivered");
            }
            Err(e) => {
                outcomes.failed.inc();
                warn!(url, event = %notice["event"], alert = %notice["alert"]["id"], "webhook not delivered: {e}");
            }
        }
    }
}

/// POSTs `notice`, trying again while the failure may pass; the attempts
/// it took.
fn deliver(agent: &ureq::Agent, url: &str, notice: &serde_json::Value) -> Result<u32, String> {
    let mut wait = Duration::from_secs(1);
    let mut attempt = 1;
    loop {
        let why = match agent.post(url).send_json(notice) {
            Ok(r) if r.status().is_success() => return Ok(attempt),
            Ok(r) => {
                let code = r.status().as_u16();
                if !(code == 408 || code == 429 || code >= 500) {
                    return Err(format!("refused with {code}"));
                }
                format!("answered {code}")
            }
            Err(e) => e.to_string(),
        };
        if attempt == ATTEMPTS {
            return Err(format!("{why}, {ATTEMPTS} attempts"));
        }
        warn!(url, attempt, "webhook: {why}; trying again in {wait:?}");
        std::thread::sleep(wait);
        wait *= 2;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host_are_taken() {
        assert!(parse_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(parse_url("https://hooks.example/x").unwrap_err().contains("TLS proxy"));
        assert!(parse_url("http:///x").is_err());
        assert!(parse_url("ftp://x").is_err());
    }
}
