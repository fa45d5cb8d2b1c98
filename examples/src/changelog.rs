//! Changes to a provider's registry after it was generated, and the change log its node follows with
//! `Provider.Changes`.
//!
//! The generated [`Registry`] stays as it was; a [`ChangeLog`] holds every resident changed, added or deleted
//! since, and the log of those changes in order. The provider answers fetches, counts and exports from the
//! registry seen through the changes, and `Changes` from the log: a position is the number of changes before
//! it, in decimal. A log can be switched off, so that the provider answers `Changes` UNIMPLEMENTED, as one
//! without a change log does (its node then diffs full exports).
//!
//! Changes arrive from the program holding the provider ([`ChangeLog::upsert`], [`ChangeLog::delete`]) or from
//! an edits file in JSON Lines that the provider binary reads again whenever it grows ([`ChangeLog::apply_line`]):
//! `{"upsert": {"id_number": "…", "address": "…"}}` changes the named fields of a resident (or adds one, given
//! every field), `{"delete": "<id number>"}` deletes one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use fedgate_proto::v1::{ChangesRequest, ChangesResponse, RecordChange, record_change};
use tonic::Status;

use crate::registry::{Gender, MaritalStatus, Person, Registry, Resource};

/// Changes answered by one `Changes` call at most.
pub const MAX_CHANGES_PAGE: u32 = 5000;

#[derive(Debug, Default)]
struct State {
    /// Residents changed (`Some`) or deleted (`None`) since generation, by ID number.
    changed: HashMap<String, Option<Person>>,
    /// ID numbers of residents added after generation, in the order they came.
    added: Vec<String>,
    /// Every change in order: the resident's ID number and its new state.
    log: Vec<(String, Option<Person>)>,
}

/// The changes of one registry since it was generated; shared by every clone of its provider.
#[derive(Debug)]
pub struct ChangeLog {
    state: RwLock<State>,
    enabled: AtomicBool,
}

impl Default for ChangeLog {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            enabled: AtomicBool::new(true),
        }
    }
}

/// Sets one field of a resident from its record value; an unknown or unsettable field is an error naming it.
pub fn set_field(person: &mut Person, name: &str, value: &str) -> Result<(), String> {
    let slot = match name {
        "name" => &mut person.name,
        "birth_date" => &mut person.birth_date,
        "phone" => &mut person.phone,
        "address" => &mut person.address,
        "household_no" => &mut person.household_no,
        "spouse_id_number" => &mut person.spouse_id_number,
        "marriage_date" => &mut person.marriage_date,
        "registration_office" => &mut person.registration_office,
        "gender" => {
            person.gender = match value {
                "male" => Gender::Male,
                "female" => Gender::Female,
                other => return Err(format!("gender {other:?} is not male or female")),
            };
            return Ok(());
        }
        "marital_status" => {
            person.marital_status = match value {
                "unmarried" => MaritalStatus::Unmarried,
                "married" => MaritalStatus::Married,
                "divorced" => MaritalStatus::Divorced,
                "widowed" => MaritalStatus::Widowed,
                other => return Err(format!("marital status {other:?} is not known")),
            };
            return Ok(());
        }
        "id_number" => return Err("id_number names the resident and cannot change".into()),
        other => return Err(format!("{other:?} is not a registry field")),
    };
    *slot = value.to_owned();
    Ok(())
}

impl ChangeLog {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Switches the log on or off: off, `Changes` is answered UNIMPLEMENTED (changes still apply).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::SeqCst);
    }

    /// Whether `Changes` is answered.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Number of changes so far: the position of the log's end.
    pub fn len(&self) -> usize {
        self.read().log.len()
    }

    /// Whether nothing changed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores a new state of a resident (changed or added); returns the log's new end.
    pub fn upsert(&self, registry: &Registry, person: Person) -> usize {
        let mut s = self.write();
        let id = person.id_number.clone();
        let known = s.changed.contains_key(&id) || registry.find(&id).is_some();
        if !known {
            s.added.push(id.clone());
        }
        s.changed.insert(id.clone(), Some(person.clone()));
        s.log.push((id, Some(person)));
        s.log.len()
    }

    /// Deletes a resident; returns whether it existed.
    pub fn delete(&self, registry: &Registry, id_number: &str) -> bool {
        if self.current(registry, id_number).is_none() {
            return false;
        }
        let mut s = self.write();
        s.changed.insert(id_number.to_owned(), None);
        s.log.push((id_number.to_owned(), None));
        true
    }

    /// The resident as it is now: changed, deleted (`None`) or as generated.
    pub fn current(&self, registry: &Registry, id_number: &str) -> Option<Person> {
        let s = self.read();
        match s.changed.get(id_number) {
            Some(p) => p.clone(),
            None => registry.find(id_number).cloned(),
        }
    }

    /// Every resident as it is now, in registry order and then in the order they were added, from index
    /// `start` of that order (deleted ones leave their index empty): `(index, resident)` pairs until `end`.
    pub fn range(&self, registry: &Registry, start: usize, end: usize) -> Vec<(usize, Person)> {
        let s = self.read();
        let base = registry.persons();
        (start..end.min(base.len() + s.added.len()))
            .filter_map(|i| {
                let id = match base.get(i) {
                    Some(p) => p.id_number.as_str(),
                    None => s.added.get(i - base.len())?.as_str(),
                };
                let person = match s.changed.get(id) {
                    Some(p) => p.clone()?,
                    None => base.get(i)?.clone(),
                };
                Some((i, person))
            })
            .collect()
    }

    /// Indexes of [`ChangeLog::range`] in all: generated residents and added ones.
    pub fn index_len(&self, registry: &Registry) -> usize {
        registry.len() + self.read().added.len()
    }

    /// Applies one line of an edits file; an error names what is wrong with it.
    pub fn apply_line(&self, registry: &Registry, line: &str) -> Result<(), String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        if let Some(id) = value.get("delete") {
            let id = id.as_str().ok_or("delete: an ID number string")?;
            if !self.delete(registry, id) {
                return Err(format!("delete: no resident {id}"));
            }
            return Ok(());
        }
        let fields = value
            .get("upsert")
            .and_then(|u| u.as_object())
            .ok_or("a line is {\"upsert\": {…}} or {\"delete\": \"…\"}")?;
        let id = fields
            .get("id_number")
            .and_then(|v| v.as_str())
            .ok_or("upsert: id_number is required")?;
        let mut person = match self.current(registry, id) {
            Some(p) => p,
            None => Person {
                id_number: id.to_owned(),
                name: String::new(),
                gender: Gender::Male,
                birth_date: String::new(),
                phone: String::new(),
                address: String::new(),
                household_no: String::new(),
                marital_status: MaritalStatus::Unmarried,
                spouse_id_number: String::new(),
                marriage_date: String::new(),
                registration_office: String::new(),
            },
        };
        for (name, v) in fields {
            if name == "id_number" {
                continue;
            }
            let v = v
                .as_str()
                .ok_or_else(|| format!("upsert: {name} must be a string"))?;
            set_field(&mut person, name, v).map_err(|e| format!("upsert: {e}"))?;
        }
        self.upsert(registry, person);
        Ok(())
    }

    /// Answers `Changes` for `resource`: the changes after `after` (empty: none, and the log's end).
    pub fn changes(
        &self,
        resource: Resource,
        request: &ChangesRequest,
    ) -> Result<ChangesResponse, Status> {
        if !self.enabled() {
            return Err(Status::unimplemented(
                "this provider keeps no change log; export the resource instead",
            ));
        }
        let s = self.read();
        let end = s.log.len();
        if request.after.is_empty() {
            return Ok(ChangesResponse {
                changes: Vec::new(),
                next: end.to_string(),
                more: false,
            });
        }
        let after = request
            .after
            .parse::<usize>()
            .ok()
            .filter(|a| *a <= end && request.after.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "position {:?} is not one this provider issued (a decimal count of at most {end})",
                    request.after
                ))
            })?;
        let limit = match request.limit {
            0 => MAX_CHANGES_PAGE,
            n => n.min(MAX_CHANGES_PAGE),
        } as usize;
        let upto = after.saturating_add(limit).min(end);
        let changes = s.log[after..upto]
            .iter()
            .map(|(id, p)| RecordChange {
                change: Some(match p {
                    Some(p) => record_change::Change::Upsert(p.record(resource, &request.fields)),
                    None => record_change::Change::DeletedKey(id.clone()),
                }),
            })
            .collect();
        Ok(ChangesResponse {
            changes,
            next: upto.to_string(),
            more: upto < end,
        })
    }
}

/// Follows an edits file: every second, the lines added since the last look are applied; a bad line is logged
/// and skipped. Runs until the process ends.
pub async fn follow_edits(log: Arc<ChangeLog>, registry: Arc<Registry>, path: std::path::PathBuf) {
    let mut done = 0usize;
    loop {
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => {
                // Only whole lines: the last one may still be being written.
                let lines: Vec<&str> = text
                    .split_inclusive('\n')
                    .filter(|l| l.ends_with('\n'))
                    .collect();
                for (n, line) in lines.iter().enumerate().skip(done) {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match log.apply_line(&registry, line) {
                        Ok(()) => tracing::info!(line = n + 1, "edit applied"),
                        Err(e) => tracing::warn!(line = n + 1, error = %e, "edit skipped"),
                    }
                }
                done = done.max(lines.len());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "edits file not read"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
