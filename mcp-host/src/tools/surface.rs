//! How guest tools appear to clients: two surfaces over one proxy.
//!
//! - `per-vm` (the default): each running VM's tools under its own name,
//!   `<vm>__exec`, `<vm>__read_file`, ... An agent sees its VM's tools as
//!   its own; the list grows with every VM.
//! - `shared`: each guest tool listed once, as `vm_<tool>` with a `vm`
//!   argument naming the VM (`vm_exec {vm, command}`). For orchestrators
//!   driving many VMs: the list stays the same size.
//!
//! A connection picks its surface (HTTP: `?surface=shared` on the URL or a
//! `Nexus-Surface` header; stdio: `--surface`; or the configuration).
//! Calls are accepted in either form on every connection.

use std::collections::BTreeMap;
use std::sync::Arc;

use rmcp::model::{JsonObject, Tool};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Per-VM guest tools are named `<vm>__<tool>`.
pub const PROXY_SEPARATOR: &str = "__";
/// Shared guest tools are named `vm_<tool>`.
pub const SHARED_PREFIX: &str = "vm_";
/// The longest tool name listed: clients prefix names with their own
/// (Claude Code: `mcp__<server>__`), and parts of Anthropic's API take at
/// most 64 characters in all. A VM whose name is too long for
/// `<vm>__<tool>` has its tools listed on the shared surface instead.
pub const MAX_TOOL_NAME: usize = 48;
/// The argument a shared guest tool takes its VM from.
pub const VM_ARGUMENT: &str = "vm";
/// The HTTP query parameter and header choosing a request's surface.
pub use nexus_types::admin::SURFACE_QUERY;
pub const SURFACE_HEADER: &str = "nexus-surface";
/// Where a page of `tools/list` resumes (keyset: after this tool name).
const CURSOR_PREFIX: &str = "after:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Surface {
    /// Each VM's tools under its own name: `<vm>__exec`.
    #[default]
    PerVm,
    /// Each guest tool once, with a `vm` argument: `vm_exec`.
    Shared,
}

impl std::str::FromStr for Surface {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-vm" => Ok(Self::PerVm),
            "shared" => Ok(Self::Shared),
            other => Err(format!(
                "unknown tool surface {other:?}: use \"per-vm\" (VM__TOOL) or \"shared\" (vm_TOOL with a `vm` argument)"
            )),
        }
    }
}

/// The surface one request asked for over HTTP, or the connection's.
pub fn requested(
    default: Surface,
    context: &RequestContext<RoleServer>,
) -> Result<Surface, ErrorData> {
    let Some(parts) = context.extensions.get::<axum::http::request::Parts>() else {
        return Ok(default);
    };
    let from_query = parts.uri.query().and_then(|query| {
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == SURFACE_QUERY).then(|| value.to_owned())
        })
    });
    let from_header = parts
        .headers
        .get(SURFACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match from_query.or(from_header) {
        Some(asked) => asked
            .parse()
            .map_err(|why: String| ErrorData::invalid_params(why, None)),
        None => Ok(default),
    }
}

/// What a called tool name refers to (management tools are matched first).
#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `<vm>__<tool>`.
    PerVm { vm: &'a str, tool: &'a str },
    /// `vm_<tool>`, the VM in the arguments.
    Shared { tool: &'a str },
}

/// Routes a guest tool name. VM names never hold `_`, so `vm__x` is VM
/// `vm`'s tool `x`, and `vm_x` the shared tool `x`.
pub fn target(name: &str) -> Option<Target<'_>> {
    if let Some(tool) = name.strip_prefix(SHARED_PREFIX)
        && !tool.is_empty()
        && !tool.starts_with('_')
    {
        return Some(Target::Shared { tool });
    }
    let (vm, tool) = name.split_once(PROXY_SEPARATOR)?;
    (!vm.is_empty() && !tool.is_empty()).then_some(Target::PerVm { vm, tool })
}

/// The new name of a management tool renamed since the first release,
/// whose old name now reads as a shared guest tool.
pub fn renamed(name: &str) -> Option<&'static str> {
    match name {
        "vm_info" => Some("get_vm"),
        "vm_console" => Some("read_console"),
        _ => None,
    }
}

/// Guest tool `tool` of VM `vm` on the per-VM surface; None when the name
/// would be longer than [`MAX_TOOL_NAME`].
pub fn per_vm(vm: &str, tool: &Tool) -> Option<Tool> {
    let name = format!("{vm}{PROXY_SEPARATOR}{}", tool.name);
    if name.len() > MAX_TOOL_NAME {
        return None;
    }
    let mut tool = tool.clone();
    tool.name = name.into();
    tool.description = tool.description.map(|d| format!("[VM {vm}] {d}").into());
    Some(tool)
}

/// The shared listing of the guest tools of every running VM: each name
/// once (the first VM's definition), with a required `vm` argument. A
/// guest tool that has a `vm` argument of its own cannot be shared.
pub fn shared<'a>(guest_tools: impl IntoIterator<Item = &'a Tool>) -> Vec<Tool> {
    let mut by_name: BTreeMap<String, Tool> = BTreeMap::new();
    for tool in guest_tools {
        if by_name.contains_key(tool.name.as_ref()) {
            continue;
        }
        let mut schema: JsonObject = (*tool.input_schema).clone();
        let properties = schema
            .entry("properties")
            .or_insert_with(|| Value::Object(JsonObject::new()));
        let Some(properties) = properties.as_object_mut() else {
            continue;
        };
        if properties.contains_key(VM_ARGUMENT) {
            tracing::warn!(tool = %tool.name, "a guest tool with its own `vm` argument is left off the shared surface");
            continue;
        }
        properties.insert(
            VM_ARGUMENT.to_owned(),
            serde_json::json!({
                "type": "string",
                "description": "The VM to run this in (list_vms shows them)."
            }),
        );
        let mut required = vec![Value::from(VM_ARGUMENT)];
        if let Some(Value::Array(theirs)) = schema.get("required") {
            required.extend(theirs.iter().cloned());
        }
        schema.insert("required".to_owned(), Value::Array(required));
        let mut shared = tool.clone();
        shared.name = format!("{SHARED_PREFIX}{}", tool.name).into();
        shared.description = Some(
            format!(
                "{} Runs in the VM named by `vm`.",
                tool.description.as_deref().unwrap_or_default()
            )
            .trim_start()
            .to_owned()
            .into(),
        );
        shared.input_schema = Arc::new(schema);
        by_name.insert(tool.name.to_string(), shared);
    }
    by_name.into_values().collect()
}

/// One page of `tools` (sorted by name) after `cursor`, and the cursor of
/// the next page if there is one. `size` 0 means one page for everything.
pub fn page(
    tools: Vec<Tool>,
    cursor: Option<&str>,
    size: usize,
) -> Result<(Vec<Tool>, Option<String>), ErrorData> {
    let after = match cursor {
        None => None,
        Some(cursor) => Some(cursor.strip_prefix(CURSOR_PREFIX).ok_or_else(|| {
            ErrorData::invalid_params(
                format!("invalid cursor {cursor:?}: pass back a nextCursor from tools/list"),
                None,
            )
        })?),
    };
    let mut rest: Vec<Tool> = tools
        .into_iter()
        .filter(|t| after.is_none_or(|after| t.name.as_ref() > after))
        .collect();
    if size == 0 || rest.len() <= size {
        return Ok((rest, None));
    }
    rest.truncate(size);
    let next = rest
        .last()
        .map(|last| format!("{CURSOR_PREFIX}{}", last.name));
    Ok((rest, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, schema: Value) -> Tool {
        Tool::new(
            name.to_owned(),
            format!("does {name}"),
            Arc::new(schema.as_object().cloned().unwrap_or_default()),
        )
    }

    #[test]
    fn names_route_to_their_surface() {
        assert_eq!(target("vm_exec"), Some(Target::Shared { tool: "exec" }));
        assert_eq!(
            target("a__exec"),
            Some(Target::PerVm {
                vm: "a",
                tool: "exec"
            })
        );
        // A VM named "vm" keeps its per-VM tools.
        assert_eq!(
            target("vm__exec"),
            Some(Target::PerVm {
                vm: "vm",
                tool: "exec"
            })
        );
        assert_eq!(
            target("vm-2__read_file"),
            Some(Target::PerVm {
                vm: "vm-2",
                tool: "read_file"
            })
        );
        assert_eq!(target("vm_"), None);
        assert_eq!(target("__exec"), None);
        assert_eq!(target("nothing"), None);
    }

    #[test]
    fn shared_tools_take_a_required_vm_argument_and_appear_once() {
        let exec = tool(
            "exec",
            serde_json::json!({"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}),
        );
        let other = tool("exec", serde_json::json!({"type": "object"}));
        let own_vm = tool(
            "odd",
            serde_json::json!({"type": "object", "properties": {"vm": {"type": "string"}}}),
        );
        let listed = shared([&exec, &other, &own_vm]);
        assert_eq!(listed.len(), 1, "{listed:?}");
        let vm_exec = &listed[0];
        assert_eq!(vm_exec.name, "vm_exec");
        let schema = Value::Object((*vm_exec.input_schema).clone());
        assert_eq!(schema["required"], serde_json::json!(["vm", "command"]));
        assert_eq!(schema["properties"]["vm"]["type"], "string");
        assert!(schema["properties"]["command"].is_object());
        assert!(
            vm_exec
                .description
                .as_deref()
                .unwrap_or_default()
                .contains("`vm`")
        );
    }

    #[test]
    fn pages_follow_their_cursors_to_the_end() {
        let tools: Vec<Tool> = (0..7)
            .map(|i| tool(&format!("t{i}"), serde_json::json!({"type": "object"})))
            .collect();
        let (first, next) = page(tools.clone(), None, 3).unwrap();
        assert_eq!(first.len(), 3);
        let (second, next) = page(tools.clone(), next.as_deref(), 3).unwrap();
        assert_eq!(second[0].name, "t3");
        let (third, next) = page(tools.clone(), next.as_deref(), 3).unwrap();
        assert_eq!(third.len(), 1);
        assert_eq!(next, None);
        let (all, next) = page(tools.clone(), None, 0).unwrap();
        assert_eq!((all.len(), next), (7, None));
        let err = page(tools, Some("bogus"), 3).unwrap_err();
        assert!(err.message.contains("invalid cursor"), "{err:?}");
    }
}
