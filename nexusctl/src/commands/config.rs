//! `nexusctl mcp-config`: client configuration to paste, for launching
//! `nexusd stdio` or for HTTP with a token.

use clap::ValueEnum;
use serde_json::json;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ClientKind {
    /// Claude Code (`.mcp.json`, or `claude mcp add-json nexus '<json>'`).
    ClaudeCode,
    /// Claude Desktop (`claude_desktop_config.json`).
    ClaudeDesktop,
    /// The Python `mcp` package.
    Python,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  nexusctl mcp-config claude-code\n  nexusctl mcp-config claude-desktop --http http://127.0.0.1:7777 --token-env NEXUS_TOKEN"
)]
pub struct ConfigArgs {
    pub client: ClientKind,
    /// Over HTTP at this address instead of launching `nexusd stdio`.
    #[arg(long)]
    pub http: Option<String>,
    /// With --http: the environment variable the client reads the token
    /// from (the token itself is never printed).
    #[arg(long, default_value = "NEXUS_TOKEN")]
    pub token_env: String,
    /// nexusd's path, for launching it (default: `nexusd` on PATH).
    #[arg(long, default_value = "nexusd")]
    pub nexusd: String,
}

/// The configuration text.
pub fn render(args: &ConfigArgs) -> String {
    let url = args.http.as_ref().map(|u| {
        let u = u.trim_end_matches('/');
        if u.ends_with("/mcp") {
            u.to_owned()
        } else {
            format!("{u}/mcp")
        }
    });
    let token = format!("${{{}}}", args.token_env);
    match (args.client, url) {
        (ClientKind::Python, None) => format!(
            "from mcp import ClientSession, StdioServerParameters\nfrom mcp.client.stdio import stdio_client\n\nparams = StdioServerParameters(command={:?}, args=[\"stdio\"])\nasync with stdio_client(params) as (read, write):\n    async with ClientSession(read, write) as session:\n        await session.initialize()\n",
            args.nexusd
        ),
        (ClientKind::Python, Some(url)) => format!(
            "import os\nfrom mcp import ClientSession\nfrom mcp.client.streamable_http import streamablehttp_client\n\nheaders = {{\"Authorization\": \"Bearer \" + os.environ[{:?}]}}\nasync with streamablehttp_client({url:?}, headers=headers) as (read, write, _):\n    async with ClientSession(read, write) as session:\n        await session.initialize()\n",
            args.token_env
        ),
        (_, None) => {
            pretty(&json!({"mcpServers": {"nexus": {"command": args.nexusd, "args": ["stdio"]}}}))
        }
        (ClientKind::ClaudeCode, Some(url)) => pretty(&json!({"mcpServers": {"nexus": {
            "type": "http", "url": url, "headers": {"Authorization": format!("Bearer {token}")}}}})),
        // Claude Desktop launches local commands: a bridge to HTTP.
        (ClientKind::ClaudeDesktop, Some(url)) => pretty(&json!({"mcpServers": {"nexus": {
            "command": "npx", "args": ["-y", "mcp-remote", url, "--header", format!("Authorization: Bearer {token}")]}}})),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(client: ClientKind, http: Option<&str>) -> ConfigArgs {
        ConfigArgs {
            client,
            http: http.map(str::to_owned),
            token_env: "NEXUS_TOKEN".into(),
            nexusd: "nexusd".into(),
        }
    }

    #[test]
    fn each_client_gets_its_own_form_and_never_a_token() {
        let stdio: serde_json::Value =
            serde_json::from_str(&render(&args(ClientKind::ClaudeCode, None))).unwrap_or_default();
        assert_eq!(stdio["mcpServers"]["nexus"]["args"][0], "stdio");
        let http: serde_json::Value = serde_json::from_str(&render(&args(
            ClientKind::ClaudeCode,
            Some("http://127.0.0.1:7777"),
        )))
        .unwrap_or_default();
        assert_eq!(
            http["mcpServers"]["nexus"]["url"],
            "http://127.0.0.1:7777/mcp"
        );
        assert_eq!(
            http["mcpServers"]["nexus"]["headers"]["Authorization"],
            "Bearer ${NEXUS_TOKEN}"
        );
        assert!(
            render(&args(ClientKind::Python, None))
                .contains("StdioServerParameters(command=\"nexusd\"")
        );
        assert!(
            render(&args(ClientKind::ClaudeDesktop, Some("http://h:1"))).contains("mcp-remote")
        );
    }
}
