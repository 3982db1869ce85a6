//! VM lifecycle: spawn_vm, list_vms, get_vm, start_vm, stop_vm,
//! destroy_vm, read_console.

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NexusTools, done};
use crate::daemon::admission::{Limits, PoolSpace};
use crate::daemon::{SPAWN_STEPS, SpawnRequest, VmInfo};
use rmcp::RoleServer;
use rmcp::model::ProgressNotificationParam;
use rmcp::service::RequestContext;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnVmParams {
    /// Name for the VM: 1-63 of a-z, 0-9 and '-' (default: vm-N).
    #[serde(default)]
    pub name: Option<String>,
    /// Image to make it from (default: "default"; list_images shows them).
    #[serde(default)]
    pub image: Option<String>,
    /// Virtual CPUs (default 1, at most 32).
    #[serde(default)]
    #[schemars(range(min = 1, max = 32))]
    pub vcpus: Option<u32>,
    /// Memory in MiB (default 256, at least 64, at most the host's).
    #[serde(default)]
    #[schemars(range(min = 64))]
    pub memory_mib: Option<u32>,
    /// Size of the empty /workspace drive in GiB (default 1, at most 1024).
    #[serde(default)]
    #[schemars(range(min = 1, max = 1024))]
    pub workspace_gib: Option<u64>,
    /// Where the VM may connect (egress proxy), narrowing its owner's
    /// role's list, never widening it: host patterns such as `pypi.org`,
    /// `*.github.com`, `api.example.com:8443`; without a port, 80 and 443;
    /// `[]` for no network. Default: the role's list.
    #[serde(default)]
    pub egress: Option<Vec<String>>,
    /// Start /workspace as a copy of a snapshot of this VM (with `from_snapshot`).
    #[serde(default)]
    pub from_vm: Option<String>,
    /// The snapshot of `from_vm` to copy /workspace from.
    #[serde(default)]
    pub from_snapshot: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetEgressParams {
    /// The VM's name.
    pub vm: String,
    /// Where it may connect, narrowing its owner's role's list (never
    /// widening it): host patterns such as `pypi.org`, `*.github.com`,
    /// `api.example.com:8443`; without a port, 80 and 443; `[]` for no
    /// network. Omitted: the role's list alone.
    #[serde(default)]
    pub egress: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmParams {
    /// The VM's name.
    pub vm: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleParams {
    /// The VM's name.
    pub vm: String,
    /// How many of the last console lines to return (default 50, at most 1000).
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub lines: Option<u32>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
    /// How full the storage pool (workspaces, snapshots) is.
    pub pool: PoolSpace,
    /// What the host may hold.
    pub limits: Limits,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Destroyed {
    pub vm: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Console {
    pub vm: String,
    pub text: String,
}

fn line(v: &VmInfo) -> String {
    let cid = v.cid.map(|c| format!(", cid {c}")).unwrap_or_default();
    let guest = match v.guest.as_deref() {
        Some("answering") | None => String::new(),
        Some(other) => format!("; guest {other}"),
    };
    format!(
        "{}: {} (image {}, {} vCPU, {} MiB{cid}){guest}",
        v.name, v.state, v.image, v.vcpus, v.memory_mib
    )
}

#[tool_router(router = vm_router, vis = "pub(super)")]
impl NexusTools {
    #[tool(
        description = "Create a VM (its own kernel, root drive and empty /workspace, or one cloned from a snapshot) and boot it; returns once its guest tools answer.",
        output_schema = schema_for_output::<VmInfo>()
    )]
    async fn spawn_vm(
        &self,
        Parameters(p): Parameters<SpawnVmParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let caller = self.caller(&ctx)?;
        let (progress, forwarder) = match ctx.meta.get_progress_token() {
            Some(token) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(f64, String)>();
                let peer = ctx.peer.clone();
                let forwarder = tokio::spawn(async move {
                    while let Some((step, message)) = rx.recv().await {
                        let param = ProgressNotificationParam::new(token.clone(), step)
                            .with_total(SPAWN_STEPS)
                            .with_message(message);
                        if peer.notify_progress(param).await.is_err() {
                            break;
                        }
                    }
                });
                (Some(tx), Some(forwarder))
            }
            None => (None, None),
        };
        let request = SpawnRequest {
            owner: Some(caller.name),
            name: p.name,
            image: p.image,
            vcpus: p.vcpus,
            memory_mib: p.memory_mib,
            workspace_gib: p.workspace_gib,
            egress: p.egress,
            from_snapshot: match (p.from_vm, p.from_snapshot) {
                (None, None) => None,
                (Some(vm), Some(snapshot)) => Some((vm, snapshot)),
                (Some(_), None) => {
                    return Err(
                        "`from_vm` needs `from_snapshot`: the snapshot of that VM to copy /workspace from (list_snapshots shows them)".to_owned(),
                    );
                }
                (None, Some(_)) => {
                    return Err(
                        "`from_snapshot` needs `from_vm`: the VM the snapshot belongs to"
                            .to_owned(),
                    );
                }
            },
        };
        let spawned = self.daemon.spawn(request, progress).await;
        if let Some(forwarder) = forwarder {
            // The sender went with `spawn`: the forwarder drains and ends.
            let _ = forwarder.await;
        }
        let info = spawned.map_err(super::errors::shown)?;
        let ready = info
            .ready_ms
            .map(|ms| format!(", ready in {ms} ms"))
            .unwrap_or_default();
        done(&info, format!("spawned {}{ready}", line(&info)))
    }

    #[tool(
        description = "Set where a VM may connect through nexusd's egress proxy (its guest's only way out): a list narrowing its owner's role's, never widening it; the next connection follows it. Private, loopback, link-local and the host's own addresses are never reachable.",
        output_schema = schema_for_output::<VmInfo>()
    )]
    async fn set_egress(
        &self,
        Parameters(p): Parameters<SetEgressParams>,
    ) -> Result<CallToolResult, String> {
        let info = self
            .daemon
            .set_egress(&p.vm, p.egress)
            .await
            .map_err(super::errors::shown)?;
        let text = match &info.egress {
            Some(list) if list.is_empty() => format!("{}: no network", info.name),
            Some(list) => format!("{}: egress to {}", info.name, list.join(", ")),
            None => format!("{}: egress as its owner's role allows", info.name),
        };
        done(&info, text)
    }

    #[tool(description = "List every VM with its state and size.", output_schema = schema_for_output::<VmList>())]
    async fn list_vms(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, String> {
        let caller = self.caller(&ctx)?;
        let mut vms = self.daemon.list().await.map_err(super::errors::shown)?;
        vms.retain(|vm| self.daemon.reach(&caller, &vm.name).is_ok());
        let pool = self.daemon.pool_space();
        let mut text = if vms.is_empty() {
            "no VMs: spawn_vm makes one".to_owned()
        } else {
            vms.iter().map(line).collect::<Vec<_>>().join("\n")
        };
        text.push_str(&format!(
            "\npool: {:.1} GiB free of {:.1} GiB",
            pool.free_bytes as f64 / f64::from(1 << 30),
            pool.total_bytes as f64 / f64::from(1 << 30)
        ));
        done(
            &VmList {
                vms,
                pool,
                limits: *self.daemon.limits(),
            },
            text,
        )
    }

    #[tool(description = "Show one VM: its state, image, size and where its workspace came from.", output_schema = schema_for_output::<VmInfo>())]
    async fn get_vm(&self, Parameters(p): Parameters<VmParams>) -> Result<CallToolResult, String> {
        let info = self
            .daemon
            .info(&p.vm)
            .await
            .map_err(super::errors::shown)?;
        done(&info, line(&info))
    }

    #[tool(description = "Boot a stopped VM again, with its drives as they are.", output_schema = schema_for_output::<VmInfo>())]
    async fn start_vm(
        &self,
        Parameters(p): Parameters<VmParams>,
    ) -> Result<CallToolResult, String> {
        let info = self
            .daemon
            .start(&p.vm)
            .await
            .map_err(super::errors::shown)?;
        done(&info, format!("started {}", line(&info)))
    }

    #[tool(
        description = "Shut a running VM down cleanly (its drives are kept; start_vm boots it again).",
        output_schema = schema_for_output::<VmInfo>()
    )]
    async fn stop_vm(&self, Parameters(p): Parameters<VmParams>) -> Result<CallToolResult, String> {
        let info = self
            .daemon
            .stop(&p.vm)
            .await
            .map_err(super::errors::shown)?;
        done(&info, format!("stopped {}", line(&info)))
    }

    #[tool(
        description = "Pause a running VM: its vCPUs stop and its memory stays, so its processes carry on where they were when resumed; it uses no CPU meanwhile. Its workspace is flushed and frozen first, so snapshot_drive and fork_vm of a paused VM are consistent. Its guest tools answer \"paused\" until resume_vm.",
        output_schema = schema_for_output::<VmInfo>()
    )]
    async fn pause_vm(
        &self,
        Parameters(p): Parameters<VmParams>,
    ) -> Result<CallToolResult, String> {
        let info = self
            .daemon
            .pause(&p.vm)
            .await
            .map_err(super::errors::shown)?;
        done(&info, format!("paused {}", line(&info)))
    }

    #[tool(
        description = "Resume a paused VM where it was (its workspace thawed).",
        output_schema = schema_for_output::<VmInfo>()
    )]
    async fn resume_vm(
        &self,
        Parameters(p): Parameters<VmParams>,
    ) -> Result<CallToolResult, String> {
        let info = self
            .daemon
            .resume(&p.vm)
            .await
            .map_err(super::errors::shown)?;
        done(&info, format!("resumed {}", line(&info)))
    }

    #[tool(
        description = "Stop a VM if it runs and delete it with its drives and snapshots. This cannot be undone.",
        output_schema = schema_for_output::<Destroyed>()
    )]
    async fn destroy_vm(
        &self,
        Parameters(p): Parameters<VmParams>,
    ) -> Result<CallToolResult, String> {
        self.daemon
            .destroy(&p.vm)
            .await
            .map_err(super::errors::shown)?;
        done(
            &Destroyed { vm: p.vm.clone() },
            format!("destroyed {}", p.vm),
        )
    }

    #[tool(description = "The last lines of a VM's serial console (boot messages, kernel errors).", output_schema = schema_for_output::<Console>())]
    async fn read_console(
        &self,
        Parameters(p): Parameters<ConsoleParams>,
    ) -> Result<CallToolResult, String> {
        let lines = p.lines.unwrap_or(50);
        if lines == 0 || lines > 1000 {
            return Err(format!("`lines` must be between 1 and 1000, got {lines}"));
        }
        let text = self
            .daemon
            .console(&p.vm, lines as usize)
            .await
            .map_err(super::errors::shown)?;
        done(
            &Console {
                vm: p.vm,
                text: text.clone(),
            },
            text,
        )
    }
}
