//! Rollouts in the registry: devices' tags and groups, the target set a
//! selector picks, and each rollout's state (a `tern_rollout::Rollout`,
//! with the actions it has not had carried out yet) kept durably, so a
//! coordinator killed mid-rollout goes on where it was.

use crate::store::{decode, encode};
use crate::types::Approval;
use crate::{Registry, RegistryError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use tern_rollout::{Plan, Rollout, Target};

/// Which devices a rollout is for: all that match every field given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    /// Devices of this group.
    pub group: Option<String>,
    /// Devices with every one of these tags.
    pub tags: Vec<String>,
    /// Devices of this profile.
    pub profile: Option<String>,
}

/// A rollout as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRollout {
    /// Its id.
    pub id: u64,
    /// When it was started (Unix seconds).
    pub created_at: u64,
    /// Its selector.
    pub selector: Selector,
    /// Its state.
    pub rollout: Rollout,
}

fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

impl Registry {
    fn rollouts_tree(&self) -> Result<sled::Tree> {
        Ok(self.db().open_tree("rollouts")?)
    }

    /// Sets a device's group.
    pub fn set_group(&self, id: &str, group: &str) -> Result<crate::Device> {
        self.update_device_pub(id, |d| {
            d.group = group.to_owned();
            Ok(())
        })
    }

    /// Adds and removes a device's tags.
    pub fn tag(&self, id: &str, add: &[String], remove: &[String]) -> Result<crate::Device> {
        self.update_device_pub(id, |d| {
            d.tags.extend(add.iter().cloned());
            d.tags.retain(|t| !remove.contains(t));
            Ok(())
        })
    }

    /// The devices `selector` picks, as rollout targets for `model` (each
    /// with the version it has now). A group, tag or profile no device has
    /// is refused by name.
    pub fn targets(&self, selector: &Selector, model: &str) -> Result<Vec<Target>> {
        let devices = self.devices()?;
        let known = |what: &str, name: &str, has: &dyn Fn(&crate::Device) -> bool| {
            if devices.iter().any(has) {
                Ok(())
            } else {
                Err(RegistryError::Selector(format!("no device has {what} {name:?}")))
            }
        };
        if let Some(g) = &selector.group {
            known("group", g, &|d| &d.group == g)?;
        }
        if let Some(p) = &selector.profile {
            known("profile", p, &|d| &d.profile == p)?;
        }
        for t in &selector.tags {
            known("tag", t, &|d| d.tags.contains(t))?;
        }
        Ok(devices
            .into_iter()
            .filter(|d| selector.group.as_ref().is_none_or(|g| &d.group == g))
            .filter(|d| selector.profile.as_ref().is_none_or(|p| &d.profile == p))
            .filter(|d| selector.tags.iter().all(|t| d.tags.contains(t)))
            .map(|d| Target {
                device: d.id.to_string(),
                profile: d.profile.clone(),
                group: d.group.clone(),
                previous: d.desired.get(model).copied(),
            })
            .collect())
    }

    /// Plans and starts a rollout of `plan` over what `selector` picks, at
    /// `now`; refused before anything is stored (nor any device touched)
    /// if the version is not approved, the selector names what no device
    /// has, the plan or the target set is refused, or an active rollout of
    /// the model holds one of the devices.
    pub fn start_rollout(&self, selector: Selector, plan: Plan, now: u64) -> Result<StoredRollout> {
        let _one_at_a_time = self.rollout_lock().lock().expect("lock");
        let v = self.version(&plan.model, plan.version)?;
        if v.status != Approval::Approved {
            return Err(RegistryError::NotApproved {
                name: plan.model.clone(),
                version: plan.version,
                status: v.status,
            });
        }
        let targets = self.targets(&selector, &plan.model)?;
        let ids: BTreeSet<&str> = targets.iter().map(|t| t.device.as_str()).collect();
        for other in self.rollouts()?.iter().filter(|r| !r.rollout.is_finished() || r.rollout.has_actions()) {
            if other.rollout.plan().model != plan.model {
                continue;
            }
            if let Some(d) = other.rollout.waves().concat().into_iter().find(|d| ids.contains(d)) {
                return Err(RegistryError::Selector(format!(
                    "rollout {} of {} is active on {d}: abort it or let it finish first",
                    other.id, plan.model
                )));
            }
        }
        let rollout = Rollout::start(plan, targets, now).map_err(|e| RegistryError::Selector(e.to_string()))?;
        let stored = StoredRollout { id: self.db().generate_id()?, created_at: now, selector, rollout };
        self.put_rollout(&stored)?;
        Ok(stored)
    }

    /// Keeps a rollout's state (fsynced).
    pub fn put_rollout(&self, r: &StoredRollout) -> Result<()> {
        self.rollouts_tree()?.insert(key(r.id), encode(r))?;
        self.sync()
    }

    /// A rollout.
    pub fn rollout(&self, id: u64) -> Result<StoredRollout> {
        let raw = self.rollouts_tree()?.get(key(id))?.ok_or(RegistryError::UnknownRollout(id))?;
        decode(&key(id), &raw)
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<StoredRollout>> {
        let mut out = Vec::new();
        for kv in self.rollouts_tree()?.iter() {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}
