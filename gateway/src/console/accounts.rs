//! Real-name console accounts in the node's store: Argon2id password hashes, an optional TOTP second factor,
//! lockout after repeated failures. Operators manage them (`fedgate user`); every change is audited.

use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use fedgate_proto::v1::{
    AddUserRequest, AuditOperation, ConsoleRole, ConsoleUser, ConsoleUserInfo, UserCredentials,
};
use prost::Message;
use rand::Rng;

use crate::audit::{self, AuditLog};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::ident::{Peer, Uscc};
use crate::store::{Doc, DocKind, DocQuery, Store, StoreError};

/// Characters of a generated password (from an alphabet without look-alikes).
const PASSWORD_CHARS: usize = 16;
/// The alphabet of generated passwords.
const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// Longest password accepted at sign-in: longer input is refused before it is hashed.
pub const MAX_PASSWORD_CHARS: usize = 128;
/// Longest real name.
const MAX_NAME_CHARS: usize = 64;
/// Accounts one node keeps at most.
const MAX_ACCOUNTS: usize = 10_000;

/// How sign-ins are limited.
#[derive(Debug, Clone, Copy)]
pub struct Lockout {
    /// Failed sign-ins in a row after which the account is locked.
    pub after: u32,
    /// Seconds it stays locked.
    pub secs: i64,
}

/// Why a sign-in was refused; the page says only "wrong login or password" for the first three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignInRefused {
    /// No such account.
    #[error("no account {0}")]
    Unknown(String),
    /// The password did not match.
    #[error("wrong password ({failed} failed in a row)")]
    WrongPassword {
        /// Failures in a row now.
        failed: u32,
    },
    /// The TOTP code was missing, wrong or used before.
    #[error("wrong or reused second-factor code")]
    WrongCode,
    /// The account is disabled.
    #[error("account disabled")]
    Disabled,
    /// Locked after repeated failures.
    #[error("account locked until {until} after repeated failures")]
    Locked {
        /// Seconds since the epoch.
        until: i64,
    },
}

/// The accounts of one node.
#[derive(Clone)]
pub struct Accounts {
    store: Arc<dyn Store>,
    audit: AuditLog,
    clock: Arc<dyn Clock>,
    issuer: String,
    lockout: Lockout,
    /// The agencies registered on this node, one of which a reviewer acts for.
    agencies: Arc<[Uscc]>,
    /// Sign-ins of one account run one at a time, so that concurrent guesses all count.
    serial: Arc<dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

fn argon2() -> Argon2<'static> {
    // OWASP's Argon2id minimum: 19 MiB, 2 passes, 1 lane.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The Argon2id PHC string of `password`.
pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill(&mut salt);
    argon2()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Unavailable(format!("password hash: {e}")))
}

/// Whether `password` matches the PHC string `hash`.
pub fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

fn generate_password() -> String {
    let mut rng = rand::rng();
    (0..PASSWORD_CHARS)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Checks a login: 3 to 64 ASCII letters, digits, '-', '_' or '.'.
pub fn check_login(login: &str) -> Result<()> {
    let ok = (3..=64).contains(&login.len())
        && login
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "login {:?}: 3 to 64 letters, digits, '-', '_' or '.' (an ID or staff number)",
            crate::limits::excerpt(login)
        )))
    }
}

/// Seconds of one TOTP step.
const TOTP_STEP: u64 = 30;

fn totp(secret: &[u8], issuer: &str, login: &str) -> Result<totp_rs::Totp> {
    totp_rs::Builder::new()
        .with_secret(secret.to_vec())
        .with_step_duration(TOTP_STEP)
        .with_issuer(Some(issuer.replace(':', " ")))
        .with_account_name(login.to_owned())
        .build()
        .map_err(|e| Error::Unavailable(format!("TOTP: {e}")))
}

/// An account as operators see it.
pub fn info(u: &ConsoleUser) -> ConsoleUserInfo {
    ConsoleUserInfo {
        login: u.login.clone(),
        name: u.name.clone(),
        role: u.role,
        agency_uscc: u.agency_uscc.clone(),
        disabled: u.disabled,
        totp: !u.totp_secret.is_empty(),
        locked_until: u.locked_until,
        created_at: u.created_at,
    }
}

/// The role's name in audit records and on the command line.
pub fn role_name(role: i32) -> &'static str {
    match ConsoleRole::try_from(role) {
        Ok(ConsoleRole::Operator) => "operator",
        Ok(ConsoleRole::Auditor) => "auditor",
        Ok(ConsoleRole::Reviewer) => "reviewer",
        _ => "none",
    }
}

impl Accounts {
    /// The accounts in `store` of a node with `agencies`; TOTP URIs name `issuer` (the node).
    pub fn new(
        (store, audit, clock): (Arc<dyn Store>, AuditLog, Arc<dyn Clock>),
        issuer: String,
        lockout: Lockout,
        agencies: Vec<Uscc>,
    ) -> Self {
        Self {
            store,
            audit,
            clock,
            issuer,
            lockout,
            agencies: agencies.into(),
            serial: Arc::default(),
        }
    }

    /// The account `login`, if there is one.
    pub async fn get(&self, login: &str) -> Result<Option<ConsoleUser>> {
        let Some(doc) = self.store.doc(DocKind::ConsoleUser, login).await? else {
            return Ok(None);
        };
        ConsoleUser::decode(doc.body.as_slice())
            .map(Some)
            .map_err(|e| {
                Error::Store(StoreError::Corrupt {
                    what: format!("console account {login}"),
                    error: e.to_string(),
                })
            })
    }

    async fn put(&self, u: &ConsoleUser) -> Result<()> {
        self.store
            .put_doc(&Doc {
                kind: DocKind::ConsoleUser,
                id: u.login.clone(),
                provider_uscc: u.agency_uscc.clone(),
                consumer_uscc: String::new(),
                state: u.role,
                due_at: 0,
                body: u.encode_to_vec(),
            })
            .await?;
        Ok(())
    }

    /// Every account, by login.
    pub async fn list(&self) -> Result<Vec<ConsoleUser>> {
        let q = DocQuery {
            limit: Some(MAX_ACCOUNTS as u32),
            ..Default::default()
        };
        let mut out = Vec::new();
        for d in self.store.docs(DocKind::ConsoleUser, &q).await? {
            if let Ok(u) = ConsoleUser::decode(d.body.as_slice()) {
                out.push(u);
            }
        }
        out.sort_by(|a, b| a.login.cmp(&b.login));
        Ok(out)
    }

    async fn record(&self, op: &str, u: &ConsoleUser, by: &Peer) -> Result<()> {
        let mut r = audit::event(AuditOperation::ConsoleAccount, by.to_uri());
        r.provider_uscc = u.agency_uscc.clone();
        r.detail = format!(
            "{op} console account {} ({}, {}{})",
            u.login,
            u.name,
            role_name(u.role),
            if u.agency_uscc.is_empty() {
                String::new()
            } else {
                format!(" for {}", u.agency_uscc)
            }
        );
        self.audit
            .record(r)
            .await
            .map_err(|e| Error::Unavailable(format!("audit: {e}")))?;
        Ok(())
    }

    /// Adds an account for `by` (an operator); a reviewer must act for an agency of this node.
    pub async fn add(&self, req: AddUserRequest, by: &Peer) -> Result<UserCredentials> {
        check_login(&req.login)?;
        let name = req.name.trim();
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
            return Err(Error::InvalidArgument(format!(
                "name: a real name of 1 to {MAX_NAME_CHARS} characters is required"
            )));
        }
        let role = ConsoleRole::try_from(req.role).unwrap_or_default();
        let agency = match (role, req.agency_uscc.is_empty()) {
            (ConsoleRole::Unspecified, _) => {
                return Err(Error::InvalidArgument(
                    "role: operator, auditor or reviewer".into(),
                ));
            }
            (ConsoleRole::Reviewer, true) => {
                return Err(Error::InvalidArgument(
                    "agency: a reviewer acts for one agency of this node".into(),
                ));
            }
            (ConsoleRole::Reviewer, false) => {
                let uscc: Uscc = req
                    .agency_uscc
                    .parse()
                    .map_err(|e| Error::InvalidArgument(format!("agency: {e}")))?;
                if !self.agencies.contains(&uscc) {
                    return Err(Error::FailedPrecondition(format!(
                        "agency: {uscc} is not registered on this node"
                    )));
                }
                uscc.to_string()
            }
            (_, false) => {
                return Err(Error::InvalidArgument(format!(
                    "agency: only reviewers act for an agency, not a {}",
                    role_name(role as i32)
                )));
            }
            (_, true) => String::new(),
        };
        if self.get(&req.login).await?.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "login {} is taken (fedgate user reset gives it a new password)",
                req.login
            )));
        }
        if self.list().await?.len() >= MAX_ACCOUNTS {
            return Err(Error::ResourceExhausted(format!(
                "this node keeps at most {MAX_ACCOUNTS} console accounts"
            )));
        }
        let password = generate_password();
        let mut u = ConsoleUser {
            login: req.login.clone(),
            name: name.to_owned(),
            role: role as i32,
            agency_uscc: agency,
            password_hash: hash_password(&password)?,
            created_at: self.clock.unix(),
            ..Default::default()
        };
        let totp_uri = if req.totp {
            self.new_totp(&mut u)?
        } else {
            String::new()
        };
        self.put(&u).await?;
        self.record("added", &u, by).await?;
        Ok(UserCredentials {
            user: Some(info(&u)),
            password,
            totp_uri,
        })
    }

    fn new_totp(&self, u: &mut ConsoleUser) -> Result<String> {
        let secret: [u8; 20] = rand::random();
        u.totp_secret = secret.to_vec();
        u.last_totp_step = 0;
        totp(&u.totp_secret, &self.issuer, &u.login)?
            .to_url()
            .map_err(|e| Error::Unavailable(format!("TOTP URI: {e}")))
    }

    async fn existing(&self, login: &str) -> Result<ConsoleUser> {
        check_login(login)?;
        self.get(login)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no console account {login} on this node")))
    }

    /// Disables `login` and ends its sessions.
    pub async fn disable(&self, login: &str, by: &Peer) -> Result<ConsoleUserInfo> {
        let mut u = self.existing(login).await?;
        u.disabled = true;
        u.generation = u.generation.wrapping_add(1);
        self.put(&u).await?;
        self.record("disabled", &u, by).await?;
        Ok(info(&u))
    }

    /// Gives `login` a new password (and TOTP secret when `totp`), unlocks and enables it, ends its sessions.
    pub async fn reset(&self, login: &str, totp: bool, by: &Peer) -> Result<UserCredentials> {
        let mut u = self.existing(login).await?;
        let password = generate_password();
        u.password_hash = hash_password(&password)?;
        u.disabled = false;
        u.failed_logins = 0;
        u.locked_until = 0;
        u.generation = u.generation.wrapping_add(1);
        let totp_uri = if totp {
            self.new_totp(&mut u)?
        } else {
            String::new()
        };
        self.put(&u).await?;
        self.record("reset", &u, by).await?;
        Ok(UserCredentials {
            user: Some(info(&u)),
            password,
            totp_uri,
        })
    }

    /// Checks a sign-in; failures count toward the lockout and are the caller's to audit.
    pub async fn sign_in(
        &self,
        login: &str,
        password: &str,
        code: &str,
    ) -> Result<std::result::Result<ConsoleUser, SignInRefused>> {
        if check_login(login).is_err() || password.chars().count() > MAX_PASSWORD_CHARS {
            return Ok(Err(SignInRefused::Unknown(crate::limits::excerpt(login))));
        }
        let lock = self.serial.entry(login.to_owned()).or_default().clone();
        let _one = lock.lock().await;
        let Some(mut u) = self.get(login).await? else {
            // As slow as a wrong password, so that logins cannot be told apart by timing.
            let _ = password_matches(password, DUMMY_HASH);
            return Ok(Err(SignInRefused::Unknown(login.to_owned())));
        };
        let now = self.clock.unix();
        if u.disabled {
            return Ok(Err(SignInRefused::Disabled));
        }
        if u.locked_until > now {
            return Ok(Err(SignInRefused::Locked {
                until: u.locked_until,
            }));
        }
        if !password_matches(password, &u.password_hash) {
            u.failed_logins = u.failed_logins.saturating_add(1);
            let failed = u.failed_logins;
            if failed >= self.lockout.after {
                u.locked_until = now + self.lockout.secs;
                u.failed_logins = 0;
            }
            self.put(&u).await?;
            return Ok(Err(if u.locked_until > now {
                SignInRefused::Locked {
                    until: u.locked_until,
                }
            } else {
                SignInRefused::WrongPassword { failed }
            }));
        }
        if !u.totp_secret.is_empty() {
            let t = totp(&u.totp_secret, &self.issuer, &u.login)?;
            let step = (now.max(0) as u64) / TOTP_STEP;
            // The current step or the one before (clock drift), each once.
            let matched = (0..=1u64).find_map(|back| {
                let s = step.checked_sub(back)?;
                (s > u.last_totp_step && t.generate(s * TOTP_STEP).to_string() == code.trim())
                    .then_some(s)
            });
            match matched {
                Some(s) => u.last_totp_step = s,
                None => {
                    u.failed_logins = u.failed_logins.saturating_add(1);
                    if u.failed_logins >= self.lockout.after {
                        u.locked_until = now + self.lockout.secs;
                        u.failed_logins = 0;
                    }
                    self.put(&u).await?;
                    return Ok(Err(SignInRefused::WrongCode));
                }
            }
        }
        u.failed_logins = 0;
        u.locked_until = 0;
        self.put(&u).await?;
        Ok(Ok(u))
    }

    /// Sets a new password for a signed-in user who gave the current one.
    pub async fn change_password(&self, login: &str, current: &str, new: &str) -> Result<()> {
        let mut u = self.existing(login).await?;
        if current.chars().count() > MAX_PASSWORD_CHARS
            || !password_matches(current, &u.password_hash)
        {
            return Err(Error::PermissionDenied(
                "the current password is wrong".into(),
            ));
        }
        let n = new.chars().count();
        if !(12..=MAX_PASSWORD_CHARS).contains(&n) {
            return Err(Error::InvalidArgument(format!(
                "new password: 12 to {MAX_PASSWORD_CHARS} characters"
            )));
        }
        u.password_hash = hash_password(new)?;
        self.put(&u).await?;
        Ok(())
    }
}

/// A valid Argon2id hash of no password anyone has, checked against when the login does not exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0dBt0ekbG+7ol3EkoKLuCi7BQv1k1p0j5J5wY6Ya0ek";

/// The current TOTP code of `secret` at `unix` for `login`, for tests and the demo.
pub fn totp_code(secret: &[u8], issuer: &str, login: &str, unix: u64) -> Result<String> {
    Ok(totp(secret, issuer, login)?.generate(unix).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_matches_its_own_hash_only() {
        let h = hash_password("correct horse battery").unwrap_or_default();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(password_matches("correct horse battery", &h));
        assert!(!password_matches("correct horse batterx", &h));
        assert!(!password_matches("anything", "not a hash"));
    }

    #[test]
    fn the_dummy_hash_parses_and_matches_nothing_typed() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
        assert!(!password_matches("", DUMMY_HASH));
    }

    #[test]
    fn logins_are_bounded_identifiers() {
        assert!(check_login("350102-0042").is_ok());
        assert!(check_login("ab").is_err());
        assert!(check_login("a b c").is_err());
        assert!(check_login(&"x".repeat(65)).is_err());
        assert!(check_login("张三").is_err());
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), PASSWORD_CHARS);
        assert_ne!(a, b);
    }
}
