//! `read_audit`: the admin's view of the trail.

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NexusTools, done};

/// The most records one call returns.
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadAuditParams {
    /// Only calls by this identity (`token:NAME`, `uid:N`, `anonymous`).
    #[serde(default)]
    pub identity: Option<String>,
    /// Only calls on this VM.
    #[serde(default)]
    pub vm: Option<String>,
    /// Only calls at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<String>,
    /// Only records older than this id (to page back).
    #[serde(default)]
    pub before_id: Option<i64>,
    /// How many, newest first (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub identity: String,
    pub transport: String,
    pub tool: String,
    pub vm: Option<String>,
    /// The arguments, secret-looking values redacted, long ones cut.
    pub arguments: String,
    /// "ok", "tool_error", "denied" or "protocol_error".
    pub outcome: String,
    pub duration_us: i64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditList {
    pub records: Vec<AuditEntry>,
}

#[tool_router(router = audit_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "Read the audit trail (admin only): every tool call, allowed or denied, newest first, by identity, VM and time.",
        output_schema = schema_for_output::<AuditList>()
    )]
    async fn read_audit(
        &self,
        Parameters(p): Parameters<ReadAuditParams>,
    ) -> Result<CallToolResult, String> {
        let limit = p.limit.unwrap_or(100);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(format!(
                "`limit` must be between 1 and {MAX_LIMIT}, got {limit}"
            ));
        }
        let records: Vec<AuditEntry> = self
            .daemon
            .read_audit(nexus_storage::AuditQuery {
                identity: p.identity,
                vm: p.vm,
                since: p.since,
                before_id: p.before_id,
                limit,
            })
            .await
            .map_err(super::errors::shown)?
            .into_iter()
            .map(|r| AuditEntry {
                id: r.id,
                at: r.at,
                identity: r.identity,
                transport: r.transport,
                tool: r.tool,
                vm: r.vm,
                arguments: r.arguments,
                outcome: r.outcome,
                duration_us: r.duration_us,
            })
            .collect();
        let text = records
            .iter()
            .map(|r| {
                format!(
                    "#{} {} {} ({}) {}{} -> {}",
                    r.id,
                    r.at,
                    r.identity,
                    r.transport,
                    r.tool,
                    r.vm.as_deref()
                        .map(|v| format!(" on {v}"))
                        .unwrap_or_default(),
                    r.outcome
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        done(&AuditList { records }, text)
    }
}
