// Reference Node implementation of the apps' realtime layer, for changecast's benchmarks:
// Socket.IO 4 rooms fed by one MongoDB change stream (fullDocument: 'updateLookup'),
// written the way the Node apps do it — no artificial slowness, no heroic tuning.
//
// Env: PORT, MONGODB_URI, DB_NAME (default "app"), JWT_SECRET.

'use strict';

const http = require('http');
const { Server } = require('socket.io');
const { MongoClient } = require('mongodb');
const jwt = require('jsonwebtoken');

const PORT = Number(process.env.PORT || 3000);
const MONGODB_URI = process.env.MONGODB_URI || 'mongodb://127.0.0.1:27017/?replicaSet=rs0';
const DB_NAME = process.env.DB_NAME || 'app';
const JWT_SECRET = process.env.JWT_SECRET;
if (!JWT_SECRET) {
  console.error('JWT_SECRET is required');
  process.exit(64);
}

// Legacy order status -> canonical status (the same table changecast ships by default).
const ORDER_STATUS = {
  new: 'pending',
  pending: 'pending',
  accepted: 'processing',
  processing: 'processing',
  packing: 'processing',
  ready: 'ready',
  ready_for_pickup: 'ready_for_pickup',
  ready_for_delivery: 'ready_for_delivery',
  driver_assigned: 'driver_assigned',
  picked_up: 'picked_up',
  out_for_delivery: 'in_transit',
  in_transit: 'in_transit',
  completed: 'delivered',
  delivered: 'delivered',
  cancelled: 'cancelled',
  canceled: 'cancelled',
};
const PICKUP_TYPES = new Set(['pickup', 'collection', 'takeaway']);

const PAYMENT_STATUS = {
  succeeded: 'succeeded',
  paid: 'succeeded',
  completed: 'succeeded',
  pending: 'pending',
  processing: 'pending',
  requires_action: 'pending',
  failed: 'failed',
  canceled: 'canceled',
  cancelled: 'canceled',
  refunded: 'refunded',
  partially_refunded: 'refunded',
};

// Settings fields a storefront visitor may see; everything else stays with the store.
const PUBLIC_SETTINGS = [
  'storeBanner', 'storeLogo', 'shippingPolicy', 'returnsPolicy',
  'aboutStory', 'contactEmail', 'socialInstagram', 'socialTwitter', 'socialTiktok',
  'socialSnapchat', 'socialWebsite', 'storeActive', 'termsSource', 'termsPdfUrl', 'username',
];

function canonicalOrderStatus(raw, orderType) {
  const status = ORDER_STATUS[String(raw || '').toLowerCase()];
  if (status === 'ready') {
    return PICKUP_TYPES.has(String(orderType || '').toLowerCase()) ? 'ready_for_pickup' : 'ready_for_delivery';
  }
  return status || raw;
}

function pick(doc, fields) {
  const out = {};
  for (const f of fields) {
    if (doc[f] !== undefined) out[f] = doc[f];
  }
  return out;
}

let ready = false;
// Change events read from the stream, whatever they became: the follow workload's count.
let changesRead = 0;

const httpServer = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.writeHead(200).end('ok');
  } else if (req.url === '/changes') {
    res.writeHead(200).end(String(changesRead));
  } else if (req.url === '/readyz') {
    res.writeHead(ready ? 200 : 503).end(ready ? 'ready' : 'starting');
  } else {
    res.writeHead(404).end();
  }
});

const io = new Server(httpServer, { cors: { origin: '*' } });

io.use((socket, next) => {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  if (!token) return next(new Error('unauthorized'));
  jwt.verify(token, JWT_SECRET, { algorithms: ['HS256'] }, (err, claims) => {
    if (err) return next(new Error('unauthorized'));
    socket.data.user = claims;
    next();
  });
});

io.on('connection', (socket) => {
  const { sub, role, stores } = socket.data.user;
  const rooms = [`customer:${sub}`];
  if (Array.isArray(stores)) {
    for (const s of stores) rooms.push(`store:${s}`);
  }
  if (role === 'admin') rooms.push('admin');
  socket.join(rooms);

  socket.on('subscribe', (msg, ack) => {
    const room = msg && msg.room;
    const ok = typeof room === 'string' && room.startsWith('storefront:');
    if (ok) socket.join(room);
    if (typeof ack === 'function') ack(ok ? { ok: true, room } : { ok: false, error: 'forbidden' });
  });
  socket.on('join-storefront', (storeId, ack) => {
    socket.join(`storefront:${storeId}`);
    if (typeof ack === 'function') ack({ ok: true });
  });
});

function onOrder(change) {
  const order = change.fullDocument;
  if (!order) return;
  const payload = {
    orderId: String(order._id),
    _id: order._id,
    orderNumber: order.orderNumber,
    status: canonicalOrderStatus(order.status, order.orderType),
    rawStatus: order.status,
    orderType: order.orderType,
    total: order.total,
    currency: order.currency,
    updatedAt: order.updatedAt,
    ts: change.clusterTime ? change.clusterTime.getHighBits() * 1000 : Date.now(),
  };
  const event = change.operationType === 'insert' ? 'order:created' : 'order:status_changed';
  if (event === 'order:status_changed') {
    const fields = change.updateDescription && change.updateDescription.updatedFields;
    if (fields && !('status' in fields)) return;
  }
  if (order.customerId != null) io.to(`customer:${order.customerId}`).emit(event, payload);
  if (order.storeId != null) {
    io.to(`store:${order.storeId}`).emit(event, { ...payload, customerId: order.customerId, storeId: order.storeId });
  }
}

function onPayment(change) {
  const payment = change.fullDocument;
  if (!payment) return;
  const payload = {
    _id: payment._id,
    orderId: payment.orderId,
    amount: payment.amount,
    currency: payment.currency,
    status: PAYMENT_STATUS[String(payment.status || '').toLowerCase()] || payment.status,
  };
  const event = change.operationType === 'insert' ? 'payment:created' : 'payment:status_changed';
  if (payment.customerId != null) io.to(`customer:${payment.customerId}`).emit(event, payload);
  if (payment.storeId != null) io.to(`store:${payment.storeId}`).emit(event, payload);
}

function onSettings(change) {
  const settings = change.fullDocument;
  if (!settings || settings.storeId == null) return;
  const changed = change.updateDescription
    ? Object.keys(change.updateDescription.updatedFields || {})
    : Object.keys(settings);
  io.to(`store:${settings.storeId}`).emit('settings:updated', { storeId: settings.storeId, ...settings });
  const publicChanged = changed.filter((f) => PUBLIC_SETTINGS.includes(f));
  if (publicChanged.length > 0) {
    io.to(`storefront:${settings.storeId}`).emit('settings:updated', {
      storeId: settings.storeId,
      ...pick(settings, PUBLIC_SETTINGS),
      changedFields: publicChanged,
    });
  }
}

async function main() {
  const client = await MongoClient.connect(MONGODB_URI);
  const db = client.db(DB_NAME);
  const stream = db.watch(
    [{ $match: { 'ns.coll': { $in: ['orders', 'payments', 'settings'] } } }],
    { fullDocument: 'updateLookup' },
  );
  stream.on('change', (change) => {
    changesRead += 1;
    try {
      switch (change.ns && change.ns.coll) {
        case 'orders': return onOrder(change);
        case 'payments': return onPayment(change);
        case 'settings': return onSettings(change);
        default: return undefined;
      }
    } catch (err) {
      console.error('change handler failed', err);
      return undefined;
    }
  });
  stream.on('error', (err) => {
    console.error('change stream failed', err);
    process.exit(1);
  });
  // The stream is open once the server has answered the aggregate with a resume token
  // (postBatchResumeToken, MongoDB 4.0.7+ and mongo-sim). No timer fallback: reporting
  // ready before the stream is open would lose the first writes.
  stream.once('resumeTokenChanged', () => { ready = true; });

  httpServer.listen(PORT, '127.0.0.1', () => {
    console.log(`node peer listening on 127.0.0.1:${PORT}`);
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
