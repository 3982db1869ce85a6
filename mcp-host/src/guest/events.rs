//! Progress a guest reports for a proxied call, routed back to the caller
//! that made it by the guest-side progress token.
//!
//! Progress is taken off the guest's stream by [`Tapped`], in order, as
//! each message is read: rmcp hands notifications to handlers on tasks of
//! their own, so a progress notification could otherwise be handled after
//! the response that followed it (and be lost, or overtake another).
//! Routes are bounded: a guest that floods progress loses the excess (the
//! result still carries the output), and one message carries at most
//! [`MAX_MESSAGE_BYTES`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rmcp::RoleClient;
use rmcp::model::{
    JsonRpcMessage, JsonRpcNotification, ProgressNotificationParam, ProgressToken,
    ServerNotification,
};
use rmcp::transport::Transport;
use rmcp::transport::async_rw::AsyncRwTransport;
use tokio::sync::mpsc;

/// Progress messages queued per call before the excess is dropped.
pub const ROUTE_CAPACITY: usize = 64;
/// The longest progress message passed on; longer ones are cut.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

type Routes = HashMap<ProgressToken, mpsc::Sender<ProgressNotificationParam>>;

/// Where each in-flight proxied call's progress goes.
#[derive(Clone, Default)]
pub struct GuestEvents {
    routes: Arc<Mutex<Routes>>,
}

impl GuestEvents {
    /// Sends the guest's progress for `token` to the returned receiver
    /// until the [`ProgressRoute`] is dropped.
    pub fn route(
        &self,
        token: ProgressToken,
    ) -> (ProgressRoute, mpsc::Receiver<ProgressNotificationParam>) {
        let (tx, rx) = mpsc::channel(ROUTE_CAPACITY);
        self.lock().insert(token.clone(), tx);
        (
            ProgressRoute {
                events: self.clone(),
                token,
            },
            rx,
        )
    }

    fn deliver(&self, mut params: ProgressNotificationParam) {
        // Only the message goes on (bounded); the guest's metadata does not.
        params.meta = None;
        if let Some(message) = &params.message
            && message.len() > MAX_MESSAGE_BYTES
        {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            let dropped = message.len() - cut;
            // A new, small string: cutting in place keeps the large buffer.
            params.message = Some(format!(
                "{}\n[... {dropped} bytes not shown]",
                &message[..cut]
            ));
        }
        if let Some(to) = self.lock().get(&params.progress_token) {
            // Full: the caller is not keeping up; progress is best effort.
            let _ = to.try_send(params);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
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

/// The guest's transport, with its progress notifications taken off and
/// routed as they are read.
pub struct Tapped<R, W>
where
    R: tokio::io::AsyncRead,
    W: tokio::io::AsyncWrite,
{
    inner: AsyncRwTransport<RoleClient, R, W>,
    events: GuestEvents,
}

impl<R, W> Tapped<R, W>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
    W: tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    pub fn new(read: R, write: W, events: GuestEvents) -> Self {
        Self {
            inner: AsyncRwTransport::new_client(read, write),
            events,
        }
    }
}

impl<R, W> Transport<RoleClient> for Tapped<R, W>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
    W: tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: rmcp::service::TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<rmcp::service::RxJsonRpcMessage<RoleClient>> {
        loop {
            match self.inner.receive().await? {
                // Taken, not copied: a guest's progress message can be large.
                JsonRpcMessage::Notification(JsonRpcNotification {
                    notification: ServerNotification::ProgressNotification(progress),
                    ..
                }) => self.events.deliver(progress.params),
                // nexusd asks nothing of a guest but answers: requests from
                // it (each would get a task and a reply it may never read)
                // and other notifications are dropped here.
                JsonRpcMessage::Request(_) | JsonRpcMessage::Notification(_) => {}
                answer => return Some(answer),
            }
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}
