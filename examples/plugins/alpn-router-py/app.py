"""alpn-router, in Python: the twin of examples/plugins/alpn-router.

One server name, several protocols: routes by the first ALPN protocol the
client offers that has a pool, else to `default`. Built into a weir plugin
component with componentize-py (see build.sh); loaded by weir unchanged.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types


# componentize-py makes a new `Plugin` object for each call, so the
# configuration lives at module level: one instance of the component, one
# configuration (weir configures each instance once).
CONFIG = {"names": [], "protocols": {}, "default": None}


class Plugin(exports.Plugin):
    def configure(self, config: str) -> None:
        try:
            parsed = json.loads(config or "{}")
        except ValueError as e:
            raise Err(f"invalid plugin config: {e}")
        unknown = set(parsed) - {"names", "protocols", "default"}
        if unknown:
            raise Err(f"invalid plugin config: unknown field `{sorted(unknown)[0]}`")
        protocols = parsed.get("protocols") or {}
        if not protocols:
            raise Err("`protocols` maps at least one ALPN protocol to a pool")
        CONFIG["names"] = parsed.get("names") or []
        CONFIG["protocols"] = protocols
        CONFIG["default"] = parsed.get("default")

    def route(self, conn: types.Connection) -> types.Decision:
        if CONFIG["names"] and conn.sni not in CONFIG["names"]:
            return types.Decision("", types.Action_Next())
        for offered in conn.alpn:
            pool = CONFIG["protocols"].get(offered)
            if pool is not None:
                return passthrough(f"alpn:{offered}", pool)
        if CONFIG["default"] is not None:
            return passthrough("alpn:default", CONFIG["default"])
        return types.Decision("", types.Action_Next())

    def admit(self, conn: types.Connection, side: types.Side, peer: types.Peer) -> types.Verdict:
        return types.Verdict_Allow()


def passthrough(route: str, pool: str) -> types.Decision:
    target = types.Target(types.Upstream_Pool(pool), None)
    return types.Decision(route, types.Action_Passthrough(target))
