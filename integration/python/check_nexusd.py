"""Drives nexusd with the official Python MCP client (the `mcp` package).

    check_nexusd.py stdio MODE NEXUSD STATE_DIR
    check_nexusd.py http MODE URL

MODE is the client's protocol negotiation: "legacy" (2025-11-25 initialize
handshake) or "auto" (2026-07-28 discovery, falling back to the handshake).
Prints one JSON line describing what it saw; exits non-zero on any surprise.
"""

import asyncio
import json
import sys

from mcp import Client, StdioServerParameters


async def check(target, mode):
    async with Client(target, mode=mode) as client:
        tools = await client.list_tools()
        names = sorted(t.name for t in tools.tools)
        for needed in ("list_images", "spawn_vm", "snapshot_drive", "restore_snapshot", "fork_vm"):
            assert needed in names, f"{needed} missing from {names}"
        images = await client.call_tool("list_images", {})
        assert not images.is_error, images
        image_names = [i["name"] for i in images.structured_content["images"]]
        missing = await client.call_tool("vm_info", {"vm": "ghost"})
        assert missing.is_error, missing
        message = missing.content[0].text
        assert "does not exist" in message, message
        return {"tools": len(names), "images": image_names, "error": message}


def main():
    transport, mode = sys.argv[1], sys.argv[2]
    if transport == "stdio":
        target = StdioServerParameters(command=sys.argv[3], args=["--state-dir", sys.argv[4], "stdio"])
    else:
        target = sys.argv[3]
    print(json.dumps(asyncio.run(check(target, mode))))


if __name__ == "__main__":
    main()
