//! nexusd's MCP tools, one module per group. Handlers only translate:
//! parse arguments, call the daemon, render the answer. Running VMs' guest
//! tools are proxied on one of two surfaces (see `surface`). Every schema
//! listed is standard JSON Schema 2020-12 (see `crate::schema`).
//!
//! Naming, across the whole surface: tools are `verb_noun`; an existing VM
//! is always the argument `vm`, a snapshot always `snapshot` beside the
//! `vm` it belongs to, and the name of something a tool creates is `name`
//! (a new VM's workspace source is `from_vm` + `from_snapshot`).

mod audit;
mod errors;
mod image;
mod logging;
mod role;
mod secret;
mod snapshot;
mod status;
pub mod surface;
mod token;
mod vm;

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, SubscriptionFilter,
    Tool,
};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::{ErrorData, RoleServer, ServerHandler, tool_handler};
use serde::Serialize;

use crate::daemon::Daemon;
use crate::guest::proxy;
use crate::identity::Identity;
use crate::metrics::Outcome;
use crate::policy::{Action, Kind};
pub use surface::{PROXY_SEPARATOR, SHARED_PREFIX, Surface};

/// How long a client may cache `tools/list`.
pub const TOOLS_TTL_MS: u64 = 2000;

/// What a connection is served with, besides the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The guest tool surface when a request does not choose one.
    pub surface: Surface,
    /// Tools per `tools/list` page; 0: everything in one page.
    pub page_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            surface: Surface::PerVm,
            page_size: crate::config::DEFAULT_TOOLS_PAGE_SIZE,
        }
    }
}

/// One MCP connection's (or, over HTTP, one session's) server.
#[derive(Clone)]
pub struct NexusTools {
    daemon: Arc<Daemon>,
    tool_router: ToolRouter<Self>,
    options: Options,
    /// The level a 2025-11-25 client set with `logging/setLevel`.
    log_level: logging::SessionLevel,
    /// Who is at the other end of a stdio bridge; an HTTP request carries
    /// its own (see `caller`).
    identity: Option<Identity>,
}

impl NexusTools {
    /// Tools for one connection: `identity` is its caller's (a stdio
    /// bridge), or None where each request brings one (HTTP).
    pub fn new(daemon: Arc<Daemon>, options: Options, identity: Option<Identity>) -> Self {
        Self {
            daemon,
            tool_router: Self::vm_router()
                + Self::snapshot_router()
                + Self::image_router()
                + Self::token_router()
                + Self::role_router()
                + Self::secret_router()
                + Self::audit_router()
                + Self::status_router(),
            options,
            log_level: logging::SessionLevel::default(),
            identity,
        }
    }

    /// Who makes a request: the identity the HTTP layer proved for it, or
    /// the connection's. None is an error: nothing runs for nobody.
    pub fn caller(&self, context: &RequestContext<RoleServer>) -> Result<Identity, String> {
        if let Some(parts) = context.extensions.get::<axum::http::request::Parts>() {
            return parts
                .extensions
                .get::<Identity>()
                .cloned()
                .ok_or_else(|| "this request carries no identity".to_owned());
        }
        self.identity
            .clone()
            .ok_or_else(|| "this connection has no identity".to_owned())
    }

    /// Every tool on `surface` that `caller` may call (guest tools of the
    /// VMs it may reach), sorted by name, with standard schemas.
    async fn all_tools(&self, surface: Surface, caller: &Identity) -> Vec<Tool> {
        static MANAGEMENT: std::sync::OnceLock<Vec<Tool>> = std::sync::OnceLock::new();
        let mut tools = MANAGEMENT
            .get_or_init(|| {
                let mut tools = self.tool_router.list_all();
                tools.iter_mut().for_each(crate::schema::standardise_tool);
                tools
            })
            .clone();
        let role = self.daemon.role_of(caller);
        tools.retain(|t| role.allows(&t.name));
        let mut guests = self.daemon.guests().all_tools().await;
        guests.retain(|(vm, _)| self.daemon.reach(caller, vm).is_ok());
        let allowed = |tool: &&Tool| role.allows(&crate::policy::guest_policy_name(&tool.name));
        let mut shared = surface == Surface::Shared;
        if surface == Surface::PerVm {
            for (vm, session) in &guests {
                for tool in session.tools().iter().filter(allowed) {
                    match surface::per_vm(vm, tool) {
                        Some(tool) => tools.push(tool),
                        // Too long a name: this VM is reached through the
                        // shared tools, listed below.
                        None => shared = true,
                    }
                }
            }
        }
        if shared {
            tools.extend(surface::shared(
                guests
                    .iter()
                    .flat_map(|(_, session)| session.tools())
                    .filter(allowed),
            ));
        }
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools
    }

    /// What a call is counted as: only names someone serves get a series.
    fn metric_label(&self, name: &str) -> String {
        if self.tool_router.has_route(name) {
            return name.to_owned();
        }
        match surface::target(name) {
            Some(surface::Target::PerVm { tool, .. }) | Some(surface::Target::Shared { tool })
                if self.daemon.guests().knows_tool(tool) =>
            {
                format!("guest:{tool}")
            }
            _ => "unknown".to_owned(),
        }
    }

    /// What a call is, read once from its name and arguments.
    fn action(&self, request: &CallToolRequestParams) -> Action {
        Action::parse(
            &request.name,
            request.arguments.as_ref(),
            |tool| self.tool_router.has_route(tool),
            |name| match surface::target(name) {
                _ if surface::renamed(name).is_some() => None,
                Some(surface::Target::PerVm { vm, tool }) => {
                    Some((Some(vm.to_owned()), tool.to_owned()))
                }
                Some(surface::Target::Shared { tool }) => Some((None, tool.to_owned())),
                None => None,
            },
        )
    }

    async fn dispatch(
        &self,
        action: Action,
        mut request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let (vm, tool) = match action.kind {
            Kind::Manage => {
                return self
                    .tool_router
                    .call(ToolCallContext::new(self, request, context))
                    .await;
            }
            Kind::Unknown => {
                let why = match surface::renamed(&request.name) {
                    Some(new) => format!("{} was renamed {new}", request.name),
                    None => format!(
                        "unknown tool {:?}: nexusd's tools are listed by tools/list; a VM's own tools are VM__TOOL, or vm_TOOL with a `vm` argument",
                        request.name
                    ),
                };
                return Err(ErrorData::invalid_params(why, None));
            }
            Kind::Guest { tool, vm: Some(vm) } => (vm, tool),
            Kind::Guest { tool, vm: None } => {
                let why = match request
                    .arguments
                    .as_ref()
                    .and_then(|a| a.get(surface::VM_ARGUMENT))
                {
                    Some(other) => format!(
                        "`vm` must be a VM's name (a string), got {other}: list_vms shows them"
                    ),
                    None => format!(
                        "`vm` is required: the VM to run {SHARED_PREFIX}{tool} in (list_vms shows them)"
                    ),
                };
                return Err(ErrorData::invalid_params(why, None));
            }
        };
        if let Some(args) = request.arguments.as_mut()
            && surface::target(&request.name)
                .is_some_and(|t| matches!(t, surface::Target::Shared { .. }))
        {
            args.remove(surface::VM_ARGUMENT);
        }
        if self.daemon.is_paused(&vm).await {
            return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "VM {vm:?} is paused: resume_vm {vm} first"
            ))])
            .into());
        }
        if !self.daemon.guests().is_attached(&vm) {
            let why = self.daemon.why_unreachable(&vm).await;
            return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "cannot reach VM {vm:?}'s tools: {why}"
            ))])
            .into());
        }
        proxy::call(self.daemon.guests(), &vm, &tool, request.arguments, context).await
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for NexusTools {
    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let caller = self
            .caller(&context)
            .map_err(|why| ErrorData::invalid_request(why, None))?;
        let surface = surface::requested(self.options.surface, &context)?;
        let tools = self.all_tools(surface, &caller).await;
        let cursor = request.as_ref().and_then(|r| r.cursor.as_deref());
        let (tools, next) = surface::page(tools, cursor, self.options.page_size)?;
        let mut result = ListToolsResult::with_all_items(tools);
        result.next_cursor = next;
        // Tools come and go with VMs: a client that does not listen for
        // changes should not cache the list for long.
        Ok(result.with_ttl_ms(TOOLS_TTL_MS))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let label = self.metric_label(&request.name);
        let started = std::time::Instant::now();
        let caller = self.caller(&context);
        let transport = match (
            &caller,
            context.extensions.get::<axum::http::request::Parts>(),
        ) {
            (Ok(who), Some(_)) if matches!(who.proof, crate::identity::Proof::Uid(_)) => {
                "admin-socket"
            }
            (_, Some(_)) => "http",
            (_, None) => "stdio",
        };
        let deciding = std::time::Instant::now();
        let action = self.action(&request);
        let decision = caller
            .as_ref()
            .map_err(Clone::clone)
            .map(|who| self.daemon.decide(who, &action));
        if let Ok(decision) = &decision {
            self.daemon
                .metrics()
                .record_decision(decision.is_ok(), deciding.elapsed());
        }
        let vm = action.audit_vm().map(crate::daemon::audit::cut_name);
        let arguments =
            crate::daemon::audit::redact_call(&request.name, request.arguments.as_ref());
        let tool = request.name.to_string();
        // Nothing runs for a request nobody is known to have made, nor
        // for a caller the decision refuses.
        let (response, denied) = match decision {
            Err(why) => (Err(ErrorData::invalid_request(why, None)), false),
            Ok(Err(why)) => (
                Ok(CallToolResult::error(vec![ContentBlock::text(why)]).into()),
                true,
            ),
            Ok(Ok(())) => (self.dispatch(action, request, context).await, false),
        };
        let outcome = match &response {
            Ok(CallToolResponse::Complete(r)) if r.is_error == Some(true) => Outcome::ToolError,
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::ProtocolError,
        };
        let took = started.elapsed();
        self.daemon.metrics().record_call(&label, outcome, took);
        self.daemon
            .audit(nexus_storage::AuditRecord {
                id: 0,
                at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                identity: caller
                    .as_ref()
                    .map_or_else(|_| "unknown".to_owned(), |c| c.name.clone()),
                transport: transport.into(),
                tool: crate::daemon::audit::cut_name(&tool),
                vm,
                arguments,
                outcome: match (denied, outcome) {
                    (true, _) => "denied",
                    (_, Outcome::Ok) => "ok",
                    (_, Outcome::ToolError) => "tool_error",
                    (_, Outcome::ProtocolError) => "protocol_error",
                }
                .into(),
                duration_us: took.as_micros().min(i64::MAX as u128) as i64,
            })
            .await;
        response
    }

    #[allow(deprecated)] // MCP logging: deprecated in 2026-07-28, still what clients use
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.log_level.set(request.level);
        Ok(())
    }

    /// 2026-07-28 clients learn of tool list changes on a
    /// `subscriptions/listen` stream.
    fn accepted_subscription_filter(
        &self,
        _requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        // The SDK intersects this with what was requested and advertised.
        Some(SubscriptionFilter::builder().tools_list_changed().build())
    }

    /// A 2026-07-28 subscription: tool list changes if asked for, and VM
    /// events as log messages if the request carried a log level.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let viewer = self
            .caller(context.request_context())
            .map_err(|why| ErrorData::invalid_request(why, None))?;
        let wants_tools = context.accepted().tools_list_changed == Some(true);
        let log_level = logging::requested(&context);
        let mut changes = self.daemon.subscribe_changes();
        let mut events = self.daemon.subscribe_events();
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                changed = changes.recv(), if wants_tools => {
                    match changed {
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                        Ok(change) if !self.daemon.may_hear_change(&viewer, &change) => {}
                        // Missed changes are still a change.
                        _ if context.sink().notify_tool_list_changed().await.is_err() => return Ok(()),
                        _ => {}
                    }
                }
                event = events.recv(), if log_level.is_some() => {
                    match event {
                        Ok(event) => {
                            if let Some(min) = log_level
                                && self.daemon.may_hear(&viewer, &event)
                                && logging::send_on_subscription(&context, &event, min).await.is_err()
                            {
                                return Ok(());
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "a slow subscriber missed VM events");
                        }
                    }
                }
            }
        }
    }

    /// Tells a legacy (2025-11-25) session's client whenever VMs (and so
    /// tools) come and go, and what happens to them as log messages.
    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        // Changes of the tools, and events of the VMs, its caller may reach.
        let viewer = match context.extensions.get::<axum::http::request::Parts>() {
            Some(parts) => parts.extensions.get::<Identity>().cloned(),
            None => self.identity.clone(),
        };
        let Some(viewer) = viewer else {
            return;
        };
        let mut changes = self.daemon.subscribe_changes();
        let peer = context.peer.clone();
        let daemon = self.daemon.clone();
        let who = viewer.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = changes.recv() => match changed {
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        Ok(change) if !daemon.may_hear_change(&who, &change) => {}
                        // Missed changes are still a change.
                        _ => {
                            if peer.notify_tool_list_changed().await.is_err() {
                                return;
                            }
                        }
                    },
                    () = session_gone(&peer) => return,
                }
            }
        });
        tokio::spawn(logging::forward_to_session(
            self.daemon.clone(),
            self.daemon.subscribe_events(),
            context.peer,
            self.log_level.clone(),
            viewer,
        ));
    }

    #[allow(deprecated)] // enable_logging: see set_level
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_logging()
                .build(),
        )
        .with_server_info(Implementation::new("nexusd", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Nexus gives each agent its own microVM. spawn_vm makes one (list_images shows \
                 what it can be made from); each running VM's own tools (exec, files, processes) \
                 appear as VM__TOOL (or, on the shared surface, once as vm_TOOL with a `vm` \
                 argument). snapshot_drive, restore_snapshot and fork_vm checkpoint, roll back \
                 and branch a VM's workspace.",
        )
    }
}

/// Resolves once a session's transport has closed: what listens for it
/// must not outlive it until the next event.
pub(crate) async fn session_gone(peer: &rmcp::service::Peer<RoleServer>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        if peer.is_transport_closed() {
            return;
        }
    }
}

/// A result as structured content plus a readable text.
fn done<T: Serialize>(value: &T, text: impl Into<String>) -> Result<CallToolResult, String> {
    let json = serde_json::to_value(value).map_err(|e| format!("internal error: {e}"))?;
    let mut result = CallToolResult::success(vec![ContentBlock::text(text.into())]);
    result.structured_content = Some(json);
    Ok(result)
}
