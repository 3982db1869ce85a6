//! The host's use of the guest control channel (vsock port 1023).

use std::path::Path;
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;

use crate::vsock;

/// Asks guest-mcp to power the VM off. Returns once the guest accepted,
/// or fails when the whole exchange (connect, handshake, call) takes more
/// than `timeout`: a guest whose guest-mcp is stopped or wedged accepts
/// the connection in its kernel and then says nothing.
pub async fn request_poweroff(uds: &Path, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, exchange(uds, timeout))
        .await
        .map_err(|_| format!("the guest did not answer within {timeout:?}"))?
}

async fn exchange(uds: &Path, timeout: Duration) -> Result<(), String> {
    let stream = vsock::connect(uds, crate::GUEST_CONTROL_PORT, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let client = ().serve(stream).await.map_err(|e| format!("MCP initialization failed: {e}"))?;
    let result = client
        .call_tool(CallToolRequestParams::new("shutdown"))
        .await
        .map_err(|e| format!("shutdown call failed: {e}"))?;
    let _ = client.cancel().await;
    if result.is_error == Some(true) {
        return Err(format!("guest refused to shut down: {:?}", result.content));
    }
    Ok(())
}
