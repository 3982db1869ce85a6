//! API tokens: made, listed and revoked through storage, checked from the
//! in-memory set (`identity::Tokens`), which every change replaces.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use nexus_storage::TokenRecord;

use super::{Daemon, DaemonError, Result};
use crate::identity::{self, Identity, Refusal};
use crate::policy::ADMIN_ROLE;

/// Where the first start leaves the admin's token (0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The longest expiry a token may be given (ten years).
const MAX_EXPIRY: Duration = Duration::from_secs(10 * 365 * 86_400);

impl Daemon {
    /// The identity a request's `Authorization` header proves.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> std::result::Result<Identity, Refusal> {
        self.tokens.check(authorization)
    }

    /// Resolves once token `name` is revoked or expires.
    pub async fn token_ended(&self, name: &str) {
        self.tokens.ended(name).await
    }

    pub async fn create_token(
        &self,
        name: &str,
        role: &str,
        expires_in_s: Option<u64>,
    ) -> Result<(TokenRecord, String)> {
        let expires_at = match expires_in_s {
            None => None,
            Some(0) => {
                return Err(DaemonError::Invalid(
                    "`expires_in_s` must be at least 1 (leave it out for no expiry)".into(),
                ));
            }
            Some(s) if Duration::from_secs(s) > MAX_EXPIRY => {
                return Err(DaemonError::Invalid(format!(
                    "`expires_in_s` may be at most {} (ten years), got {s}",
                    MAX_EXPIRY.as_secs()
                )));
            }
            Some(s) => Some(
                humantime::format_rfc3339_millis(SystemTime::now() + Duration::from_secs(s))
                    .to_string(),
            ),
        };
        let secret = identity::new_secret().map_err(DaemonError::Internal)?;
        let digest = identity::digest(&secret);
        let (name, role) = (name.to_owned(), role.to_owned());
        let record = self
            .blocking(move |s| s.add_token(&name, &digest, &role, expires_at.as_deref()))
            .await?;
        self.reload_tokens().await?;
        tracing::info!(token = record.name, role = record.role, "token created");
        Ok((record, secret))
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.blocking(|s| s.tokens()).await
    }

    pub async fn revoke_token(&self, name: &str) -> Result<TokenRecord> {
        let name = name.to_owned();
        let record = self.blocking(move |s| s.revoke_token(&name)).await?;
        self.reload_tokens().await?;
        tracing::info!(token = record.name, "token revoked");
        Ok(record)
    }

    /// The in-memory set from the catalog. One reload at a time: a slow
    /// one must not put back a set read before a revocation.
    pub(super) async fn reload_tokens(&self) -> Result<()> {
        let _one = self.token_reload.lock().await;
        let records = self.blocking(|s| s.tokens()).await?;
        self.tokens.replace(records);
        Ok(())
    }

    /// On the first start (no token exists) an admin token is made and
    /// written, owner-only, into the state directory.
    ///
    /// The secret is on disk (synced) before the catalog knows the token,
    /// so a failure or crash between the two never leaves an admin token
    /// nobody has: the next start tries again.
    pub(super) async fn first_admin_token(&self) -> Result<Option<PathBuf>> {
        if !self.tokens().await?.is_empty() {
            return Ok(None);
        }
        let path = self.config.state_dir.join(ADMIN_TOKEN_FILE);
        let partial = path.with_extension("token.partial");
        let secret = identity::new_secret().map_err(DaemonError::Internal)?;
        let _ = std::fs::remove_file(&partial);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .and_then(|mut f| {
                f.write_all(format!("{secret}\n").as_bytes())?;
                f.sync_all()
            });
        written.map_err(|e| {
            DaemonError::Internal(format!("could not write {}: {e}", partial.display()))
        })?;
        let digest = identity::digest(&secret);
        let added = self
            .blocking(move |s| s.add_token("admin", &digest, ADMIN_ROLE, None))
            .await;
        if let Err(e) = added {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        self.reload_tokens().await?;
        std::fs::rename(&partial, &path).map_err(|e| {
            DaemonError::Internal(format!(
                "could not move {} to {}: {e} (the admin token is in the former)",
                partial.display(),
                path.display()
            ))
        })?;
        Ok(Some(path))
    }
}
