//! What a guest-mcp session tells nexusd on its own: progress the guest
//! reports for a proxied call, routed back to the caller that made it by
//! the guest-side progress token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::NotificationContext;
use rmcp::{ClientHandler, RoleClient};
use tokio::sync::mpsc::UnboundedSender;

/// Where each in-flight proxied call's progress goes.
#[derive(Clone, Default)]
pub struct GuestEvents {
    routes: Arc<Mutex<HashMap<ProgressToken, UnboundedSender<ProgressNotificationParam>>>>,
}

impl GuestEvents {
    /// Sends the guest's progress for `token` to `to` until `ProgressRoute`
    /// is dropped.
    pub fn route(
        &self,
        token: ProgressToken,
        to: UnboundedSender<ProgressNotificationParam>,
    ) -> ProgressRoute {
        self.lock().insert(token.clone(), to);
        ProgressRoute {
            events: self.clone(),
            token,
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ProgressToken, UnboundedSender<ProgressNotificationParam>>>
    {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes its route when dropped.
pub struct ProgressRoute {
    events: GuestEvents,
    token: ProgressToken,
}

impl Drop for ProgressRoute {
    fn drop(&mut self) {
        self.events.lock().remove(&self.token);
    }
}

impl ClientHandler for GuestEvents {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        if let Some(to) = self.lock().get(&params.progress_token) {
            let _ = to.send(params);
        }
    }
}
