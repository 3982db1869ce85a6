//! Roles and grants, the admin's: `set_role`, `list_roles`,
//! `delete_role`, `grant_vm`, `revoke_grant`, `list_grants`.

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::errors::shown;
use super::{NexusTools, done};
use crate::daemon::{QuotaConfig, RoleView};
use crate::policy::{RoleSpec, VmScope};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRoleParams {
    /// The role's name (lowercase letters, digits and `-`, at most 63).
    pub name: String,
    /// Glob patterns (`*`, `?`, `[abc]`) over tool names: a tool is
    /// allowed if a pattern matches it and no `!pattern` does. A VM's
    /// own tools are matched as `vm_TOOL` (`vm_exec`, `vm_*`) on either
    /// surface. Identity administration is the admin role's alone.
    pub tools: Vec<String>,
    /// Which VMs: `own` (its own and granted ones), `granted` (only
    /// granted ones; it makes no VM) or `all`.
    pub vms: VmScope,
    /// Limits for each identity of the role; each unset one `[quota]`'s.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// Where the role's VMs may connect (egress proxy): host patterns
    /// such as `pypi.org`, `*.github.com`, `api.example.com:8443`, `*:*`;
    /// without a port, 80 and 443. Default `["*"]` (the public web);
    /// `[]` for no network. The host's networks are never reachable.
    #[serde(default)]
    pub egress: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteRoleParams {
    /// The role's name (list_roles shows them).
    pub role: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantParams {
    /// The VM.
    pub vm: String,
    /// Who may reach it: `token:NAME`, `uid:N` or `anonymous`.
    pub identity: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListGrantsParams {
    /// Only this VM's grants.
    #[serde(default)]
    pub vm: Option<String>,
    /// Only this identity's grants.
    #[serde(default)]
    pub identity: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SetRoleResult {
    #[serde(flatten)]
    pub role: RoleView,
    /// Whether the role is new (else it was replaced).
    pub created: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RoleList {
    pub roles: Vec<RoleView>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Grant {
    pub vm: String,
    pub identity: String,
    pub created_at: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GrantList {
    pub grants: Vec<Grant>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Removed {
    pub removed: String,
}

fn grant(g: nexus_storage::GrantRecord) -> Grant {
    Grant {
        vm: g.vm,
        identity: g.identity,
        created_at: g.created_at,
    }
}

#[tool_router(router = role_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "Create a role or replace what it allows (admin only): tool patterns (globs over tool names; a VM's own tools as vm_TOOL; `!pattern` takes away), which VMs (own, granted, all) and quotas. Tokens of the role follow the new rules at once. The admin role is built in.",
        output_schema = schema_for_output::<SetRoleResult>()
    )]
    async fn set_role(
        &self,
        Parameters(p): Parameters<SetRoleParams>,
    ) -> Result<CallToolResult, String> {
        let spec = RoleSpec {
            tools: p.tools,
            vms: p.vms,
            quota: p.quota,
            egress: p.egress.unwrap_or_else(|| vec!["*".into()]),
        };
        let (role, created) = self.daemon.set_role(&p.name, spec).await.map_err(shown)?;
        let text = format!(
            "role {:?} {}: tools {}; VMs: {:?}",
            role.name,
            if created { "created" } else { "replaced" },
            role.spec.tools.join(", "),
            role.spec.vms
        );
        done(&SetRoleResult { role, created }, text)
    }

    #[tool(
        description = "List the roles (admin only): tool patterns, VM scope, quotas.",
        output_schema = schema_for_output::<RoleList>()
    )]
    async fn list_roles(&self) -> Result<CallToolResult, String> {
        let roles = self.daemon.list_roles().await.map_err(shown)?;
        let text = roles
            .iter()
            .map(|r| format!("{}: {} ({:?})", r.name, r.spec.tools.join(", "), r.spec.vms))
            .collect::<Vec<_>>()
            .join("\n");
        done(&RoleList { roles }, text)
    }

    #[tool(
        description = "Delete a role (admin only); refused while a token that is not revoked has it.",
        output_schema = schema_for_output::<Removed>()
    )]
    async fn delete_role(
        &self,
        Parameters(p): Parameters<DeleteRoleParams>,
    ) -> Result<CallToolResult, String> {
        self.daemon.delete_role(&p.role).await.map_err(shown)?;
        let text = format!("role {:?} deleted", p.role);
        done(&Removed { removed: p.role }, text)
    }

    #[tool(
        description = "Let an identity reach a VM it does not own (admin only): its tools, snapshots and events, as far as its role's tool patterns allow. Grants go with the VM; a fork does not inherit them.",
        output_schema = schema_for_output::<Grant>()
    )]
    async fn grant_vm(
        &self,
        Parameters(p): Parameters<GrantParams>,
    ) -> Result<CallToolResult, String> {
        let g = self
            .daemon
            .grant_vm(&p.vm, &p.identity)
            .await
            .map_err(shown)?;
        let text = format!("{} may now reach VM {}", g.identity, g.vm);
        done(&grant(g), text)
    }

    #[tool(
        description = "Take back a grant (admin only): the identity no longer reaches the VM.",
        output_schema = schema_for_output::<Removed>()
    )]
    async fn revoke_grant(
        &self,
        Parameters(p): Parameters<GrantParams>,
    ) -> Result<CallToolResult, String> {
        self.daemon
            .revoke_grant(&p.vm, &p.identity)
            .await
            .map_err(shown)?;
        let text = format!("{} no longer reaches VM {}", p.identity, p.vm);
        done(
            &Removed {
                removed: format!("{} on {}", p.identity, p.vm),
            },
            text,
        )
    }

    #[tool(
        description = "List grants (admin only), by VM or identity.",
        output_schema = schema_for_output::<GrantList>()
    )]
    async fn list_grants(
        &self,
        Parameters(p): Parameters<ListGrantsParams>,
    ) -> Result<CallToolResult, String> {
        let grants: Vec<Grant> = self
            .daemon
            .list_grants(p.vm.as_deref(), p.identity.as_deref())
            .await
            .map_err(shown)?
            .into_iter()
            .map(grant)
            .collect();
        let text = if grants.is_empty() {
            "no grants".to_owned()
        } else {
            grants
                .iter()
                .map(|g| format!("{} on {}", g.identity, g.vm))
                .collect::<Vec<_>>()
                .join("\n")
        };
        done(&GrantList { grants }, text)
    }
}
