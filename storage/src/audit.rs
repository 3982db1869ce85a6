//! The audit trail: one row per tool call, as nexusd saw it (who, how,
//! which tool and VM, the arguments with secrets taken out, the outcome,
//! how long), kept up to a number of rows.

use rusqlite::params;
use serde::Serialize;

use crate::{Result, Storage};

/// One call, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Increasing; 0 for a record not yet written.
    pub id: i64,
    /// RFC 3339, milliseconds.
    pub at: String,
    pub identity: String,
    /// "http", "admin-socket" or "stdio".
    pub transport: String,
    pub tool: String,
    pub vm: Option<String>,
    /// The arguments, secrets redacted and long values cut (JSON).
    pub arguments: String,
    /// "ok", "tool_error", "denied" or "protocol_error".
    pub outcome: String,
    pub duration_us: i64,
}

/// Which records to read, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub identity: Option<String>,
    pub vm: Option<String>,
    /// RFC 3339: records at or after it.
    pub since: Option<String>,
    /// Records with an id below it (paging back).
    pub before_id: Option<i64>,
    pub limit: u32,
}

impl Storage {
    /// Appends records in one transaction, then drops the oldest beyond
    /// `keep` rows.
    pub fn append_audit(&self, records: &[AuditRecord], keep: u64) -> Result<()> {
        let mut db = self.db();
        let tx = db.connection_mut().transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO audit (at, identity, transport, tool, vm, arguments, outcome, duration_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for r in records {
                insert.execute(params![
                    r.at,
                    r.identity,
                    r.transport,
                    r.tool,
                    r.vm,
                    r.arguments,
                    r.outcome,
                    r.duration_us
                ])?;
            }
        }
        tx.execute(
            "DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?1",
            params![keep as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records matching `query`, newest first.
    pub fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let db = self.db();
        let mut stmt = db.connection().prepare(
            "SELECT id, at, identity, transport, tool, vm, arguments, outcome, duration_us
             FROM audit
             WHERE (?1 IS NULL OR identity = ?1) AND (?2 IS NULL OR vm = ?2)
               AND (?3 IS NULL OR at >= ?3) AND (?4 IS NULL OR id < ?4)
             ORDER BY id DESC LIMIT ?5",
        )?;
        let rows = stmt
            .query_map(
                params![
                    query.identity,
                    query.vm,
                    query.since,
                    query.before_id,
                    query.limit
                ],
                |r| {
                    Ok(AuditRecord {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        identity: r.get(2)?,
                        transport: r.get(3)?,
                        tool: r.get(4)?,
                        vm: r.get(5)?,
                        arguments: r.get(6)?,
                        outcome: r.get(7)?,
                        duration_us: r.get(8)?,
                    })
                },
            )?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
    }
}
