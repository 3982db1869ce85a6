//! Who is calling. Over TCP HTTP, a bearer token (`nexus_` and 64 hex
//! digits, made here, kept only as its SHA-256 digest); over the admin
//! socket and through `nexusd stdio`, the peer's uid (SO_PEERCRED). Every
//! tool handler reads the caller's [`Identity`]; roles decide what it may
//! do (`crate::policy`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use nexus_storage::TokenRecord;
use sha2::{Digest, Sha256};

use crate::policy::{ADMIN_ROLE, USER_ROLE};

/// Every token starts so (secret scanners and people recognise it).
pub const TOKEN_PREFIX: &str = "nexus_";

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// A bearer token, by name.
    Token(String),
    /// A local user on the admin socket or a stdio bridge.
    Uid(u32),
    /// Nothing: HTTP authentication is off in the configuration.
    None,
    /// A connection a VM's guest opened toward the host, by VM name.
    Vm(String),
}

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `token:NAME`, `uid:N`, `anonymous` or `vm:NAME`.
    pub name: String,
    /// The name of its role (`crate::policy`).
    pub role: String,
    pub proof: Proof,
}

impl Identity {
    /// A local user: root, nexusd's own user and the configured admin
    /// uids are admins.
    pub fn local(uid: u32, admin_uids: &[u32]) -> Self {
        let own = nix::unistd::geteuid().as_raw();
        Self {
            name: format!("uid:{uid}"),
            role: if uid == 0 || uid == own || admin_uids.contains(&uid) {
                ADMIN_ROLE
            } else {
                USER_ROLE
            }
            .to_owned(),
            proof: Proof::Uid(uid),
        }
    }

    /// Who calls when HTTP authentication is configured off: a user (no
    /// token management: tokens made so would outlive the setting).
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: USER_ROLE.into(),
            proof: Proof::None,
        }
    }

    /// A VM's guest, acting with `role` (its owner's).
    pub fn of_vm(vm: &str, role: String) -> Self {
        Self {
            name: format!("vm:{vm}"),
            role,
            proof: Proof::Vm(vm.to_owned()),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == ADMIN_ROLE
    }

    /// Refuses unless the caller is an admin; `what` names the action.
    pub fn require_admin(&self, what: &str) -> Result<(), String> {
        if self.is_admin() {
            return Ok(());
        }
        Err(format!(
            "{what} needs the admin role; the caller ({}) has role {:?}",
            self.name, self.role
        ))
    }
}

/// Why a request's token was refused (the HTTP answer is the same 401
/// for all; the log says which).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token")]
    Missing,
    #[error("a token nexusd does not know")]
    Unknown,
    #[error("token {0:?} was revoked")]
    Revoked(String),
    #[error("token {0:?} has expired")]
    Expired(String),
}

/// Where a token stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Active { expires: Option<SystemTime> },
    Revoked,
    Expired,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Active { .. } => "active",
            Standing::Revoked => "revoked",
            Standing::Expired => "expired",
        }
    }
}

/// Where `record` stands now; an expiry nexusd cannot read counts as past.
pub fn standing(record: &TokenRecord) -> Standing {
    if record.revoked_at.is_some() {
        return Standing::Revoked;
    }
    match &record.expires_at {
        None => Standing::Active { expires: None },
        Some(at) => match humantime::parse_rfc3339(at) {
            Ok(at) if at > SystemTime::now() => Standing::Active { expires: Some(at) },
            _ => Standing::Expired,
        },
    }
}

/// A new secret: the prefix and 32 random bytes in hex.
pub fn new_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a token: {e}"))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// What the catalog keeps of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The known tokens by digest, as the catalog has them; nexusd replaces
/// the whole set whenever one is made or revoked.
#[derive(Default)]
pub struct Tokens {
    by_digest: RwLock<HashMap<[u8; 32], TokenRecord>>,
    /// Bumped at every replacement, for what waits on a token's end.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Tokens {
    pub fn replace(&self, records: Vec<TokenRecord>) {
        let map = records
            .into_iter()
            .filter_map(|r| Some((<[u8; 32]>::try_from(r.digest.as_slice()).ok()?, r)))
            .collect();
        *self.by_digest.write().unwrap_or_else(|e| e.into_inner()) = map;
        self.generation.send_modify(|g| *g += 1);
    }

    /// Token `name`'s role, if the token exists.
    pub fn role_of(&self, name: &str) -> Option<String> {
        let map = self.by_digest.read().unwrap_or_else(|e| e.into_inner());
        let record = map.values().find(|r| r.name == name)?;
        Some(record.role.clone())
    }

    /// Token `name`'s expiry if it is valid now; None if it is not.
    fn valid_until(&self, name: &str) -> Option<Option<SystemTime>> {
        let map = self.by_digest.read().unwrap_or_else(|e| e.into_inner());
        match standing(map.values().find(|r| r.name == name)?) {
            Standing::Active { expires } => Some(expires),
            Standing::Revoked | Standing::Expired => None,
        }
    }

    /// Resolves once token `name` is revoked or expires: a response
    /// stream it opened (events, a long call) ends then.
    pub async fn ended(&self, name: &str) {
        let mut changes = self.generation.subscribe();
        loop {
            let Some(until) = self.valid_until(name) else {
                return;
            };
            let expiry = until.map_or(Duration::from_secs(86_400), |at| {
                at.duration_since(SystemTime::now()).unwrap_or_default()
            });
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                () = tokio::time::sleep(expiry) => {}
            }
        }
    }

    /// The identity a request's `Authorization` header value proves.
    /// A lookup by digest: the secret is never compared byte by byte.
    pub fn check(&self, authorization: Option<&str>) -> Result<Identity, Refusal> {
        let secret = authorization
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Missing)?;
        let map = self.by_digest.read().unwrap_or_else(|e| e.into_inner());
        let record = map.get(&digest(secret)).ok_or(Refusal::Unknown)?;
        match standing(record) {
            Standing::Revoked => return Err(Refusal::Revoked(record.name.clone())),
            Standing::Expired => return Err(Refusal::Expired(record.name.clone())),
            Standing::Active { .. } => {}
        }
        Ok(Identity {
            name: format!("token:{}", record.name),
            role: record.role.clone(),
            proof: Proof::Token(record.name.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, secret: &str, role: &str) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            digest: digest(secret).to_vec(),
            role: role.into(),
            created_at: "2026-11-29T00:00:00Z".into(),
            expires_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn a_token_proves_its_identity_until_revoked_or_expired() {
        let tokens = Tokens::default();
        let (a, b, c) = (
            new_secret().unwrap(),
            new_secret().unwrap(),
            new_secret().unwrap(),
        );
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_ne!(a, b);
        let mut revoked = record("old", &b, "admin");
        revoked.revoked_at = Some("2026-11-29T01:00:00Z".into());
        let mut expired = record("late", &c, "admin");
        expired.expires_at = Some("2026-01-01T00:00:00Z".into());
        tokens.replace(vec![record("ci", &a, "user"), revoked, expired]);

        let who = tokens.check(Some(&format!("Bearer {a}"))).unwrap();
        assert_eq!(who.name, "token:ci");
        assert_eq!(who.role, "user");
        assert_eq!(
            tokens.check(Some(&format!("bearer  {a} "))).unwrap().name,
            "token:ci"
        );
        assert_eq!(tokens.check(None), Err(Refusal::Missing));
        assert_eq!(tokens.check(Some("Basic abc")), Err(Refusal::Missing));
        assert_eq!(tokens.check(Some("Bearer ")), Err(Refusal::Missing));
        assert_eq!(
            tokens.check(Some("Bearer nexus_0000")),
            Err(Refusal::Unknown)
        );
        assert_eq!(
            tokens.check(Some(&format!("Bearer {b}"))),
            Err(Refusal::Revoked("old".into()))
        );
        assert_eq!(
            tokens.check(Some(&format!("Bearer {c}"))),
            Err(Refusal::Expired("late".into()))
        );
    }

    #[test]
    fn root_and_configured_uids_are_admins() {
        assert!(Identity::local(0, &[]).is_admin());
        assert!(Identity::local(1000, &[1000]).is_admin());
        let user = Identity::local(1001, &[1000]);
        assert_eq!(user.role, USER_ROLE);
        let err = user.require_admin("create_token").unwrap_err();
        assert!(err.contains("uid:1001") && err.contains("admin"), "{err}");
    }
}
