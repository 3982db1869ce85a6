//! API tokens: a name, a role and the digest of the secret (the secret
//! itself is never stored). The caller makes secrets and digests them.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::{Result, Storage, StorageError, names::validate_name, now};

/// A token as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub name: String,
    #[serde(skip)]
    pub digest: Vec<u8>,
    pub role: String,
    pub created_at: String,
    /// RFC 3339; past it the token is refused.
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
}

const COLUMNS: &str = "name, digest, role, created_at, expires_at, revoked_at";

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        name: r.get(0)?,
        digest: r.get(1)?,
        role: r.get(2)?,
        created_at: r.get(3)?,
        expires_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

impl Storage {
    /// Records a new token of an existing role. Names are never reused,
    /// revoked or not, so that the audit trail of a name means one token.
    pub fn add_token(
        &self,
        name: &str,
        digest: &[u8],
        role: &str,
        expires_at: Option<&str>,
    ) -> Result<TokenRecord> {
        validate_name("token", name)?;
        // One lock for both: a role deleted meanwhile is not taken.
        let db = self.db();
        let role_known: bool = db.connection().query_row(
            "SELECT EXISTS (SELECT 1 FROM roles WHERE name = ?1)",
            params![role],
            |r| r.get(0),
        )?;
        if !role_known {
            return Err(StorageError::NoRole(role.to_owned()));
        }
        let added = db.connection().execute(
            "INSERT INTO tokens (name, digest, role, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(name) DO NOTHING",
            params![name, digest, role, now(), expires_at],
        )?;
        drop(db);
        if added == 0 {
            return Err(StorageError::TokenExists(name.to_owned()));
        }
        self.token(name)?
            .ok_or_else(|| StorageError::NoToken(name.to_owned()))
    }

    pub fn token(&self, name: &str) -> Result<Option<TokenRecord>> {
        Ok(self
            .db()
            .connection()
            .query_row(
                &format!("SELECT {COLUMNS} FROM tokens WHERE name = ?1"),
                params![name],
                record,
            )
            .optional()?)
    }

    /// Every token, revoked and expired ones included, by name.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let db = self.db();
        let mut stmt = db
            .connection()
            .prepare(&format!("SELECT {COLUMNS} FROM tokens ORDER BY name"))?;
        let rows = stmt
            .query_map([], record)?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    /// Marks a token revoked (at once and for good); revoking twice is
    /// no error.
    pub fn revoke_token(&self, name: &str) -> Result<TokenRecord> {
        let changed = self.db().connection().execute(
            "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE name = ?1",
            params![name, now()],
        )?;
        if changed == 0 {
            return Err(StorageError::NoToken(name.to_owned()));
        }
        self.token(name)?
            .ok_or_else(|| StorageError::NoToken(name.to_owned()))
    }
}
