//! The SQLite catalog: WAL mode, foreign keys on, and migrations embedded
//! in the binary, applied in order at open and recorded in `user_version`.
//! Migrations are forward-only: a catalog newer than this binary is refused
//! rather than guessed at.

use std::path::Path;

use rusqlite::Connection;

/// Each entry migrates from schema version `index` to `index + 1`. Append
/// only; never edit a released migration.
const MIGRATIONS: &[&str] = &[
    // 1: images, the first thing the catalog records.
    "CREATE TABLE images (
        name        TEXT PRIMARY KEY,
        path        TEXT NOT NULL,
        manifest    TEXT NOT NULL,
        imported_at TEXT NOT NULL
    ) STRICT;",
    // 2: VMs' drives and their snapshots. `op` names a multi-step operation
    // under way; a row with one after a crash is finished or undone by the
    // reconciliation at open.
    "ALTER TABLE images ADD COLUMN op TEXT;
     CREATE TABLE vms (
        name          TEXT PRIMARY KEY,
        image         TEXT NOT NULL REFERENCES images(name),
        created_at    TEXT NOT NULL,
        base_snapshot TEXT,
        op            TEXT
     ) STRICT;
     CREATE TABLE drives (
        vm         TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        path       TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        PRIMARY KEY (vm, name)
     ) STRICT;
     CREATE TABLE snapshots (
        vm         TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        drive      TEXT NOT NULL,
        path       TEXT NOT NULL,
        created_at TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        parent     TEXT,
        op         TEXT,
        PRIMARY KEY (vm, name)
     ) STRICT;",
    // 3: what the caller wants kept with a VM (nexusd: vCPUs, memory),
    // opaque to storage.
    "ALTER TABLE vms ADD COLUMN config TEXT NOT NULL DEFAULT '{}';",
    // 4: API tokens, kept only as digests (the caller hashes).
    "CREATE TABLE tokens (
        name       TEXT PRIMARY KEY,
        digest     BLOB NOT NULL UNIQUE,
        role       TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT,
        revoked_at TEXT
     ) STRICT;",
    // 5: who a VM belongs to (nexusd's identity name; NULL: no one, so
    // only admins reach it). Its snapshots are its owner's.
    "ALTER TABLE vms ADD COLUMN owner TEXT;",
    // 6: the audit trail: one row per tool call, written only by nexusd.
    "CREATE TABLE audit (
        id         INTEGER PRIMARY KEY,
        at         TEXT NOT NULL,
        identity   TEXT NOT NULL,
        transport  TEXT NOT NULL,
        tool       TEXT NOT NULL,
        vm         TEXT,
        arguments  TEXT NOT NULL,
        outcome    TEXT NOT NULL,
        duration_us INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX audit_identity ON audit (identity, id);
     CREATE INDEX audit_vm ON audit (vm, id);",
    // 7: roles (what an identity may do; the spec is nexusd's JSON,
    // opaque here) and grants (an identity may reach another's VM; gone
    // with the VM).
    "CREATE TABLE roles (
        name       TEXT PRIMARY KEY,
        spec       TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
     ) STRICT;
     CREATE TABLE grants (
        vm         TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        identity   TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (vm, identity)
     ) STRICT;",
    // 8: image versions. `images` holds each name's current version (its
    // content digest and where it came from); a VM records the version
    // it was made from, and a replaced version some VM still boots from
    // stays in `image_versions` until the last such VM is gone.
    "ALTER TABLE images ADD COLUMN digest TEXT;
     ALTER TABLE images ADD COLUMN source TEXT NOT NULL DEFAULT 'directory';
     ALTER TABLE vms ADD COLUMN image_digest TEXT;
     CREATE TABLE image_versions (
        name        TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
        digest      TEXT NOT NULL,
        path        TEXT NOT NULL,
        manifest    TEXT NOT NULL,
        source      TEXT NOT NULL,
        imported_at TEXT NOT NULL,
        PRIMARY KEY (name, digest)
     ) STRICT;",
    // 9: secrets (values only ever read by nexusd's egress proxy; the
    // binding is nexusd's JSON, opaque here; the placeholder is what a
    // guest holds instead) and which VMs may use each (gone with either).
    "CREATE TABLE secrets (
        name        TEXT PRIMARY KEY,
        value       TEXT NOT NULL,
        binding     TEXT NOT NULL,
        placeholder TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
     ) STRICT;
     CREATE TABLE secret_grants (
        secret     TEXT NOT NULL REFERENCES secrets(name) ON DELETE CASCADE,
        vm         TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        created_at TEXT NOT NULL,
        PRIMARY KEY (secret, vm)
     ) STRICT;",
];

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("could not open the catalog at {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "catalog schema version {found} is newer than this nexusd knows ({known}): upgrade nexusd"
    )]
    TooNew { found: i64, known: i64 },
    #[error("catalog migration to version {version} failed")]
    Migrate {
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog query failed")]
    Query(#[from] rusqlite::Error),
}

pub struct Catalog {
    conn: Connection,
}

impl Catalog {
    /// Opens (creating if needed) and migrates the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let conn = Connection::open(path).map_err(|source| CatalogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::init(conn)
    }

    fn init(mut conn: Connection) -> Result<Self, CatalogError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn, MIGRATIONS)?;
        Ok(Self { conn })
    }

    pub fn schema_version(&self) -> Result<i64, CatalogError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// Applies the migrations past the catalog's version, each in its own
/// transaction together with the version bump, so a crash leaves the
/// catalog at one version or the next, never between.
fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), CatalogError> {
    let known = migrations.len() as i64;
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > known {
        return Err(CatalogError::TooNew {
            found: current,
            known,
        });
    }
    for (index, sql) in migrations.iter().enumerate().skip(current as usize) {
        let version = index + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .and_then(|()| tx.pragma_update(None, "user_version", version as i64))
            .map_err(|source| CatalogError::Migrate { version, source })?;
        tx.commit()?;
        tracing::info!(version, "catalog migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_in_wal_with_foreign_keys_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let catalog = Catalog::open(&path).unwrap();
        assert_eq!(catalog.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let mode: String = catalog
            .connection()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = catalog
            .connection()
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        drop(catalog);
        assert_eq!(
            Catalog::open(&path).unwrap().schema_version().unwrap(),
            MIGRATIONS.len() as i64
        );
    }

    #[test]
    fn later_migrations_apply_on_top_of_an_existing_catalog() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, &MIGRATIONS[..1]).unwrap();
        conn.execute(
            "INSERT INTO images VALUES ('default', '/x', '{}', 'now')",
            [],
        )
        .unwrap();
        let next = [MIGRATIONS[0], "ALTER TABLE images ADD COLUMN note TEXT;"];
        migrate(&mut conn, &next).unwrap();
        let note: Option<String> = conn
            .query_row("SELECT note FROM images WHERE name = 'default'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(note, None, "data survives a migration");
    }

    #[test]
    fn migration_2_applies_to_a_version_1_catalog_with_images() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        migrate(&mut conn, &MIGRATIONS[..1]).unwrap();
        conn.execute(
            "INSERT INTO images VALUES ('default', '/p', '{}', 'then')",
            [],
        )
        .unwrap();
        migrate(&mut conn, MIGRATIONS).unwrap();
        let op: Option<String> = conn
            .query_row("SELECT op FROM images WHERE name = 'default'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(op, None);
        conn.execute(
            "INSERT INTO vms (name, image, created_at) VALUES ('vm1', 'default', 'now')",
            [],
        )
        .unwrap();
        let err = conn
            .execute(
                "INSERT INTO vms (name, image, created_at) VALUES ('vm2', 'nope', 'now')",
                [],
            )
            .unwrap_err();
        assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    }

    #[test]
    fn migration_3_gives_existing_vms_an_empty_config() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, &MIGRATIONS[..2]).unwrap();
        conn.execute("INSERT INTO images (name, path, manifest, imported_at) VALUES ('i', '/p', '{}', 'then')", [])
            .unwrap();
        conn.execute(
            "INSERT INTO vms (name, image, created_at) VALUES ('vm1', 'i', 'then')",
            [],
        )
        .unwrap();
        migrate(&mut conn, MIGRATIONS).unwrap();
        let config: String = conn
            .query_row("SELECT config FROM vms WHERE name = 'vm1'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(config, "{}");
    }

    #[test]
    fn a_failed_migration_leaves_the_previous_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        let broken = [MIGRATIONS[0], "CREATE TABLE t (x); NOT SQL;"];
        let err = migrate(&mut conn, &broken).unwrap_err();
        assert!(
            err.to_string().contains("migration to version 2 failed"),
            "{err}"
        );
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1);
        let t_exists: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 't'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(t_exists, 0, "the failed migration was rolled back whole");
    }

    #[test]
    fn a_newer_catalog_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        let err = migrate(&mut conn, MIGRATIONS).unwrap_err();
        assert!(
            err.to_string().contains("newer than this nexusd knows"),
            "{err}"
        );
    }
}
