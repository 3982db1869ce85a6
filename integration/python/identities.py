"""Every way nexusd refuses a caller, driven with the official Python MCP
client (the `mcp` package), as an outsider would meet them.

    identities.py http URL ADMIN_TOKEN
    identities.py socket ADMIN_SOCKET
    identities.py tls URL TOKEN CA_FILE

http: no token, an unknown, a revoked and an expired one (a bare 401 with
`WWW-Authenticate: Bearer`); a tool the caller's role does not allow; a VM
of another identity named by prefix, by `vm` argument and by snapshot
reference; a quota; identity administration by a non-admin. Each refusal
changes nothing, and the trail has a `denied` row for each, with no secret.

socket: run as a local user who is not an admin (the test starts it under
another uid): it is `uid:N` with the user role, sees no admin tool, and is
refused another's VM and identity administration.

tls: nexusd serves HTTPS with its own certificate (CA_FILE verifies it):
the client works through it, no token is still a 401, plain HTTP gets no
answer.

Prints one JSON line of what it saw; exits non-zero on any surprise.
"""

import asyncio
import json
import os
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {},
               "clientInfo": {"name": "identities.py", "version": "1"}},
}


class Caller:
    """One identity's MCP session; counts the refusals it met."""

    def __init__(self, client):
        self.client = client
        self.refused = 0

    async def call(self, tool, args=None):
        result = await self.client.call_tool(tool, args or {})
        text = " ".join(c.text for c in result.content if getattr(c, "type", "") == "text")
        return result, text

    async def ok(self, tool, args=None):
        result, text = await self.call(tool, args)
        assert not result.is_error, f"{tool} {args}: {text}"
        return result.structured_content

    async def err(self, tool, args, says):
        result, text = await self.call(tool, args)
        assert result.is_error, f"{tool} {args} should have been refused: {text}"
        assert says in text, f"{tool} {args}: expected {says!r} in {text!r}"
        self.refused += 1
        return text

    async def tools(self):
        names, cursor = [], None
        while True:
            page = await self.client.list_tools(cursor=cursor, cache_mode="refresh")
            names += [t.name for t in page.tools]
            cursor = page.next_cursor
            if not cursor:
                return names


async def session(url, token=None, transport=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, transport=transport,
                              timeout=httpx2.Timeout(30, read=300))
    return http, streamable_http_client(url, http_client=http)


async def refused_with_401(url, token):
    headers = {"Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx2.AsyncClient() as http:
        r = await http.post(url, json=INIT, headers=headers)
    assert r.status_code == 401, (token and token[:8], r.status_code, r.text)
    assert r.headers.get("www-authenticate", "").startswith("Bearer"), r.headers
    assert "nexus_" not in r.text, r.text


async def with_session(url, token, body):
    http, target = await session(url, token)
    try:
        async with Client(target, mode="auto") as client:
            return await body(Caller(client))
    finally:
        await http.aclose()


async def over_http(url, admin_token):
    await refused_with_401(url, None)
    await refused_with_401(url, "nexus_" + "0" * 64)
    secrets = {}

    async def as_admin(admin):
        await admin.ok("set_role", {"name": "py-reader", "tools": ["list_*", "get_vm", "vm_read_file"],
                                    "vms": "own"})
        await admin.ok("set_role", {"name": "py-small", "tools": ["*"], "vms": "own",
                                    "quota": {"max_workspace_gib": 1}})
        for name, role, expires in [("py-owner", "user", None), ("py-reader", "py-reader", None),
                                    ("py-small", "py-small", None), ("py-old", "user", None),
                                    ("py-late", "user", 1)]:
            args = {"name": name, "role": role}
            if expires:
                args["expires_in_s"] = expires
            secrets[name] = (await admin.ok("create_token", args))["token"]
        await admin.ok("revoke_token", {"name": "py-old"})
    await with_session(url, admin_token, as_admin)

    # Revoked and (after its second) expired tokens are refused like no token.
    await refused_with_401(url, secrets["py-old"])
    await asyncio.sleep(1.5)
    await refused_with_401(url, secrets["py-late"])

    async def as_owner(owner):
        vm = await owner.ok("spawn_vm", {"name": "pyvm", "memory_mib": 128})
        assert vm["owner"] == "token:py-owner", vm
        await owner.ok("snapshot_drive", {"vm": "pyvm", "name": "s"})
    await with_session(url, secrets["py-owner"], as_owner)

    denied = {}

    async def as_reader(reader):
        names = await reader.tools()
        assert all(n.startswith("list_") or n == "get_vm" for n in names), names
        listed = await reader.ok("list_vms")
        assert listed["vms"] == [], listed
        await reader.err("spawn_vm", {"name": "mine"}, "does not allow tool spawn_vm")
        await reader.err("create_token", {"name": "mine"}, "needs the admin role")
        # Building and importing images act as root on the host.
        await reader.err("build_image", {"name": "mine", "recipe": ""}, "needs the admin role")
        await reader.err("import_image", {"name": "mine", "path": "/tmp"}, "needs the admin role")
        await reader.err("pull_image", {"name": "mine", "reference": "a.b/c:d"}, "needs the admin role")
        # Secrets are the admin's alone.
        await reader.err("set_secret", {"name": "MINE", "value": "v", "hosts": ["a.b"]}, "needs the admin role")
        await reader.err("list_secrets", {}, "needs the admin role")
        await reader.err("host_status", {}, "needs the admin role")
        for tool, args in [
            ("pyvm__read_file", {"path": "/etc/hostname"}),
            ("vm_read_file", {"vm": "pyvm", "path": "/etc/hostname"}),
            ("get_vm", {"vm": "pyvm"}),
            ("list_snapshots", {"vm": "pyvm"}),
        ]:
            await reader.err(tool, args, "does not exist among yours (token:py-reader)")
        denied["py-reader"] = reader.refused
    await with_session(url, secrets["py-reader"], as_reader)

    async def as_small(small):
        await small.err("fork_vm", {"vm": "pyvm", "snapshot": "s", "name": "stolen"},
                        "does not exist among yours (token:py-small)")
        await small.err("spawn_vm", {"name": "stolen", "from_vm": "pyvm", "from_snapshot": "s"},
                        "does not exist among yours")
        denied["py-small"] = small.refused
        # A quota is a tool error, not a denial: not counted.
        await small.err("spawn_vm", {"name": "big", "workspace_gib": 2}, "max_workspace_gib")
        assert (await small.ok("list_vms"))["vms"] == []
    await with_session(url, secrets["py-small"], as_small)

    async def check_trail(admin):
        # Nothing changed: one VM, its one snapshot, no "stolen" or "big".
        vms = [v["name"] for v in (await admin.ok("list_vms"))["vms"]]
        assert "pyvm" in vms and not {"stolen", "big", "mine"} & set(vms), vms
        snaps = (await admin.ok("list_snapshots", {"vm": "pyvm"}))["snapshots"]
        assert [s["name"] for s in snaps] == ["s"], snaps
        for who, count in denied.items():
            for _ in range(100):
                rows = (await admin.ok("read_audit", {"identity": f"token:{who}", "limit": 1000}))["records"]
                got = sum(1 for r in rows if r["outcome"] == "denied")
                if got >= count:
                    break
                await asyncio.sleep(0.05)
            assert got == count, (who, got, rows)
            assert all(r["transport"] == "http" for r in rows), rows
        trail = json.dumps(await admin.ok("read_audit", {"limit": 1000}))
        for secret in secrets.values():
            assert secret not in trail, "a token's secret is in the trail"
        await admin.ok("destroy_vm", {"vm": "pyvm"})
    await with_session(url, admin_token, check_trail)
    return {"denied": denied, "tokens": len(secrets)}


async def over_socket(path):
    uid = os.getuid()
    transport = httpx2.AsyncHTTPTransport(uds=path)
    http, target = await session("http://localhost/mcp", transport=transport)
    try:
        async with Client(target, mode="auto") as client:
            me = Caller(client)
            names = await me.tools()
            assert "list_vms" in names and "create_token" not in names, names
            assert "build_image" not in names and "list_images" in names, names
            await me.err("create_token", {"name": "mine"}, f"(uid:{uid}) has role \"user\"")
            await me.err("get_vm", {"vm": "rootvm"}, f"does not exist among yours (uid:{uid})")
            await me.err("rootvm__exec", {"command": "id"}, "does not exist among yours")
            listed = await me.ok("list_vms")
            assert listed["vms"] == [], listed
    finally:
        await http.aclose()
    return {"uid": uid, "tools": len(names)}


async def over_tls(url, token, cafile):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, verify=cafile,
                              timeout=httpx2.Timeout(30, read=300))
    try:
        async with Client(streamable_http_client(url, http_client=http), mode="auto") as client:
            me = Caller(client)
            names = await me.tools()
            assert "spawn_vm" in names and "create_token" in names, names
            listed = await me.ok("list_vms")
            assert listed["vms"] == [], listed
    finally:
        await http.aclose()
    async with httpx2.AsyncClient(verify=cafile) as bare:
        r = await bare.post(url, json=INIT, headers={"Accept": "application/json, text/event-stream"})
        assert r.status_code == 401, r.status_code
    try:
        async with httpx2.AsyncClient() as plain:
            r = await plain.post(url.replace("https://", "http://"), json=INIT)
        raise AssertionError(f"plain HTTP was answered: {r.status_code}")
    except httpx2.HTTPError:
        pass
    return {"tls": True, "tools": len(names)}


async def main():
    if sys.argv[1] == "http":
        result = await over_http(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "tls":
        result = await over_tls(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        result = await over_socket(sys.argv[2])
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
