"""Nodes without eth_simulateV1 (older geth, many providers): the engine falls back to
eth_estimateGas + eth_call and still pays everyone once, isolating a refused recipient."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.sender import METER_TRIES
from tests.conftest import Env


class NoSimulate:
    """A loopback JSON-RPC proxy that answers eth_simulateV1 with "method not found" and, with
    ``drop_overrides``, passes eth_call on without its state overrides, as a node that does
    not know them would run it (GasMeter's call to the payer then answers 0x)."""

    def __init__(self, upstream: str, drop_overrides: bool = False) -> None:
        self.refused = 0
        self.overrides_dropped = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = json.loads(body)
                items = req if isinstance(req, list) else [req]
                if any(i.get("method") == "eth_simulateV1" for i in items):
                    proxy.refused += 1
                    out = json.dumps({"jsonrpc": "2.0", "id": items[0].get("id"), "error": {
                        "code": -32601, "message": "the method eth_simulateV1 does not exist/"
                        "is not available"}}).encode()
                else:
                    calls = [i for i in items
                             if i.get("method") == "eth_call" and len(i["params"]) > 2]
                    if drop_overrides and calls:
                        proxy.overrides_dropped += 1  # requests, not calls
                        for i in calls:
                            i["params"] = i["params"][:2]
                        body = json.dumps(req).encode()
                    r = urllib.request.Request(upstream, data=body,
                                               headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(r) as resp:
                        out = resp.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=[False, True], ids=["overrides", "no-overrides"])
def proxy(env: Env, request: pytest.FixtureRequest) -> Iterator[NoSimulate]:
    p = NoSimulate(env.devnet.url, drop_overrides=request.param)
    yield p
    p.close()


@pytest.mark.parametrize("mode", ["batch", "direct"])
def test_send_without_eth_simulate(env: Env, proxy: NoSimulate, mode: str) -> None:
    m = env.signed_manifest(25)
    manifest = mf.load(m)
    victim = manifest.payments[7]
    dn.send_as(env.chain, dn.OWNER, env.devnet.token,
               dn.abi_call("blacklist(address)", ["address"], [victim.to]))
    r = env.cli("send", str(m), "--yes", "--mode", mode,
                extra={"DISBURSER_RPC_URL": proxy.url, "DISBURSER_BATCH_SIZE": "10"})
    assert r.code == 1, r.err
    assert "confirmed 24, failed 1, unpaid 0" in r.out
    assert f"failed: payments[7] {victim.id} {victim.to}: Blacklistable: account is " \
           "blacklisted" in r.err
    assert proxy.refused == 1  # tried once, then never again
    if mode == "batch" and proxy.overrides_dropped:
        # GasMeter got a useless answer METER_TRIES windows in a row and was not asked
        # again: every batch went through eth_estimateGas + eth_call.
        assert proxy.overrides_dropped == METER_TRIES
    for p in manifest.payments:
        assert env.balance(p.to) == (0 if p.index == 7 else p.amount)
