//! TUF metadata from a repository (or an attacker in its place): any bytes
//! offered as any role, to a client that trusts a real root, must be
//! refused with an error or taken, never crash it or make it trust a file
//! its root's keys did not sign.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tern_trust::SigningKey;
use tern_trust::tuf::{Key, Role, RoleKeys, Root, TrustedSet, sign_metadata};

fn root() -> &'static Vec<u8> {
    static ROOT: OnceLock<Vec<u8>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let (k, _) = SigningKey::generate().unwrap();
        let key = Key::ed25519(&k.verifying_key());
        let roles = ["root", "timestamp", "snapshot", "targets"]
            .into_iter()
            .map(|r| (r.to_string(), RoleKeys { keyids: vec![key.id()], threshold: 1 }))
            .collect();
        let body = Root {
            consistent_snapshot: false,
            version: 1,
            expires: "2100-01-01T00:00:00Z".into(),
            keys: [(key.id(), key)].into(),
            roles,
        };
        sign_metadata(Role::Root, &body, &[&k])
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = TrustedSet::new(data, 0);
    let mut set = TrustedSet::new(root(), 0).expect("the root verifies");
    assert!(set.update_root(data).is_err(), "took a root its keys did not sign");
    assert!(set.update_timestamp(data, 0).is_err(), "took a timestamp its key did not sign");
    assert!(set.update_snapshot(data, 0).is_err());
    assert!(set.update_targets(data, 0).is_err());
});
