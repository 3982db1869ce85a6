//! What a call is and what a role allows, as data: a request becomes an
//! [`Action`] once (which tool, on which VMs, making which), and a role
//! ([`RoleSpec`], kept in the catalog) says which tools (glob patterns)
//! and which VMs (own, granted, all) its identities reach, and their
//! quotas. The decision itself, which needs owners and grants, is
//! `Daemon::decide`; everything here is pure.

use std::collections::BTreeSet;

use globset::{Glob, GlobSet, GlobSetBuilder};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::daemon::QuotaConfig;

/// The role that may do everything, identity administration included;
/// built in, and not to be changed.
pub const ADMIN_ROLE: &str = "admin";
/// The role of local users who are not admins and of anonymous callers;
/// an admin may change what it allows.
pub const USER_ROLE: &str = "user";

/// Tools that administer identities, and those that act as root on the
/// host (image builds run recipe commands; imports read host paths):
/// only the admin role has them, whatever another role's patterns say.
pub const ADMIN_TOOLS: [&str; 21] = [
    "host_status",
    "build_image",
    "import_image",
    "pull_image",
    "delete_image",
    "create_token",
    "list_tokens",
    "revoke_token",
    "read_audit",
    "give_vm",
    "set_role",
    "list_roles",
    "delete_role",
    "grant_vm",
    "revoke_grant",
    "list_grants",
    "set_secret",
    "list_secrets",
    "delete_secret",
    "grant_secret",
    "revoke_secret",
];

/// Tools that make a VM, named by their `name` argument.
const MAKERS: [&str; 2] = ["spawn_vm", "fork_vm"];

/// Which VMs a role's identities reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmScope {
    /// Only VMs granted to the identity (grant_vm); it makes none.
    Granted,
    /// Its own VMs and those granted to it.
    Own,
    /// Every VM.
    All,
}

/// A role as an admin writes it (set_role) and the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Glob patterns (`*`, `?`, `[abc]`) over tool names: a tool is
    /// allowed if a pattern matches it and no `!pattern` does. A VM's
    /// own tools are matched by their shared name, `vm_TOOL` (`vm_exec`,
    /// `vm_*`), on either surface. Identity administration (tokens,
    /// roles, grants, the audit trail) is the admin role's alone.
    pub tools: Vec<String>,
    /// Which VMs: `own` (its own and granted ones), `granted` (only
    /// granted ones; it makes no VM) or `all`.
    pub vms: VmScope,
    /// Limits for each identity of this role; each one unset is `[quota]`'s.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// Where its VMs may connect through the egress proxy: host patterns
    /// (`pypi.org`, `*.github.com`, `api.example.com:8443`, `*:*`); a
    /// pattern without a port allows 80 and 443. Private, loopback,
    /// link-local and the host's own addresses are refused whatever this
    /// says. Default: `["*"]`, the public web.
    #[serde(default = "web")]
    pub egress: Vec<String>,
}

fn web() -> Vec<String> {
    vec!["*".into()]
}

impl RoleSpec {
    /// What a fresh catalog's `user` role allows: every tool on its own VMs.
    pub fn default_user() -> Self {
        Self {
            tools: vec!["*".into()],
            vms: VmScope::Own,
            quota: QuotaConfig::default(),
            egress: web(),
        }
    }

    fn admin() -> Self {
        Self {
            tools: vec!["*".into()],
            vms: VmScope::All,
            quota: QuotaConfig::default(),
            egress: vec!["*:*".into()],
        }
    }
}

/// A role ready for decisions: its patterns compiled.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub spec: RoleSpec,
    allow: GlobSet,
    deny: GlobSet,
    /// `spec.egress`, compiled.
    pub egress: crate::egress::Allowlist,
}

impl Role {
    /// Compiles `spec`; an error says which pattern is wrong and why.
    pub fn new(name: &str, spec: RoleSpec) -> Result<Self, String> {
        if spec.tools.is_empty() {
            return Err("`tools` must name at least one pattern (\"*\" allows every tool)".into());
        }
        let (mut allow, mut deny) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for pattern in &spec.tools {
            let (set, glob) = match pattern.strip_prefix('!') {
                Some(rest) => (&mut deny, rest),
                None => (&mut allow, pattern.as_str()),
            };
            if glob.is_empty()
                || glob.len() > 128
                || !glob
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.*?[]".contains(c))
            {
                return Err(format!(
                    "tool pattern {pattern:?} is not allowed: 1-128 of letters, digits, `_-.` and the wildcards `*?[]`, optionally after one `!`"
                ));
            }
            let glob = Glob::new(glob).map_err(|e| format!("tool pattern {pattern:?}: {e}"))?;
            set.add(glob);
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| format!("tool patterns: {e}"));
        Ok(Self {
            name: name.to_owned(),
            allow: build(allow)?,
            deny: build(deny)?,
            egress: crate::egress::Allowlist::new(&spec.egress)?,
            spec,
        })
    }

    /// The built-in admin role.
    pub fn admin() -> Self {
        Self::new(ADMIN_ROLE, RoleSpec::admin()).unwrap_or_else(|_| unreachable!())
    }

    /// A role that allows nothing: what an identity whose role is gone has.
    pub fn none(name: &str) -> Self {
        Self::new(
            name,
            RoleSpec {
                tools: vec!["!*".into()],
                vms: VmScope::Granted,
                quota: QuotaConfig::default(),
                egress: Vec::new(),
            },
        )
        .unwrap_or_else(|_| unreachable!())
    }

    pub fn is_admin(&self) -> bool {
        self.name == ADMIN_ROLE
    }

    /// Whether this role's identities may call `tool` (a management
    /// tool's name, or a guest tool's `vm_TOOL`).
    pub fn allows(&self, tool: &str) -> bool {
        if self.is_admin() {
            return true;
        }
        !ADMIN_TOOLS.contains(&tool) && self.allow.is_match(tool) && !self.deny.is_match(tool)
    }
}

/// One tool call, read once from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The name as called.
    pub tool: String,
    pub kind: Kind,
    /// The existing VMs it names (`vm`, `from_vm`, a `VM__` prefix, the
    /// shared surface's `vm`).
    pub vms: Vec<String>,
    /// Whether it makes a VM (named or not).
    pub creates: bool,
    /// The name of the VM it makes, if it names one.
    pub makes: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// One of nexusd's own tools.
    Manage,
    /// A VM's own tool; `vm` is None when the shared surface's `vm`
    /// argument is missing or not a string (dispatch says which).
    Guest { tool: String, vm: Option<String> },
    /// Nothing anyone serves (dispatch says what there is).
    Unknown,
}

impl Action {
    /// Reads a call: `managed` tells nexusd's own tools, `guest` splits a
    /// guest tool's name into (VM from a `VM__` prefix, tool).
    pub fn parse(
        tool: &str,
        arguments: Option<&serde_json::Map<String, serde_json::Value>>,
        managed: impl Fn(&str) -> bool,
        guest: impl Fn(&str) -> Option<(Option<String>, String)>,
    ) -> Self {
        let text = |key: &str| match arguments.and_then(|a| a.get(key)) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        if managed(tool) {
            return Self {
                tool: tool.to_owned(),
                kind: Kind::Manage,
                vms: ["vm", "from_vm"].into_iter().filter_map(text).collect(),
                creates: MAKERS.contains(&tool),
                makes: MAKERS.contains(&tool).then(|| text("name")).flatten(),
            };
        }
        match guest(tool) {
            Some((prefix, name)) => {
                let vm = prefix.or_else(|| text(crate::tools::surface::VM_ARGUMENT));
                Self {
                    tool: tool.to_owned(),
                    vms: vm.iter().cloned().collect(),
                    kind: Kind::Guest { tool: name, vm },
                    creates: false,
                    makes: None,
                }
            }
            None => Self {
                tool: tool.to_owned(),
                kind: Kind::Unknown,
                vms: Vec::new(),
                creates: false,
                makes: None,
            },
        }
    }

    /// The name roles match: a management tool's own, `vm_TOOL` for a
    /// guest tool on either surface.
    pub fn policy_name(&self) -> String {
        match &self.kind {
            Kind::Guest { tool, .. } => guest_policy_name(tool),
            Kind::Manage | Kind::Unknown => self.tool.clone(),
        }
    }

    /// The VM for the trail: the one acted on, or the one being made.
    pub fn audit_vm(&self) -> Option<&str> {
        self.vms.first().or(self.makes.as_ref()).map(String::as_str)
    }
}

/// How roles name guest tool `tool`.
pub fn guest_policy_name(tool: &str) -> String {
    format!("{}{tool}", crate::tools::SHARED_PREFIX)
}

/// The built-in roles a catalog must hold, as (name, spec) for those
/// missing from `present`.
pub fn missing_builtins(present: &BTreeSet<String>) -> Vec<(&'static str, RoleSpec)> {
    [
        (ADMIN_ROLE, RoleSpec::admin()),
        (USER_ROLE, RoleSpec::default_user()),
    ]
    .into_iter()
    .filter(|(name, _)| !present.contains(*name))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(tools: &[&str]) -> Role {
        Role::new(
            "r",
            RoleSpec {
                tools: tools.iter().map(|t| (*t).to_owned()).collect(),
                vms: VmScope::Own,
                quota: QuotaConfig::default(),
                egress: web(),
            },
        )
        .unwrap()
    }

    #[test]
    fn patterns_allow_and_bang_patterns_take_away() {
        let r = role(&["list_*", "get_vm", "vm_*", "!vm_exec", "!vm_write_*"]);
        for yes in ["list_vms", "list_snapshots", "get_vm", "vm_read_file"] {
            assert!(r.allows(yes), "{yes}");
        }
        for no in ["spawn_vm", "vm_exec", "vm_write_file", "destroy_vm"] {
            assert!(!r.allows(no), "{no}");
        }
    }

    #[test]
    fn identity_administration_is_the_admin_roles_alone() {
        let r = role(&["*"]);
        assert!(r.allows("spawn_vm") && r.allows("vm_exec"));
        for tool in ADMIN_TOOLS {
            assert!(!r.allows(tool), "{tool}");
            assert!(Role::admin().allows(tool), "{tool}");
        }
        assert!(!Role::none("gone").allows("list_vms"));
    }

    #[test]
    fn bad_patterns_are_refused_by_name() {
        for (tools, says) in [
            (vec![], "at least one pattern"),
            (vec!["exec;rm"], "\"exec;rm\" is not allowed"),
            (vec!["!"], "\"!\" is not allowed"),
            (vec!["[a"], "tool pattern \"[a\""),
        ] {
            let err = Role::new(
                "r",
                RoleSpec {
                    tools: tools.into_iter().map(str::to_owned).collect(),
                    vms: VmScope::Own,
                    quota: QuotaConfig::default(),
                    egress: web(),
                },
            )
            .unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn a_call_is_read_once_into_an_action() {
        let managed = |t: &str| ["get_vm", "spawn_vm", "fork_vm"].contains(&t);
        let guest = |t: &str| match t.split_once("__") {
            Some((vm, tool)) => Some((Some(vm.to_owned()), tool.to_owned())),
            None => t.strip_prefix("vm_").map(|tool| (None, tool.to_owned())),
        };
        let args = |v: serde_json::Value| v.as_object().cloned();
        let a = Action::parse(
            "spawn_vm",
            args(serde_json::json!({"name": "n", "from_vm": "src"})).as_ref(),
            managed,
            guest,
        );
        assert_eq!(
            (a.vms.as_slice(), a.makes.as_deref()),
            (&["src".to_owned()][..], Some("n"))
        );
        assert_eq!(a.audit_vm(), Some("src"));
        let a = Action::parse("box__exec", None, managed, guest);
        assert_eq!(a.policy_name(), "vm_exec");
        assert_eq!(a.vms, ["box"]);
        let a = Action::parse(
            "vm_exec",
            args(serde_json::json!({"vm": 3})).as_ref(),
            managed,
            guest,
        );
        assert_eq!(
            a.kind,
            Kind::Guest {
                tool: "exec".into(),
                vm: None
            }
        );
        assert_eq!(
            Action::parse("nope", None, managed, guest).kind,
            Kind::Unknown
        );
    }
}
