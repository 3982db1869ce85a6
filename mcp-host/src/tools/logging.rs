//! VM events as MCP log messages (`notifications/message`), for both eras:
//!
//! - 2025-11-25 sessions: from `initialized` on, at or above the level the
//!   client set with `logging/setLevel` (warnings and errors until it does:
//!   a boot failure or a dead VM is news a client wants unasked);
//! - 2026-07-28 clients: on a `subscriptions/listen` stream whose request
//!   carried `io.modelcontextprotocol/logLevel` in its `_meta` (the
//!   era's opt-in), at or above that level. They are not stamped with the
//!   subscription's id: a subscription filter has no place for log
//!   messages, and clients (rmcp's) end a subscription that receives a
//!   stamped notification it did not ask for; unstamped, they reach the
//!   client's log handler.
#![allow(deprecated)] // MCP logging is deprecated in 2026-07-28 (SEP-2577), still what clients use

use std::sync::{Arc, Mutex};

use rmcp::RoleServer;
use rmcp::model::{
    LoggingLevel, LoggingMessageNotification, LoggingMessageNotificationParam, ServerNotification,
};
use rmcp::service::{Peer, SubscriptionContext};
use tokio::sync::broadcast;

use crate::daemon::{Severity, VmEvent};

/// The logger name nexusd's messages carry.
const LOGGER: &str = "nexusd";

/// The level one legacy session asked for.
#[derive(Clone)]
pub struct SessionLevel(Arc<Mutex<LoggingLevel>>);

impl Default for SessionLevel {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(LoggingLevel::Warning)))
    }
}

impl SessionLevel {
    pub fn set(&self, level: LoggingLevel) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = level;
    }

    fn get(&self) -> LoggingLevel {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The level a 2026-07-28 subscription asked for, if any.
pub fn requested(context: &SubscriptionContext) -> Option<LoggingLevel> {
    context.request_context().meta.log_level()
}

fn rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

fn level_of(severity: Severity) -> LoggingLevel {
    match severity {
        Severity::Debug => LoggingLevel::Debug,
        Severity::Info => LoggingLevel::Info,
        Severity::Notice => LoggingLevel::Notice,
        Severity::Warning => LoggingLevel::Warning,
        Severity::Error => LoggingLevel::Error,
    }
}

/// The message for `event`, if it is at or above `min`.
fn message(event: &VmEvent, min: LoggingLevel) -> Option<LoggingMessageNotification> {
    let level = level_of(event.severity);
    if rank(level) < rank(min) {
        return None;
    }
    let data = serde_json::to_value(event).ok()?;
    Some(LoggingMessageNotification::new(
        LoggingMessageNotificationParam::new(level, data).with_logger(LOGGER),
    ))
}

/// Sends VM events to a legacy session until it goes away.
pub async fn forward_to_session(
    daemon: std::sync::Arc<crate::daemon::Daemon>,
    mut events: broadcast::Receiver<VmEvent>,
    peer: Peer<RoleServer>,
    level: SessionLevel,
    viewer: crate::identity::Identity,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = super::session_gone(&peer) => return,
        };
        match event {
            Ok(event) => {
                if !daemon.may_hear(&viewer, &event) {
                    continue;
                }
                if let Some(note) = message(&event, level.get())
                    && peer.notify_logging_message(note.params).await.is_err()
                {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "a slow session missed VM events");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends one VM event on a 2026-07-28 subscription's stream.
pub async fn send_on_subscription(
    context: &SubscriptionContext,
    event: &VmEvent,
    min: LoggingLevel,
) -> Result<(), rmcp::ServiceError> {
    let Some(note) = message(event, min) else {
        return Ok(());
    };
    context
        .request_context()
        .peer
        .send_notification(ServerNotification::LoggingMessageNotification(note))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::EventKind;

    #[test]
    fn events_below_the_level_are_not_sent() {
        let died = VmEvent::new("a", EventKind::Died, "VM a exited").with_console("panic\nend");
        let started = VmEvent::new("a", EventKind::Started, "VM a started");
        assert!(message(&started, LoggingLevel::Warning).is_none());
        let note = message(&died, LoggingLevel::Warning).expect("an error passes a warning level");
        assert_eq!(note.params.level, LoggingLevel::Error);
        assert_eq!(note.params.logger.as_deref(), Some("nexusd"));
        assert_eq!(note.params.data["vm"], "a");
        assert_eq!(note.params.data["event"], "died");
        assert_eq!(note.params.data["console"][0], "panic");
        assert!(message(&started, LoggingLevel::Debug).is_some());
        assert!(message(&died, LoggingLevel::Critical).is_none());
    }
}
