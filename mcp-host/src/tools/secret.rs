//! `set_secret`, `list_secrets`, `delete_secret`, `grant_secret`,
//! `revoke_secret`: the admin's. No answer holds a secret's value.

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NexusTools, done};
use crate::daemon::SecretInfo;
use crate::egress::secrets::Binding;
use nexus_types::SecretList;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecretParams {
    /// Its name: A-Z, 0-9 and _ (VMs granted it see NEXUS_SECRET_<NAME>).
    pub name: String,
    /// The value; kept on the host, never shown again, never in a VM.
    pub value: String,
    /// Host patterns it may be sent to (egress allowlist syntax:
    /// `api.example.com`, `*.example.com`, `git.example.com:8443`).
    pub hosts: Vec<String>,
    /// A header set on every request to those hosts, `{secret}` where
    /// the value goes: `Authorization: Bearer {secret}`.
    #[serde(default)]
    pub header: Option<String>,
    /// Or: basic auth on every request to those hosts, with this user
    /// and the secret as password (git over HTTPS: `x-access-token`).
    /// With neither, the value goes only where a request to those hosts
    /// carries the placeholder in a header.
    #[serde(default)]
    pub basic_user: Option<String>,
}

/// Never its value, nor a header that might hold it.
impl std::fmt::Debug for SetSecretParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecretParams")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("basic_user", &self.basic_user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretNameParams {
    /// The secret's name (list_secrets shows them).
    pub name: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretGrantParams {
    /// The secret's name (list_secrets shows them).
    pub name: String,
    /// The VM.
    pub vm: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SecretSet {
    #[serde(flatten)]
    pub secret: SecretInfo,
    /// "created" or "replaced".
    pub outcome: String,
}

#[tool_router(router = secret_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "Store a secret on the host for VMs' egress (admin only): bound to host patterns and to how it is sent (a header template or basic auth). VMs granted it hold only a placeholder (NEXUS_SECRET_<NAME>); nexusd's egress proxy puts the value into requests to those hosts over HTTPS. Replacing keeps its grants and placeholder. The value is never shown, logged or audited.",
        output_schema = schema_for_output::<SecretSet>()
    )]
    async fn set_secret(
        &self,
        Parameters(p): Parameters<SetSecretParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("set_secret")?;
        let binding = Binding {
            hosts: p.hosts,
            header: p.header,
            basic_user: p.basic_user,
        };
        let (secret, created) = self
            .daemon
            .set_secret(&p.name, &p.value, binding)
            .await
            .map_err(super::errors::shown)?;
        let outcome = if created { "created" } else { "replaced" };
        let text = format!(
            "secret {} {outcome}: for {}; VMs granted it see {}",
            secret.name,
            secret.hosts.join(", "),
            secret.env
        );
        done(
            &SecretSet {
                secret,
                outcome: outcome.into(),
            },
            text,
        )
    }

    #[tool(
        description = "List secrets (admin only): names, hosts, how each is sent, placeholders and the VMs granted each; never values.",
        output_schema = schema_for_output::<SecretList>()
    )]
    async fn list_secrets(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("list_secrets")?;
        let secrets = self
            .daemon
            .list_secrets()
            .await
            .map_err(super::errors::shown)?;
        let text = if secrets.is_empty() {
            "no secrets".to_owned()
        } else {
            secrets
                .iter()
                .map(|s| {
                    format!(
                        "{}: {} (VMs: {})",
                        s.name,
                        s.hosts.join(", "),
                        s.vms.join(", ")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        done(&SecretList { secrets }, text)
    }

    #[tool(
        description = "Delete a secret and its grants (admin only); VMs holding it lose its placeholder and no request gets it again.",
        output_schema = schema_for_output::<SecretInfo>()
    )]
    async fn delete_secret(
        &self,
        Parameters(p): Parameters<SecretNameParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("delete_secret")?;
        let secret = self
            .daemon
            .delete_secret(&p.name)
            .await
            .map_err(super::errors::shown)?;
        let text = format!("secret {} deleted", secret.name);
        done(&secret, text)
    }

    #[tool(
        description = "Let a VM use a secret (admin only): from its next request to the secret's hosts; its next commands see NEXUS_SECRET_<NAME> holding the placeholder.",
        output_schema = schema_for_output::<SecretInfo>()
    )]
    async fn grant_secret(
        &self,
        Parameters(p): Parameters<SecretGrantParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("grant_secret")?;
        let secret = self
            .daemon
            .grant_secret(&p.name, &p.vm)
            .await
            .map_err(super::errors::shown)?;
        let text = format!(
            "VM {} may use secret {} ({})",
            p.vm, secret.name, secret.env
        );
        done(&secret, text)
    }

    #[tool(
        description = "Take a secret from a VM (admin only): its next request no longer gets it, and its placeholder is refused.",
        output_schema = schema_for_output::<SecretInfo>()
    )]
    async fn revoke_secret(
        &self,
        Parameters(p): Parameters<SecretGrantParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        self.caller(&ctx)?.require_admin("revoke_secret")?;
        let secret = self
            .daemon
            .revoke_secret(&p.name, &p.vm)
            .await
            .map_err(super::errors::shown)?;
        let text = format!("VM {} no longer uses secret {}", p.vm, secret.name);
        done(&secret, text)
    }
}
