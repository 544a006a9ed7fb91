// A real socket.io-client v4 dashboard against changecast's /socket.io/ endpoint.
//
// Run by tests/sio.rs (`node sio.test.mjs`), which serves the "driver" requests
// this script writes to stderr as `@@drive {json}` lines (create an order,
// change its status) and answers each with one JSON line on stdin. Env:
// CC_URL (http://host:port), CC_SECRET (HS256 secret of the test tokens).
// Both servers run config.example.toml's aliases and declared streams.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import readline from "node:readline";
import { io } from "socket.io-client";

const URL = process.env.CC_URL;
const SECRET = process.env.CC_SECRET;
assert.ok(URL && SECRET, "CC_URL and CC_SECRET must be set");

// ---- driver channel ---------------------------------------------------------

const lines = readline.createInterface({ input: process.stdin });
const waiting = [];
lines.on("line", (l) => waiting.shift()?.(JSON.parse(l)));
after(() => lines.close());

function drive(req) {
  return new Promise((resolve) => {
    waiting.push(resolve);
    process.stderr.write(`@@drive ${JSON.stringify(req)}\n`);
  });
}

// ---- helpers ----------------------------------------------------------------

const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");

function token(claims, ttlSeconds = 3600) {
  const body = { exp: Math.floor(Date.now() / 1000) + ttlSeconds, ...claims };
  const unsigned = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(body)}`;
  const sig = createHmac("sha256", SECRET).update(unsigned).digest("base64url");
  return `${unsigned}.${sig}`;
}

const hex = (n) => randomBytes(n).toString("hex");
const objectId = () => hex(12);

/** Resolves with the args of the next `event` on `socket`, or rejects after `ms`. */
function next(socket, event, ms = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.off(event, on);
      reject(new Error(`no ${event} within ${ms}ms`));
    }, ms);
    const on = (...args) => {
      clearTimeout(timer);
      socket.off(event, on);
      resolve(args);
    };
    socket.on(event, on);
  });
}

/** Connects and waits for changecast's `welcome` (sent once the auto-joins are done). */
async function connect(opts) {
  const socket = io(URL, { reconnection: false, ...opts });
  const [welcome] = await Promise.race([
    next(socket, "welcome"),
    next(socket, "connect_error").then(([e]) => {
      throw e;
    }),
  ]);
  return { socket, welcome };
}

/** A customer, a store and an order of theirs, known to the server. */
async function order() {
  const o = { id: objectId(), customer: objectId(), store: objectId() };
  const r = await drive({ op: "order", ...o });
  assert.equal(r.ok, true, JSON.stringify(r));
  return o;
}

const setStatus = (o, status) => drive({ op: "status", ...o, status });

// ---- tests ------------------------------------------------------------------

test("default transports: long-polling first, then the upgrade to websocket", async () => {
  const o = await order();
  const { socket, welcome } = await connect({ auth: { token: token({ sub: o.customer, role: "customer" }) } });
  try {
    assert.deepEqual(welcome.rooms, [`customer:${o.customer}`]);
    const engine = socket.io.engine;
    if (engine.transport.name !== "websocket") {
      assert.equal(engine.transport.name, "polling");
      await next(engine, "upgrade");
    }
    assert.equal(engine.transport.name, "websocket");

    const legacy = next(socket, "orderStatusUpdated");
    const customer = next(socket, "customer_order_update");
    const delivery = next(socket, "delivery_update");
    await setStatus(o, "out_for_delivery");
    const [[a, idA], [b, idB], [c]] = await Promise.all([legacy, customer, delivery]);
    for (const data of [a, b, c]) assert.equal(data.status, "in_transit");
    assert.equal(typeof idA, "string");
    assert.equal(idA, idB);
  } finally {
    socket.close();
  }
});

test("websocket only, and a store dashboard's legacy names", async () => {
  const o = await order();
  const { socket, welcome } = await connect({
    transports: ["websocket"],
    auth: { token: token({ sub: hex(4), role: "store", stores: [o.store] }) },
  });
  try {
    assert.equal(socket.io.engine.transport.name, "websocket");
    assert.deepEqual(welcome.rooms, [`store:${o.store}`]);
    let customerOnly = 0;
    socket.on("customer_order_update", () => customerOnly++);
    const legacy = next(socket, "orderStatusUpdated");
    const canonical = next(socket, "order:status_changed");
    await setStatus(o, "accepted");
    const [[data], [same]] = await Promise.all([legacy, canonical]);
    assert.equal(data.status, "processing");
    assert.deepEqual(data, same);
    // A ping round trip orders this after any alias still in flight.
    const pong = next(socket, "pong");
    socket.emit("ping");
    await pong;
    assert.equal(customerOnly, 0, "customer_order_update is for customers only");
  } finally {
    socket.close();
  }
});

test("a bad token is refused with a readable connect_error", async () => {
  for (const [auth, code] of [
    [{ token: "not-a-jwt" }, "token_malformed"],
    [{ token: token({ sub: "x", role: "customer" }, -60) }, "token_expired"],
    [{ token: token({ sub: "x", role: "customer" }).slice(0, -4) + "AAAA" }, "token_bad_signature"],
    [{}, "token_missing"],
  ]) {
    const socket = io(URL, { reconnection: false, auth });
    try {
      const [err] = await next(socket, "connect_error");
      assert.ok(err.message.startsWith(`${code}: `), `${JSON.stringify(auth)} → ${err.message}`);
      assert.equal(socket.connected, false);
    } finally {
      socket.close();
    }
  }
});

test("join-order-room: allowed for your order, refused for someone else's", async () => {
  const mine = await order();
  const theirs = await order();
  const { socket } = await connect({ auth: { token: token({ sub: mine.customer, role: "customer" }) } });
  try {
    const ok = await socket.emitWithAck("join-order-room", { orderId: mine.id });
    // `position` is the id of the newest event before the join (or null): the `since` to use until one arrives.
    const { position, ...rest } = ok;
    assert.deepEqual(rest, { ok: true, room: `order:${mine.id}`, recovered: false });
    assert.ok(position === null || /^[0-9A-F]+$/i.test(position), `position ${position}`);

    const error = next(socket, "error");
    const refused = await socket.emitWithAck("join-order-room", { orderId: theirs.id });
    assert.equal(refused.ok, false);
    assert.equal(refused.code, "forbidden");
    const [e] = await error;
    assert.equal(e.code, "forbidden");
    assert.equal(typeof e.message, "string");

    // A legacy client without a callback gets the refusal as an `error` event only.
    const again = next(socket, "error");
    socket.emit("join-order-room", theirs.id);
    assert.equal((await again)[0].code, "forbidden");
  } finally {
    socket.close();
  }
});

test("a server-side disconnect, then reconnecting with since recovers what was missed", async () => {
  const o = await order();
  let current = token({ sub: o.customer, role: "customer" }, 3);
  let lastId;
  const seen = [];
  // The documented recovery pattern: `auth` as a function, read at every (re)connect.
  const { socket } = await connect({
    auth: (cb) => cb(lastId ? { token: current, since: lastId } : { token: current }),
  });
  try {
    socket.on("customer_order_update", (data, id) => {
      seen.push([data.status, id]);
      lastId = id;
    });
    const first = next(socket, "customer_order_update");
    await setStatus(o, "accepted");
    await first;

    // The token expires: the server says why, then disconnects this socket.
    // Both listeners first: the two packets can arrive in one payload.
    const [[err], [reason]] = await Promise.all([next(socket, "error"), next(socket, "disconnect")]);
    assert.equal(err.code, "token_expired");
    assert.equal(reason, "io server disconnect");

    await setStatus(o, "ready_for_delivery");
    await setStatus(o, "out_for_delivery");

    current = token({ sub: o.customer, role: "customer" });
    const recovered = new Promise((resolve) => {
      const check = () => seen.length >= 3 && resolve();
      socket.on("customer_order_update", check);
    });
    socket.connect();
    await next(socket, "welcome");
    await Promise.race([
      recovered,
      new Promise((_, reject) => setTimeout(() => reject(new Error(`recovered only ${JSON.stringify(seen)}`)), 10_000)),
    ]);
    assert.deepEqual(
      seen.map(([s]) => s),
      ["processing", "ready_for_delivery", "in_transit"],
    );
    assert.equal(new Set(seen.map(([, id]) => id)).size, 3, "no duplicates");
  } finally {
    socket.close();
  }
});

test("a declared stream's event also goes out under its alias (balance-updated)", async () => {
  const user = objectId();
  const { socket } = await connect({
    transports: ["websocket"],
    auth: { token: token({ sub: user, role: "customer" }) },
  });
  try {
    const alias = next(socket, "balance-updated");
    const canonical = next(socket, "balance:updated");
    const r = await drive({ op: "balance", user, from: 10, to: 25 });
    assert.equal(r.ok, true, JSON.stringify(r));
    const [[a, idA], [b, idB]] = await Promise.all([alias, canonical]);
    assert.deepEqual(a, b);
    assert.equal(idA, idB);
    assert.deepEqual(a.tracked.balance, { old: 10, new: 25, delta: 15, known: true });
  } finally {
    socket.close();
  }
});
