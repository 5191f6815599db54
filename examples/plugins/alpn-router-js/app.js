// alpn-router, in JavaScript: the twin of examples/plugins/alpn-router.
//
// One server name, several protocols: routes by the first ALPN protocol the
// client offers that has a pool, else to `default`. Built into a weir plugin
// component with componentize-js (see build.sh) for the world
// `weir-plugin-core` of weir:plugin@0.2.0; loaded by weir unchanged.
//
// componentize-js maps the WIT as jco does: records are objects with
// camelCase fields, variants `{ tag, val }`, options `undefined` or the
// value, and a thrown string is the `err` of a `result`.

let config = { names: [], protocols: {}, default: undefined };

function passthrough(route, pool) {
  return { route, action: { tag: 'passthrough', val: { upstream: { tag: 'pool', val: pool }, proxyProtocol: undefined } } };
}

export const plugin = {
  configure(text) {
    let parsed;
    try { parsed = JSON.parse(text || '{}'); } catch (e) { throw `invalid plugin config: ${e.message}`; }
    const unknown = Object.keys(parsed).filter((k) => !['names', 'protocols', 'default'].includes(k));
    if (unknown.length) throw `invalid plugin config: unknown field \`${unknown.sort()[0]}\``;
    const protocols = parsed.protocols || {};
    if (!Object.keys(protocols).length) throw '`protocols` maps at least one ALPN protocol to a pool';
    config = { names: parsed.names || [], protocols, default: parsed.default };
  },
  route(conn) {
    if (config.names.length && !config.names.includes(conn.sni)) return { route: '', action: { tag: 'next' } };
    for (const offered of conn.alpn) {
      const pool = config.protocols[offered];
      if (pool !== undefined) return passthrough(`alpn:${offered}`, pool);
    }
    if (config.default !== undefined) return passthrough('alpn:default', config.default);
    return { route: '', action: { tag: 'next' } };
  },
  admit(conn, side, peer) {
    return { tag: 'allow' };
  },
};
