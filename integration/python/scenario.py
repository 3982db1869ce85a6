"""Drives every nexusd tool, management and proxied, with the official
Python MCP client (the `mcp` package), in the full VM scenario: spawn,
exec with streamed progress, every guest tool, snapshot, change, restore
in place, fork, stop and start, destroy.

    scenario.py stdio MODE SURFACE PREFIX NEXUSD STATE_DIR
    scenario.py http MODE SURFACE PREFIX URL [TOKEN]

MODE is the client's protocol negotiation: "legacy" (2025-11-25 initialize
handshake) or "auto" (2026-07-28 discovery). SURFACE is how guest tools
are listed: "per-vm" (VM__TOOL) or "shared" (vm_TOOL with a `vm`
argument). PREFIX starts the names of the VMs made, so runs can share a
daemon. TOKEN is sent as `Authorization: Bearer TOKEN`. Also checks the era's log messages and tool list notifications.
Prints one JSON line describing what it saw; exits non-zero (with the
failed assertion) on any surprise.
"""

import asyncio
import base64
import json
import sys
import time

import httpx2
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

GUEST_TOOLS = [
    "exec", "process_start", "process_list", "process_status", "process_output",
    "process_write_stdin", "process_signal", "process_resize", "read_file", "write_file", "edit_file",
    "list_dir", "stat", "make_dir", "remove", "move", "copy", "glob", "grep", "system_info",
]
MANAGEMENT_TOOLS = [
    "spawn_vm", "list_vms", "get_vm", "start_vm", "stop_vm", "destroy_vm", "read_console",
    "list_images", "snapshot_drive", "list_snapshots", "restore_snapshot", "delete_snapshot",
    "fork_vm", "create_token", "list_tokens", "revoke_token", "read_audit", "give_vm",
    "set_role", "list_roles", "delete_role", "grant_vm", "revoke_grant", "list_grants",
    "build_image", "import_image", "pull_image", "delete_image", "set_egress",
    "set_secret", "list_secrets", "delete_secret", "grant_secret", "revoke_secret",
    "host_status", "pause_vm", "resume_vm",
]


class Seen:
    def __init__(self):
        self.logs = []
        self.list_changed = 0

    async def on_log(self, params):
        self.logs.append(params.data)

    async def on_message(self, message):
        if isinstance(message, types.ToolListChangedNotification):
            self.list_changed += 1


class Scenario:
    def __init__(self, client, surface, seen):
        self.client = client
        self.surface = surface
        self.seen = seen
        self.called = set()

    async def call(self, tool, args=None, progress=None):
        self.called.add(tool)
        result = await self.client.call_tool(tool, args or {}, progress_callback=progress)
        return result

    async def ok(self, tool, args=None, progress=None):
        result = await self.call(tool, args, progress)
        text = " ".join(c.text for c in result.content if getattr(c, "type", "") == "text")
        assert not result.is_error, f"{tool} {args}: {text}"
        assert result.structured_content is not None, f"{tool}: no structured content"
        return result.structured_content

    async def err(self, tool, args=None):
        result = await self.call(tool, args)
        assert result.is_error, f"{tool} {args} should have failed: {result}"
        return " ".join(c.text for c in result.content if getattr(c, "type", "") == "text")

    def guest_name(self, vm, tool):
        return f"{vm}__{tool}" if self.surface == "per-vm" else f"vm_{tool}"

    async def guest(self, vm, tool, args=None, progress=None):
        self.called.add("guest:" + tool)
        args = dict(args or {})
        if self.surface == "shared":
            args["vm"] = vm
        return await self.ok(self.guest_name(vm, tool), args, progress)

    async def tools(self):
        names, cursor = [], None
        while True:
            page = await self.client.list_tools(cursor=cursor, cache_mode="refresh")
            names += [t.name for t in page.tools]
            for t in page.tools:
                schema = json.dumps(t.input_schema) + json.dumps(t.output_schema or {})
                assert '"format": "uint' not in schema and '"format": "int' not in schema, (t.name, schema)
            cursor = page.next_cursor
            if not cursor:
                return names


async def wait_for(what, check, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def run(s, prefix, mode):
    a, b = f"{prefix}-a", f"{prefix}-b"
    names = await s.tools()
    for tool in MANAGEMENT_TOOLS:
        assert tool in names, f"{tool} missing from {names}"
    images = await s.ok("list_images")
    assert "default" in [i["name"] for i in images["images"]], images

    # An image from a recipe (on the default image's kernel), its build
    # reported line by line as progress.
    built_lines = []

    async def on_build(progress, total, message):
        built_lines.append(message)

    made = await s.ok("build_image", {"name": f"{prefix}-img", "recipe": 'env = { BUILT = "yes" }\n'},
                      progress=on_build)
    assert made["change"] == "added" and made["image"]["env"]["BUILT"] == "yes", made
    assert made["image"]["digest"].startswith("sha256:"), made
    assert any("mkfs.ext4" in line for line in built_lines), built_lines
    message = await s.err("import_image", {"name": f"{prefix}-x", "path": "relative/layout"})
    assert "must be absolute" in message, message
    message = await s.err("pull_image", {"name": f"{prefix}-x", "reference": "Not A Reference"})
    assert "is not an image reference" in message, message

    # Tokens (this client is an admin: root over stdio, the admin token
    # over HTTP): the secret once, never in the list, revoked for good.
    made = await s.ok("create_token", {"name": f"{prefix}-t", "expires_in_s": 3600})
    assert made["token"].startswith("nexus_") and made["role"] == "user", made
    tokens = await s.ok("list_tokens")
    assert f"{prefix}-t" in [t["name"] for t in tokens["tokens"]], tokens
    assert made["token"] not in json.dumps(tokens), tokens
    gone = await s.ok("revoke_token", {"name": f"{prefix}-t"})
    assert gone["state"] == "revoked", gone
    role = await s.ok("set_role", {"name": f"{prefix}-r", "tools": ["list_*", "vm_read_file"], "vms": "granted"})
    assert role["created"] and role["vms"] == "granted", role
    roles = await s.ok("list_roles")
    assert {"admin", "user", f"{prefix}-r"} <= {r["name"] for r in roles["roles"]}, roles

    steps = []

    async def on_spawn(progress, total, message):
        steps.append(message)

    vm = await s.ok("spawn_vm", {"name": a, "memory_mib": 128}, progress=on_spawn)
    assert vm["state"] == "running" and vm["name"] == a, vm
    assert len(steps) == 3 and steps[2].startswith(f"{a} is ready"), steps

    names = await s.tools()
    for tool in GUEST_TOOLS:
        assert s.guest_name(a, tool) in names, f"{s.guest_name(a, tool)} missing"
    if s.surface == "shared":
        assert not any("__" in n for n in names), names
    else:
        assert not any(n.startswith("vm_") for n in names), names

    listed = await s.ok("list_vms")
    assert [v["name"] for v in listed["vms"] if v["name"] == a] == [a], listed
    info = await s.ok("get_vm", {"vm": a})
    # Given back to whoever it is (the caller: an admin here).
    given = await s.ok("give_vm", {"vm": a, "owner": info["owner"]})
    assert given["owner"] == info["owner"] and info["owner"], (given, info)
    assert info["state"] == "running", info
    grant = await s.ok("grant_vm", {"vm": a, "identity": "anonymous"})
    assert grant["identity"] == "anonymous", grant
    grants = await s.ok("list_grants", {"vm": a})
    assert [g["identity"] for g in grants["grants"]] == ["anonymous"], grants
    await s.ok("revoke_grant", {"vm": a, "identity": "anonymous"})
    narrowed = await s.ok("set_egress", {"vm": a, "egress": ["pypi.org", "*.github.com"]})
    assert narrowed["egress"] == ["pypi.org", "*.github.com"], narrowed
    widened = await s.ok("set_egress", {"vm": a})
    assert widened["egress"] is None, widened
    # A secret: stored, granted, listed (never its value), revoked, deleted.
    key = "PY_" + "".join(c if c.isalnum() else "_" for c in prefix.upper())
    value = "py-secret-value-" + prefix
    made = await s.ok("set_secret", {"name": key, "value": value, "hosts": ["api.example.com"],
                                     "header": "Authorization: Bearer {secret}"})
    assert made["outcome"] == "created" and made["env"] == f"NEXUS_SECRET_{key}", made
    granted = await s.ok("grant_secret", {"name": key, "vm": a})
    assert granted["vms"] == [a], granted
    assert (await s.ok("get_vm", {"vm": a}))["secrets"] == [key]
    listed = await s.ok("list_secrets")
    assert key in [x["name"] for x in listed["secrets"]] and value not in json.dumps(listed), listed
    revoked = await s.ok("revoke_secret", {"name": key, "vm": a})
    assert revoked["vms"] == [], revoked
    await s.ok("delete_secret", {"name": key})
    gone = await s.err("delete_secret", {"name": key})
    assert "no secret named" in gone, gone
    await s.ok("delete_role", {"role": f"{prefix}-r"})
    # Paused: its tools answer so at once; resumed: they answer again.
    paused = await s.ok("pause_vm", {"vm": a})
    assert paused["state"] == "paused", paused
    guest_args = {"vm": a} if s.surface == "shared" else {}
    refused = await s.err(s.guest_name(a, "system_info"), guest_args)
    assert "is paused" in refused, refused
    resumed = await s.ok("resume_vm", {"vm": a})
    assert resumed["state"] == "running", resumed
    status = await s.ok("host_status")
    assert status["accel"] in ("kvm", "tcg") and status["accel_reason"], status
    assert status["vms"]["running"] >= 1 and status["pool"]["free_bytes"] > 0, status
    assert "minimal" in status["images"] or "default" in status["images"], status
    console = await s.ok("read_console", {"vm": a, "lines": 200})
    assert console["text"], console

    # exec, its output streamed as progress before the result.
    out_progress = []

    async def on_exec(progress, total, message):
        out_progress.append(message)

    out = await s.guest(a, "exec", {"command": "echo one; sleep 0.3; echo two; uname -s"}, progress=on_exec)
    assert out["exit_code"] == 0 and out["stdout"] == "one\ntwo\nLinux\n", out
    streamed = "".join(m.removeprefix("stdout: ") for m in out_progress if m.startswith("stdout: "))
    assert streamed == "one\ntwo\nLinux\n" and len(out_progress) >= 2, out_progress
    failed = await s.guest(a, "exec", {"command": "exit 3"})
    assert failed["exit_code"] == 3, failed

    # Files.
    await s.guest(a, "make_dir", {"path": "src/deep", "parents": True})
    await s.guest(a, "write_file", {"path": "src/notes.txt", "content": "v1\nhello world\n"})
    await s.guest(a, "edit_file", {"path": "src/notes.txt", "old_string": "hello", "new_string": "goodbye"})
    read = await s.guest(a, "read_file", {"path": "src/notes.txt"})
    assert read["content"] == "v1\ngoodbye world\n", read
    await s.guest(a, "copy", {"source": "src/notes.txt", "destination": "src/copy.txt"})
    await s.guest(a, "move", {"source": "src/copy.txt", "destination": "src/deep/moved.txt"})
    stat = await s.guest(a, "stat", {"path": "src/deep/moved.txt"})
    assert stat["type"] == "file" and stat["size"] == 17, stat
    listing = await s.guest(a, "list_dir", {"path": "src", "depth": 2})
    paths = sorted(e["path"] for e in listing["entries"])
    assert "deep/moved.txt" in paths and "notes.txt" in paths, paths
    found = await s.guest(a, "glob", {"pattern": "**/*.txt"})
    assert "src/deep/moved.txt" in found["paths"], found
    grep = await s.guest(a, "grep", {"pattern": "goodbye", "path": "src"})
    assert grep["matches"] == 2, grep
    await s.guest(a, "remove", {"path": "src/deep", "recursive": True})
    system = await s.guest(a, "system_info")
    assert system["cpus"] >= 1 and system["kernel"], system

    # Background processes.
    started = await s.guest(a, "process_start", {"command": "read line; echo got $line; sleep 300", "stdin": True})
    pid = started["id"]
    await s.guest(a, "process_write_stdin", {"id": pid, "data": "ping\n"})
    output = await s.guest(a, "process_output", {"id": pid, "wait_ms": 5000})
    text = output["stdout"]["data"]
    if output["stdout"]["encoding"] == "base64":
        text = base64.b64decode(text).decode()
    assert "got ping" in text, output
    procs = await s.guest(a, "process_list")
    assert pid in [p["id"] for p in procs["processes"]], procs
    await s.guest(a, "process_signal", {"id": pid, "signal": "TERM", "group": True})
    for _ in range(100):
        status = await s.guest(a, "process_status", {"id": pid})
        if status["state"] != "running":
            break
        await asyncio.sleep(0.05)
    assert status["state"] == "exited", status
    # A process on a terminal: typed to, resized, its size seen.
    tty = await s.guest(a, "process_start", {"argv": ["sh"], "tty": {"rows": 24, "cols": 80}})
    assert tty["tty"] is True, tty
    resized = await s.guest(a, "process_resize", {"id": tty["id"], "rows": 33, "cols": 101})
    assert (resized["rows"], resized["cols"]) == (33, 101), resized
    await s.guest(a, "process_write_stdin", {"id": tty["id"], "data": "stty size; exit 4\n"})
    seen = ""
    for _ in range(50):
        output = await s.guest(a, "process_output", {"id": tty["id"], "wait_ms": 2000})
        seen = output["stdout"]["data"]
        if output["process"]["state"] != "running":
            break
    assert "33 101" in seen and output["process"]["exit_code"] == 4, output

    # Snapshot, change, restore in place (the VM keeps running), fork.
    cid = info["cid"]
    snap = await s.ok("snapshot_drive", {"vm": a, "name": "s1"})
    assert snap["vm"] == a and snap["name"] == "s1", snap
    await s.guest(a, "write_file", {"path": "src/notes.txt", "content": "v2\n"})
    snaps = await s.ok("list_snapshots", {"vm": a})
    assert [x["name"] for x in snaps["snapshots"]] == ["s1"], snaps
    await s.ok("restore_snapshot", {"vm": a, "snapshot": "s1"})
    info = await s.ok("get_vm", {"vm": a})
    assert info["state"] == "running" and info["cid"] == cid, info
    assert info["from_vm"] == a and info["from_snapshot"] == "s1", info
    read = await s.guest(a, "read_file", {"path": "src/notes.txt"})
    assert read["content"] == "v1\ngoodbye world\n", read
    fork = await s.ok("fork_vm", {"vm": a, "snapshot": "s1", "name": b})
    assert fork["state"] == "running", fork
    assert fork["snapshot"] == "s1" and [v["name"] for v in fork["vms"]] == [b], fork
    await s.guest(b, "write_file", {"path": "src/notes.txt", "content": "b's\n"})
    assert (await s.guest(a, "read_file", {"path": "src/notes.txt"}))["content"] == "v1\ngoodbye world\n"
    assert (await s.guest(b, "read_file", {"path": "src/notes.txt"}))["content"] == "b's\n"

    # Bad input: a clear tool error, nothing changed.
    message = await s.err("fork_vm", {"vm": a, "snapshot": "nope"})
    assert "has no snapshot" in message, message
    message = await s.err("fork_vm", {"vm": a, "count": 0})
    assert "`count` must be between 1 and 16, got 0" in message, message
    message = await s.err(s.guest_name("ghost", "exec"), {"command": "true", **({"vm": "ghost"} if s.surface == "shared" else {})})
    assert "does not exist" in message, message

    # Stop and start keep the workspace.
    stopped = await s.ok("stop_vm", {"vm": b})
    assert stopped["state"] == "stopped", stopped
    started = await s.ok("start_vm", {"vm": b})
    assert started["state"] == "running", started
    assert (await s.guest(b, "read_file", {"path": "src/notes.txt"}))["content"] == "b's\n"

    await s.ok("delete_snapshot", {"vm": a, "snapshot": "s1"})
    # The audit trail has this run's calls on its VM (written in batches:
    # the newest may take a moment).
    async def audited():
        rows = (await s.ok("read_audit", {"vm": a, "limit": 1000}))["records"]
        return {r["tool"] for r in rows}
    for _ in range(100):
        tools = await audited()
        if {"spawn_vm", "snapshot_drive", "restore_snapshot"} <= tools:
            break
        await asyncio.sleep(0.05)
    assert {"spawn_vm", "snapshot_drive", "restore_snapshot"} <= tools, tools
    message = await s.err("delete_image", {"image": "default"})
    assert "is used by VMs" in message and a in message, message
    for vm in (b, a):
        await s.ok("destroy_vm", {"vm": vm})
    await s.ok("delete_image", {"image": f"{prefix}-img"})
    listed = await s.ok("list_vms")
    assert not [v for v in listed["vms"] if v["name"] in (a, b)], listed

    # Every tool was called.
    for tool in MANAGEMENT_TOOLS:
        assert tool in s.called, f"{tool} was not called"
    for tool in GUEST_TOOLS:
        assert "guest:" + tool in s.called, f"guest tool {tool} was not called"

    # What the era delivers unasked: VM events as log messages, and news
    # of tool list changes.
    # (The last event: `a` is destroyed after `b`; a log message may
    # arrive after the result of the call that caused it.)
    await wait_for("log messages for the VMs", lambda: any(
        isinstance(d, dict) and d.get("vm") == a and d.get("event") == "destroyed" for d in s.seen.logs))
    events = {(d["vm"], d["event"]) for d in s.seen.logs if isinstance(d, dict) and "vm" in d}
    for expected in [(a, "started"), (b, "started"), (b, "stopped"), (a, "destroyed")]:
        assert expected in events, (expected, events)
    await wait_for("tools/list_changed", lambda: s.seen.list_changed >= 1)
    return {"mode": mode, "surface": s.surface, "tools": len(names), "events": len(events),
            "list_changed": s.seen.list_changed}


async def main():
    transport, mode, surface, prefix = sys.argv[1:5]
    seen = Seen()
    http = None
    if transport == "stdio":
        args = ["--state-dir", sys.argv[6], "stdio"]
        if surface == "shared":
            args += ["--surface", "shared"]
        target = StdioServerParameters(command=sys.argv[5], args=args)
    else:
        url = sys.argv[5] + ("?surface=shared" if surface == "shared" else "")
        headers = {"Authorization": f"Bearer {sys.argv[6]}"} if len(sys.argv) > 6 else {}
        # The client's own HTTP client, with the header; the mcp package's
        # default timeouts.
        http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))
        target = streamable_http_client(url, http_client=http)
    async with Client(
        target,
        mode=mode,
        logging_callback=seen.on_log,
        message_handler=seen.on_message,
        log_level="info" if mode != "legacy" else None,
    ) as client:
        expected = "2025-11-25" if mode == "legacy" else "2026-07-28"
        assert client.protocol_version == expected, client.protocol_version
        s = Scenario(client, surface, seen)
        if mode == "legacy":
            await client.set_logging_level("info")
            result = await run(s, prefix, mode)
        else:
            async with client.listen(tools_list_changed=True) as sub:

                async def count():
                    async for event in sub:
                        seen.list_changed += 1

                counter = asyncio.ensure_future(count())
                try:
                    result = await run(s, prefix, mode)
                finally:
                    counter.cancel()
    if http is not None:
        # The package leaves a client it was given to its owner.
        await http.aclose()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
