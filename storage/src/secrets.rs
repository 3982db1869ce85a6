//! Secrets: a name, its value, where nexusd may send it (its binding,
//! opaque here) and the placeholder guests hold instead; and the VMs
//! granted each. Values leave this module only towards nexusd's egress
//! proxy: [`SecretRecord`]'s Debug and Serialize never show them.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::{Result, Storage, StorageError, now};

/// A secret as the catalog keeps it.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct SecretRecord {
    pub name: String,
    #[serde(skip)]
    pub value: String,
    /// The caller's JSON: which hosts, and how it is sent.
    pub binding: String,
    pub placeholder: String,
    pub created_at: String,
    pub updated_at: String,
    /// The VMs granted it, by name.
    pub vms: Vec<String>,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("name", &self.name)
            .field("value", &"[redacted]")
            .field("binding", &self.binding)
            .field("placeholder", &self.placeholder)
            .field("vms", &self.vms)
            .finish()
    }
}

impl Storage {
    /// Makes or replaces secret `name`. A replaced secret keeps its
    /// placeholder and its grants (guests need not learn anything new);
    /// `placeholder` is used only for a new one. Returns whether it was
    /// new.
    pub fn set_secret(
        &self,
        name: &str,
        value: &str,
        binding: &str,
        placeholder: &str,
    ) -> Result<bool> {
        let db = self.db();
        let at = now();
        let existed: bool = db.connection().query_row(
            "SELECT EXISTS (SELECT 1 FROM secrets WHERE name = ?1)",
            params![name],
            |r| r.get(0),
        )?;
        db.connection().execute(
            "INSERT INTO secrets (name, value, binding, placeholder, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT(name) DO UPDATE SET value = ?2, binding = ?3, updated_at = ?5",
            params![name, value, binding, placeholder, at],
        )?;
        Ok(!existed)
    }

    /// Every secret, values included (for nexusd's proxy alone), by name.
    pub fn secrets(&self) -> Result<Vec<SecretRecord>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(
            "SELECT name, value, binding, placeholder, created_at, updated_at,
                    (SELECT json_group_array(vm) FROM
                        (SELECT vm FROM secret_grants g WHERE g.secret = s.name ORDER BY vm))
             FROM secrets s ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let vms: String = r.get(6)?;
                Ok(SecretRecord {
                    name: r.get(0)?,
                    value: r.get(1)?,
                    binding: r.get(2)?,
                    placeholder: r.get(3)?,
                    created_at: r.get(4)?,
                    updated_at: r.get(5)?,
                    vms: serde_json::from_str(&vms).unwrap_or_default(),
                })
            })?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    /// Deletes secret `name` and its grants.
    pub fn delete_secret(&self, name: &str) -> Result<()> {
        let gone = self
            .db()
            .connection()
            .execute("DELETE FROM secrets WHERE name = ?1", params![name])?;
        if gone == 0 {
            return Err(StorageError::NoSecret(name.to_owned()));
        }
        Ok(())
    }

    /// Lets VM `vm` use secret `secret` (granting twice is no error).
    pub fn grant_secret(&self, secret: &str, vm: &str) -> Result<()> {
        self.vm_drives(vm)?;
        let db = self.db();
        let known = db
            .connection()
            .query_row(
                "SELECT 1 FROM secrets WHERE name = ?1",
                params![secret],
                |_| Ok(()),
            )
            .optional()?;
        if known.is_none() {
            return Err(StorageError::NoSecret(secret.to_owned()));
        }
        db.connection().execute(
            "INSERT INTO secret_grants (secret, vm, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(secret, vm) DO NOTHING",
            params![secret, vm, now()],
        )?;
        Ok(())
    }

    /// Takes secret `secret` from VM `vm`.
    pub fn revoke_secret(&self, secret: &str, vm: &str) -> Result<()> {
        let gone = self.db().connection().execute(
            "DELETE FROM secret_grants WHERE secret = ?1 AND vm = ?2",
            params![secret, vm],
        )?;
        if gone == 0 {
            return Err(StorageError::NoSecretGrant {
                secret: secret.to_owned(),
                vm: vm.to_owned(),
            });
        }
        Ok(())
    }
}
