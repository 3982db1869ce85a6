//! Roles and grants. A role's spec is the caller's JSON (nexusd reads
//! tool patterns, VM scope and quotas from it); storage keeps it whole.
//! A grant lets an identity reach a VM it does not own, and goes with
//! the VM (foreign key, cascade).

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::{Result, Storage, StorageError, names::validate_name, now};

/// A role as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleRecord {
    pub name: String,
    /// JSON, the caller's.
    pub spec: String,
    pub created_at: String,
    pub updated_at: String,
}

/// An identity's access to a VM it does not own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantRecord {
    pub vm: String,
    pub identity: String,
    pub created_at: String,
}

impl Storage {
    /// Creates role `name` or replaces its spec; true if it is new.
    pub fn put_role(&self, name: &str, spec: &str) -> Result<bool> {
        validate_name("role", name)?;
        let at = now();
        let db = self.db();
        let existed: bool = db.connection().query_row(
            "SELECT EXISTS (SELECT 1 FROM roles WHERE name = ?1)",
            params![name],
            |r| r.get(0),
        )?;
        db.connection().execute(
            "INSERT INTO roles (name, spec, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
            params![name, spec, at],
        )?;
        Ok(!existed)
    }

    /// Every role, by name.
    pub fn roles(&self) -> Result<Vec<RoleRecord>> {
        let db = self.db();
        let mut stmt = db
            .connection()
            .prepare("SELECT name, spec, created_at, updated_at FROM roles ORDER BY name")?;
        let rows = stmt
            .query_map([], role)?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }

    pub fn role(&self, name: &str) -> Result<Option<RoleRecord>> {
        Ok(self
            .db()
            .connection()
            .query_row(
                "SELECT name, spec, created_at, updated_at FROM roles WHERE name = ?1",
                params![name],
                role,
            )
            .optional()?)
    }

    /// Deletes role `name` unless a token that is not revoked still has
    /// it: then the error names those tokens. One transaction, so no
    /// token can take the role in between.
    pub fn delete_role(&self, name: &str) -> Result<std::result::Result<(), Vec<String>>> {
        let mut db = self.db();
        let tx = db.connection_mut().transaction()?;
        let users: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT name FROM tokens WHERE role = ?1 AND revoked_at IS NULL ORDER BY name",
            )?;
            stmt.query_map(params![name], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        if !users.is_empty() {
            return Ok(Err(users));
        }
        if tx.execute("DELETE FROM roles WHERE name = ?1", params![name])? == 0 {
            return Err(StorageError::NoRole(name.to_owned()));
        }
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Lets `identity` reach VM `vm`; granting twice is no error.
    pub fn grant_vm(&self, vm: &str, identity: &str) -> Result<GrantRecord> {
        self.vm_drives(vm)?;
        let db = self.db();
        db.connection().execute(
            "INSERT INTO grants (vm, identity, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(vm, identity) DO NOTHING",
            params![vm, identity, now()],
        )?;
        Ok(db.connection().query_row(
            "SELECT vm, identity, created_at FROM grants WHERE vm = ?1 AND identity = ?2",
            params![vm, identity],
            grant,
        )?)
    }

    pub fn revoke_grant(&self, vm: &str, identity: &str) -> Result<()> {
        let gone = self.db().connection().execute(
            "DELETE FROM grants WHERE vm = ?1 AND identity = ?2",
            params![vm, identity],
        )?;
        if gone == 0 {
            return Err(StorageError::NoGrant {
                vm: vm.to_owned(),
                identity: identity.to_owned(),
            });
        }
        Ok(())
    }

    /// Every grant, by VM then identity.
    pub fn grants(&self) -> Result<Vec<GrantRecord>> {
        let db = self.db();
        let mut stmt = db
            .connection()
            .prepare("SELECT vm, identity, created_at FROM grants ORDER BY vm, identity")?;
        let rows = stmt
            .query_map([], grant)?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }
}

fn role(r: &rusqlite::Row<'_>) -> rusqlite::Result<RoleRecord> {
    Ok(RoleRecord {
        name: r.get(0)?,
        spec: r.get(1)?,
        created_at: r.get(2)?,
        updated_at: r.get(3)?,
    })
}

fn grant(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRecord> {
    Ok(GrantRecord {
        vm: r.get(0)?,
        identity: r.get(1)?,
        created_at: r.get(2)?,
    })
}
