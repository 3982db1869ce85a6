//! `create_token`, `list_tokens`, `revoke_token`: the admin's.

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NexusTools, done};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenParams {
    /// The token's name (lowercase letters, digits and `-`, at most 63),
    /// never reused: audit records name it.
    pub name: String,
    /// Its role (list_roles shows them): "user" (the default: every
    /// tool on its own VMs), "admin" (also identities: tokens, roles,
    /// grants, the audit trail), or one made with set_role.
    #[serde(default)]
    pub role: Option<String>,
    /// Seconds until it stops working; none: until revoked.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GiveVmParams {
    /// The VM's name.
    pub vm: String,
    /// The identity it goes to (`token:NAME`, `uid:N`, `anonymous`);
    /// none: to no one (admins only).
    #[serde(default)]
    pub owner: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeTokenParams {
    /// The token's name (list_tokens shows them).
    pub name: String,
}

/// A token as the admin sees it (never its secret, which is shown once).
#[derive(Debug, Serialize, JsonSchema)]
pub struct TokenInfo {
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// "active", "expired" or "revoked".
    pub state: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct NewToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The secret, shown only now: send it as `Authorization: Bearer ...`.
    pub token: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

fn info(record: nexus_storage::TokenRecord) -> TokenInfo {
    let state = crate::identity::standing(&record).as_str();
    TokenInfo {
        name: record.name,
        role: record.role,
        created_at: record.created_at,
        expires_at: record.expires_at,
        revoked_at: record.revoked_at,
        state: state.into(),
    }
}

#[tool_router(router = token_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "Make an API token for HTTP clients (admin only). Its secret is in the answer and nowhere else: nexusd keeps only a digest.",
        output_schema = schema_for_output::<NewToken>()
    )]
    async fn create_token(
        &self,
        Parameters(p): Parameters<CreateTokenParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("create_token")?;
        let role = p.role.as_deref().unwrap_or(crate::policy::USER_ROLE);
        let (record, secret) = self
            .daemon
            .create_token(&p.name, role, p.expires_in_s)
            .await
            .map_err(super::errors::shown)?;
        let text = format!(
            "token {:?} ({}): {secret}\nshown only now; send it as `Authorization: Bearer <token>`",
            record.name, record.role
        );
        done(
            &NewToken {
                info: info(record),
                token: secret,
            },
            text,
        )
    }

    #[tool(
        description = "List API tokens (admin only): name, role, creation, expiry and revocation; never their secrets.",
        output_schema = schema_for_output::<TokenList>()
    )]
    async fn list_tokens(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("list_tokens")?;
        let tokens: Vec<TokenInfo> = self
            .daemon
            .tokens()
            .await
            .map_err(super::errors::shown)?
            .into_iter()
            .map(info)
            .collect();
        let text = if tokens.is_empty() {
            "no tokens".to_owned()
        } else {
            tokens
                .iter()
                .map(|t| format!("{} ({}, {})", t.name, t.role, t.state))
                .collect::<Vec<_>>()
                .join("\n")
        };
        done(&TokenList { tokens }, text)
    }

    #[tool(
        description = "Give a VM (and its snapshots) to another identity, or to no one (admin only): for VMs made before owners existed, or a user's VMs another should drive.",
        output_schema = schema_for_output::<crate::daemon::VmInfo>()
    )]
    async fn give_vm(
        &self,
        Parameters(p): Parameters<GiveVmParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("give_vm")?;
        let info = self
            .daemon
            .give_vm(&p.vm, p.owner)
            .await
            .map_err(super::errors::shown)?;
        let text = format!(
            "VM {} is now {}",
            info.name,
            info.owner
                .as_deref()
                .map_or("no one's (admins only)".to_owned(), |o| format!("{o}'s"))
        );
        done(&info, text)
    }

    #[tool(
        description = "Revoke an API token at once and for good (admin only); its name stays taken.",
        output_schema = schema_for_output::<TokenInfo>()
    )]
    async fn revoke_token(
        &self,
        Parameters(p): Parameters<RevokeTokenParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("revoke_token")?;
        let record = self
            .daemon
            .revoke_token(&p.name)
            .await
            .map_err(super::errors::shown)?;
        let text = format!("token {:?} revoked", record.name);
        done(&info(record), text)
    }
}
