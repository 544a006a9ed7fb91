// changecast demo dashboard: three native-protocol connections (store owner,
// customer, storefront visitor) and one Socket.IO connection, all through
// changecast's public endpoints, and an operations panel charting its metrics.
// The customer's tracker also shows their balance, from a declared stream.
// No framework, no build step.
(() => {
  'use strict';

  const CFG = Object.assign({}, window.CHANGECAST_DEMO || {});
  const $ = (sel, root = document) => root.querySelector(sel);
  const tid = (id, root = document) => $(`[data-testid="${id}"]`, root);

  // Canonical order statuses in board order. Optional columns stay hidden
  // until a card lands there (the demo's legacy statuses never produce them).
  const COLUMNS = [
    { status: 'pending', label: 'Pending' },
    { status: 'processing', label: 'Processing' },
    { status: 'ready_for_pickup', label: 'Ready for pickup' },
    { status: 'ready_for_delivery', label: 'Ready for delivery' },
    { status: 'driver_assigned', label: 'Driver assigned', optional: true },
    { status: 'picked_up', label: 'Picked up', optional: true },
    { status: 'in_transit', label: 'In transit' },
    { status: 'delivered', label: 'Delivered' },
    { status: 'cancelled', label: 'Cancelled' },
    { status: 'other', label: 'Unknown status', optional: true },
  ];
  const LABEL = Object.fromEntries(COLUMNS.map((c) => [c.status, c.label]));
  const TERMINAL = new Set(['delivered', 'cancelled']);
  // Used only when an event carries no `progress` of its own.
  const FALLBACK_PROGRESS = {
    pending: 0, processing: 25, ready_for_pickup: 60, ready_for_delivery: 50,
    driver_assigned: 60, picked_up: 70, in_transit: 80, delivered: 100, cancelled: 100,
  };
  const PUBLIC_SETTINGS = new Set([
    'storeBanner', 'storeLogo', 'shippingPolicy', 'returnsPolicy', 'aboutStory', 'contactEmail',
    'socialInstagram', 'socialTwitter', 'socialTiktok', 'socialSnapchat', 'socialWebsite',
    'storeActive', 'termsSource', 'termsPdfUrl', 'username',
  ]);
  // Fields of the store-only sections: a visitor must never receive them.
  const PRIVATE_SETTINGS = new Set([
    'paymentProvider', 'taxEnabled', 'taxNexusCountries', 'taxNexusStates', 'taxProductCode',
    'customDomain', 'customDomainVerified', 'shippingPrice', 'warehouse', 'warehouseAddress',
    'warehouseAddress2', 'warehouseCity', 'warehouseState', 'warehouseZip', 'warehousePostalCode',
    'warehouseCountry', 'warehousePhone',
  ]);
  const MAX_TERMINAL_CARDS = 6; // per done column, so a long-running demo stays readable
  const MAX_CARDS = 80;
  const MAX_SIO_LOG = 40;
  const MAX_TOASTS = 4;
  const PING_EVERY_MS = 15000; // app-level ping: notices a half-open socket the browser has not
  const PONG_DEADLINE_MS = 10000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;

  // ---------- helpers ----------

  const el = (tag, attrs = {}, ...children) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  };

  // Ids arrive as strings or extended JSON ({"$oid": …}).
  const idStr = (v) => {
    if (v === null || v === undefined) return '';
    if (typeof v === 'string') return v;
    if (typeof v === 'number') return String(v);
    if (typeof v === 'object') {
      if (typeof v.$oid === 'string') return v.$oid;
      if (v.$numberLong !== undefined) return String(v.$numberLong);
    }
    return JSON.stringify(v);
  };
  const num = (v) => {
    if (typeof v === 'number') return v;
    if (typeof v === 'string') return parseFloat(v);
    if (v && typeof v === 'object') {
      const inner = v.$numberDouble ?? v.$numberDecimal ?? v.$numberInt ?? v.$numberLong;
      if (inner !== undefined) return parseFloat(inner);
    }
    return NaN;
  };
  const money = (v) => {
    const n = num(v);
    return Number.isFinite(n) ? `$${n.toFixed(2)}` : '';
  };
  const clock = (ms) => {
    const d = Number.isFinite(ms) ? new Date(ms) : new Date();
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  };
  const orderIdOf = (d) => idStr(d.orderId ?? d._id ?? d.id);
  const orderLabel = (d) => (d.orderNumber !== undefined ? `#${idStr(d.orderNumber)}` : `order …${orderIdOf(d).slice(-6)}`);
  const hue = (s) => {
    let h = 0;
    for (let i = 0; i < s.length; i++) h = (h * 31 + s.charCodeAt(i)) >>> 0;
    return h % 360;
  };
  // ".../banners/summer.jpg" → "summer"
  const stem = (url) => String(url || '').split('/').pop().replace(/\.[a-z0-9]+$/i, '');

  // ---------- toasts ----------

  const toasts = tid('toasts');
  function toast(text, kind = 'info') {
    const t = el('div', { class: 'toast', 'data-testid': 'toast', 'data-kind': kind, text });
    toasts.append(t);
    while (toasts.children.length > MAX_TOASTS) toasts.firstElementChild.remove();
    setTimeout(() => {
      t.classList.add('leaving');
      setTimeout(() => t.remove(), 450);
    }, 5000);
  }

  // ---------- native protocol connection ----------

  // One WebSocket to /ws for one token: auth, optional explicit subscriptions,
  // reconnect with capped exponential backoff and `since` recovery.
  class NativeConn {
    constructor(name, tokenKey, handlers) {
      this.name = name;
      this.tokenKey = tokenKey;
      this.h = handlers;
      this.ws = null;
      this.state = 'connecting'; // connecting | connected | disconnected
      this.everConnected = false;
      this.attempt = 0;
      this.retryAt = 0;
      this.fatal = '';
      this.lastAutoId = null; // last event id from an auto-joined room (auth `since`)
      this.lastIdByRoom = new Map(); // explicitly subscribed rooms → last event id
      this.explicitRooms = handlers.rooms || [];
      this.seen = new Map(); // room → Set of recent ids, to drop a replayed duplicate
      this.timer = null;
      this.pingTimer = null;
      this.lastHeard = 0;
    }

    url() {
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      return `${proto}//${location.host}/ws`;
    }

    start() { this.connect(); }

    setState(s) {
      this.state = s;
      onConnChange();
    }

    connect() {
      clearTimeout(this.timer);
      this.timer = null;
      const ws = new WebSocket(this.url());
      this.ws = ws;
      ws.onopen = () => {
        this.lastHeard = Date.now();
        // Remembered: a refusal is about the token this socket sent, not about CFG,
        // which another socket may already have refreshed.
        this.sentToken = CFG[this.tokenKey];
        const auth = { type: 'auth', token: this.sentToken };
        if (this.lastAutoId) auth.since = this.lastAutoId;
        ws.send(JSON.stringify(auth));
      };
      ws.onmessage = (m) => this.onMessage(m);
      ws.onclose = (ev) => this.onClose(ws, ev);
      ws.onerror = () => { /* onclose follows and decides */ };
    }

    send(obj) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj));
    }

    onMessage(m) {
      this.lastHeard = Date.now();
      let msg;
      try { msg = JSON.parse(m.data); } catch { return; }
      switch (msg.type) {
        case 'welcome':
          this.attempt = 0;
          this.fatal = '';
          this.everConnected = true;
          this.setState('connected');
          for (const room of this.explicitRooms) {
            const sub = { type: 'subscribe', room };
            const since = this.lastIdByRoom.get(room);
            if (since) sub.since = since;
            this.send(sub);
          }
          this.startPings();
          if (this.h.onWelcome) this.h.onWelcome(msg);
          break;
        case 'event': {
          const room = msg.room || '';
          if (this.isDuplicate(room, msg.id)) return;
          if (msg.id) {
            if (this.explicitRooms.includes(room)) this.lastIdByRoom.set(room, msg.id);
            else this.lastAutoId = msg.id;
          }
          try { this.h.onEvent(msg); } catch (e) { console.error(this.name, 'event handler', e); }
          break;
        }
        case 'resync':
          // The server could not replay what we missed: drop this room's state.
          this.seen.delete(msg.room);
          if (this.explicitRooms.includes(msg.room)) this.lastIdByRoom.delete(msg.room);
          else this.lastAutoId = null;
          if (this.h.onResync) this.h.onResync(msg);
          break;
        case 'subscribed':
          if (this.h.onSubscribed) this.h.onSubscribed(msg);
          break;
        case 'position':
          // An idle session is told where the stream is: everything of its rooms up to
          // it has arrived, so it is the `since` now (the newest of this and the last
          // event id, by arrival), and stays within the server's history however long
          // no event comes.
          if (msg.position) this.lastAutoId = msg.position;
          break;
        case 'error':
          console.warn(this.name, 'server error', msg);
          if (this.h.onError) this.h.onError(msg);
          break;
        default:
          break; // pong and future message types
      }
    }

    isDuplicate(room, id) {
      if (!id) return false;
      let s = this.seen.get(room);
      if (!s) { s = new Set(); this.seen.set(room, s); }
      if (s.has(id)) return true;
      s.add(id);
      if (s.size > 500) s.delete(s.values().next().value);
      return false;
    }

    startPings() {
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => {
        if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
        if (Date.now() - this.lastHeard > PING_EVERY_MS + PONG_DEADLINE_MS) {
          this.ws.close(4000, 'no pong');
          return;
        }
        this.send({ type: 'ping' });
      }, PING_EVERY_MS);
    }

    async onClose(ws, ev) {
      if (ws !== this.ws) return;
      clearInterval(this.pingTimer);
      this.ws = null;
      this.setState('disconnected');
      if (ev.code >= 4500 && ev.code <= 4999) {
        // "Do not retry with this token". A demo restarted with a new secret
        // serves new tokens: fetch them once, and retry only if they differ from the
        // one this socket was refused with (another socket may have fetched them first).
        const fresh = await fetchTokens();
        if (fresh && fresh[this.tokenKey] && fresh[this.tokenKey] !== this.sentToken) {
          Object.assign(CFG, fresh);
          this.lastAutoId = null;
          this.lastIdByRoom.clear();
        } else if (fresh) {
          this.fatal = `token refused (close ${ev.code}); reload the page`;
          onConnChange();
          return;
        }
      }
      this.scheduleReconnect();
    }

    scheduleReconnect() {
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
      const delay = cap / 2 + Math.random() * (cap / 2); // jitter: clients do not return in lockstep
      this.attempt += 1;
      this.retryAt = Date.now() + delay;
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.connect(), delay);
      onConnChange();
    }
  }

  async function fetchTokens() {
    try {
      const r = await fetch('/demo/tokens.json', { cache: 'no-store' });
      return r.ok ? await r.json() : null;
    } catch {
      return null; // server down: keep retrying with what we have
    }
  }

  // ---------- connection indicator ----------

  const conns = [];
  const connBox = tid('conn');
  const connLabel = tid('conn-state');
  const connDetail = tid('conn-detail');
  const banner = tid('conn-banner');
  const bannerDetail = tid('conn-banner-detail');

  function onConnChange() {
    let state;
    if (conns.length && conns.every((c) => c.state === 'connected')) state = 'connected';
    else if (conns.every((c) => !c.everConnected && c.state === 'connecting')) state = 'connecting';
    else state = 'disconnected';
    connBox.dataset.state = state;
    connLabel.textContent = state;
    document.body.classList.toggle('is-disconnected', state === 'disconnected');
    banner.hidden = state !== 'disconnected';
    renderConnDetail();
  }

  function renderConnDetail() {
    const down = conns.filter((c) => c.state !== 'connected');
    const fatal = down.find((c) => c.fatal);
    let text = '';
    if (fatal) {
      text = fatal.fatal;
    } else if (down.length && connBox.dataset.state === 'disconnected') {
      const next = Math.min(...down.map((c) => c.retryAt || Date.now()));
      const secs = Math.max(0, Math.ceil((next - Date.now()) / 1000));
      const attempt = Math.max(...down.map((c) => c.attempt));
      text = secs > 0 ? `reconnecting in ${secs}s (attempt ${attempt})` : 'reconnecting…';
    } else if (connBox.dataset.state === 'connected') {
      text = `${conns.length} sockets`;
    }
    connDetail.textContent = text;
    bannerDetail.textContent = fatal
      ? fatal.fatal
      : `Live updates are paused; ${text || 'reconnecting…'}. Missed events are recovered on reconnect.`;
  }
  setInterval(renderConnDetail, 500);

  // ---------- store board ----------

  const board = tid('board');
  const boardEmpty = tid('board-empty');
  const columns = new Map();
  for (const c of COLUMNS) {
    const cards = el('div', { class: 'column-cards' });
    const count = el('span', { class: 'column-count', text: '0' });
    const col = el('div', {
      class: 'column', 'data-testid': 'board-column', 'data-col': c.status,
      'data-optional': c.optional ? 'true' : 'false', 'data-count': '0',
    }, el('div', { class: 'column-head' }, el('span', { text: c.label }), count), cards);
    board.append(col);
    columns.set(c.status, { col, cards, count });
  }
  const cards = new Map(); // order id → { el, status, payment }

  function refreshCounts() {
    for (const { col, cards: box, count } of columns.values()) {
      const n = box.children.length;
      count.textContent = String(n);
      col.dataset.count = String(n);
    }
    boardEmpty.hidden = cards.size > 0;
  }

  function renderCard(card, d) {
    const items = Array.isArray(d.items)
      ? d.items.map((i) => `${num(i.qty) || 1}× ${i.name ?? '?'}`).join(', ')
      : '';
    const type = d.orderType === 'pickup' ? 'pickup' : d.orderType ? 'delivery' : '';
    card.el.replaceChildren(
      el('div', { class: 'card-top' }, el('span', { text: orderLabel(d) }), el('span', { text: money(d.total) })),
      el('div', { class: 'card-items', text: items || ' ' }),
      el('div', { class: 'card-meta' },
        el('span', { class: 'muted', text: [d.customerName || d.customerId, type].filter(Boolean).join(' · ') }),
        card.payment ? el('span', { class: 'pay', 'data-pay': card.payment, text: card.payment }) : null),
    );
  }

  function placeCard(card, status, isNew) {
    const column = columns.get(status) || columns.get('other');
    card.el.dataset.status = status;
    card.el.classList.remove('moved', 'new');
    void card.el.offsetWidth; // restart the animation
    card.el.classList.add(isNew ? 'new' : 'moved');
    column.cards.prepend(card.el);
    if (TERMINAL.has(status)) {
      while (column.cards.children.length > MAX_TERMINAL_CARDS) {
        const old = column.cards.lastElementChild;
        cards.delete(old.dataset.orderId);
        old.remove();
      }
    }
  }

  function upsertOrder(d, msg) {
    const id = orderIdOf(d);
    if (!id) return;
    const status = columns.has(d.status) ? d.status : d.unknown || d.status ? 'other' : null;
    let card = cards.get(id);
    if (!card) {
      if (!status) return; // an update without a status for an order we never saw
      const node = el('div', {
        class: 'card', 'data-testid': 'order-card', 'data-order-id': id,
        'data-status': status, 'data-moves': '0',
      });
      card = { el: node, status, data: {}, payment: null };
      cards.set(id, card);
      Object.assign(card.data, d);
      renderCard(card, card.data);
      placeCard(card, status, true);
      if (msg.event === 'order:created') {
        toast(`New order ${orderLabel(card.data)} — ${money(d.total)} (${d.orderType || 'order'})`, 'info');
      }
    } else {
      Object.assign(card.data, d);
      renderCard(card, card.data);
      if (status && status !== card.status) {
        card.el.dataset.prevStatus = card.status;
        card.el.dataset.moves = String(Number(card.el.dataset.moves || 0) + 1);
        placeCard(card, status, false);
        if (status === 'cancelled') toast(`Order ${orderLabel(card.data)} cancelled`, 'bad');
      }
    }
    if (status) card.status = status;
    if (d.rawStatus) card.el.title = `raw status: ${d.rawStatus}`;
    while (cards.size > MAX_CARDS) {
      const [oldest, c] = cards.entries().next().value;
      c.el.remove();
      cards.delete(oldest);
    }
    refreshCounts();
  }

  function paymentOnBoard(d, msg) {
    const card = cards.get(idStr(d.orderId));
    const status = d.status || '';
    if (card) {
      card.payment = status;
      renderCard(card, card.data);
    }
    const label = card ? orderLabel(card.data) : `order …${idStr(d.orderId).slice(-6)}`;
    if (status === 'failed') toast(`Payment failed for ${label}`, 'bad');
    else if (status === 'refunded') toast(`Refunded ${money(d.amount)} for ${label}`, 'warn');
    else if (msg.event === 'payment:created') { /* the card's badge is enough */ }
  }

  const storeSettings = {};
  function settingsOnBoard(d) {
    const changed = new Set(Array.isArray(d.changedFields) ? d.changedFields : []);
    for (const [k, v] of Object.entries(d)) {
      if (PUBLIC_SETTINGS.has(k) || PRIVATE_SETTINGS.has(k)) storeSettings[k] = v;
    }
    const box = tid('store-settings-values');
    box.replaceChildren(...Object.entries(storeSettings).map(([k, v]) => el('span', {
      class: `kv${PRIVATE_SETTINGS.has(k) ? ' private' : ''}${changed.has(k) ? ' changed' : ''}`,
      'data-field': k,
      text: `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`,
    })));
  }

  function onStoreEvent(msg) {
    const d = msg.data || {};
    if (msg.event.startsWith('order:')) upsertOrder(d, msg);
    else if (msg.event.startsWith('payment:')) paymentOnBoard(d, msg);
    else if (msg.event.startsWith('settings:')) settingsOnBoard(d);
  }

  function onStoreResync() {
    for (const c of cards.values()) c.el.remove();
    cards.clear();
    refreshCounts();
    toast('Store board resynced: history did not reach back far enough', 'warn');
  }

  // ---------- customer tracker ----------

  const tracker = tid('tracker');
  const trackerOrders = new Map(); // id → { data, status, progress, reached: Map(status → ts), payment }
  let trackedId = null;

  function stepsFor(o) {
    const pickup = o.data.orderType === 'pickup';
    const steps = pickup
      ? ['pending', 'processing', 'ready_for_pickup', 'delivered']
      : ['pending', 'processing', 'ready_for_delivery', 'in_transit', 'delivered'];
    // Statuses outside the usual path (driver steps, unknown ones) are shown where they happened.
    for (const s of o.reached.keys()) {
      if (!steps.includes(s) && s !== 'cancelled') steps.splice(steps.length - 1, 0, s);
    }
    return steps;
  }

  function renderTracker() {
    const o = trackerOrders.get(trackedId);
    if (!o) return;
    const progress = Number.isFinite(o.progress) ? Math.max(0, Math.min(100, o.progress)) : 0;
    tracker.dataset.orderId = trackedId;
    tracker.dataset.cancelled = String(o.status === 'cancelled');
    tid('tracker-order').textContent = `${orderLabel(o.data)} · ${o.data.orderType || ''} · ${money(o.data.total)}`;
    const pill = tid('tracker-status');
    pill.dataset.status = o.status;
    pill.textContent = LABEL[o.status] || o.data.rawStatus || o.status;
    const bar = tid('tracker-progress');
    bar.dataset.progress = String(progress);
    bar.setAttribute('aria-valuenow', String(progress));
    $('.progress-fill', bar).style.width = `${progress}%`;

    const steps = stepsFor(o);
    const currentIdx = steps.indexOf(o.status);
    const items = steps.map((s, i) => {
      let state = 'todo';
      if (o.status === 'cancelled') state = o.reached.has(s) ? 'done' : 'todo';
      else if (i < currentIdx || (o.reached.has(s) && i !== currentIdx)) state = 'done';
      else if (i === currentIdx) state = TERMINAL.has(s) ? 'done' : 'current';
      const at = o.reached.get(s);
      return el('li', { 'data-step': s, 'data-state': state },
        el('span', { text: s === 'delivered' && o.data.orderType === 'pickup' ? 'Collected' : LABEL[s] || s }),
        at ? el('span', { class: 'when', text: clock(at) }) : null);
    });
    if (o.status === 'cancelled') {
      items.push(el('li', { 'data-step': 'cancelled', 'data-state': 'cancelled' },
        el('span', { text: 'Cancelled' }),
        el('span', { class: 'when', text: clock(o.reached.get('cancelled')) })));
    }
    tid('tracker-timeline').replaceChildren(...items);
    tid('tracker-payment').textContent = o.payment ? `Payment: ${o.payment}` : '';

    const recent = [...trackerOrders.entries()].slice(-5).reverse();
    tid('customer-orders').replaceChildren(...recent.map(([id, r]) => el('li', {
      'data-testid': 'customer-order', 'data-order-id': id, 'data-status': r.status,
    }, el('span', { text: `${orderLabel(r.data)} ${r.data.orderType || ''}` }),
    el('span', { class: 'status-pill', 'data-status': r.status, text: LABEL[r.status] || r.status }))));
  }

  function onCustomerOrder(d, msg) {
    const id = orderIdOf(d);
    if (!id) return;
    let o = trackerOrders.get(id);
    if (!o) {
      o = { data: {}, status: null, progress: NaN, reached: new Map(), payment: null };
      trackerOrders.set(id, o);
      while (trackerOrders.size > 20) trackerOrders.delete(trackerOrders.keys().next().value);
    }
    Object.assign(o.data, d);
    const status = d.status || o.status;
    if (status) {
      if (status !== o.status && o.status && id === trackedId && msg.event === 'order:status_changed') {
        const kind = status === 'cancelled' ? 'bad' : status === 'delivered' ? 'good' : 'info';
        toast(`Your order ${orderLabel(o.data)}: ${LABEL[status] || status}`, kind);
      }
      o.status = status;
      if (!o.reached.has(status)) o.reached.set(status, msg.ts || Date.now());
    }
    const p = num(d.progress);
    o.progress = Number.isFinite(p) ? p : FALLBACK_PROGRESS[o.status] ?? o.progress;
    // Follow the newest order; keep a finished one on screen until another one is live.
    const current = trackerOrders.get(trackedId);
    if (!current || (TERMINAL.has(current.status) && id !== trackedId && !TERMINAL.has(o.status))) {
      trackedId = id;
    }
    renderTracker();
  }

  // The customer's balance: the demo's one declared stream (`users`, module `balance`,
  // tracked field `balance`), whose events carry data.tracked.balance = {old, new, delta, known}.
  const balanceBox = tid('tracker-balance');
  function onBalance(d, msg) {
    const t = d.tracked && d.tracked.balance;
    const now = num(t ? t.new : d.balance);
    if (!Number.isFinite(now)) return;
    balanceBox.dataset.balance = String(now);
    balanceBox.dataset.event = msg.event;
    tid('balance-now').textContent = money(now);
    const old = t && t.known ? num(t.old) : NaN;
    const delta = t ? num(t.delta) : NaN;
    if (Number.isFinite(old) && Number.isFinite(delta) && delta !== 0) {
      Object.assign(balanceBox.dataset, {
        old: String(old), new: String(now), delta: String(delta), known: 'true',
        dir: delta > 0 ? 'up' : 'down',
        changes: String(Number(balanceBox.dataset.changes) + 1),
      });
      const sign = delta > 0 ? '+' : '−';
      tid('balance-move').replaceChildren(`${money(old)} → ${money(now)} `,
        el('span', { class: 'delta', 'data-testid': 'balance-delta', text: `(${sign}${money(Math.abs(delta))})` }));
    } else if (t && !t.known) {
      balanceBox.dataset.known = 'false';
      tid('balance-move').textContent = 'previous balance not known to this server';
    }
    balanceBox.classList.remove('updated');
    void balanceBox.offsetWidth; // restart the animation
    balanceBox.classList.add('updated');
  }

  function onCustomerEvent(msg) {
    const d = msg.data || {};
    if (msg.event.startsWith('balance:')) onBalance(d, msg);
    else if (msg.event.startsWith('order:')) onCustomerOrder(d, msg);
    else if (msg.event.startsWith('payment:')) {
      const o = trackerOrders.get(idStr(d.orderId));
      if (o) {
        o.payment = d.status;
        if (idStr(d.orderId) === trackedId) renderTracker();
      }
    }
  }

  // ---------- storefront preview ----------

  const storefront = tid('storefront');
  const sfState = {};
  const privateFields = new Set();
  const privateChanged = new Set();

  function onStorefrontEvent(msg) {
    if (!msg.event.startsWith('settings:')) return;
    const d = msg.data || {};
    // The privacy check the demo makes visible: record anything store-only
    // that reached the visitor, by key or by name in changedFields.
    for (const k of Object.keys(d)) if (PRIVATE_SETTINGS.has(k)) privateFields.add(k);
    for (const k of Array.isArray(d.changedFields) ? d.changedFields : []) {
      if (PRIVATE_SETTINGS.has(k)) privateChanged.add(k);
    }
    for (const [k, v] of Object.entries(d)) if (PUBLIC_SETTINGS.has(k)) sfState[k] = v;
    storefront.dataset.received = String(Number(storefront.dataset.received) + 1);
    renderStorefront();
    storefront.classList.remove('updated');
    void storefront.offsetWidth;
    storefront.classList.add('updated');
    if (d.section === 'branding') toast('Storefront branding updated', 'info');
  }

  function renderStorefront() {
    const b = tid('storefront-banner');
    if (sfState.storeBanner) {
      const h = hue(String(sfState.storeBanner));
      b.dataset.banner = String(sfState.storeBanner);
      b.style.background = `linear-gradient(120deg, hsl(${h} 70% 55%), hsl(${(h + 50) % 360} 75% 70%))`;
      $('.sf-banner-caption', b).textContent = `banner: ${stem(sfState.storeBanner)}`;
    }
    const logo = tid('storefront-logo');
    if (sfState.storeLogo) {
      logo.dataset.logo = String(sfState.storeLogo);
      logo.dataset.variant = stem(sfState.storeLogo);
      const h = hue(String(sfState.storeLogo));
      logo.style.background = logo.dataset.variant === 'mono' ? '#111827' : `hsl(${h} 55% 45%)`;
    }
    const name = String(sfState.username || CFG.storeId || '');
    logo.textContent = name.replace(/^shop-/, '').slice(0, 2).toUpperCase();
    if (sfState.username) tid('storefront-username').textContent = `@${sfState.username}`;
    if (sfState.aboutStory) tid('storefront-about').textContent = String(sfState.aboutStory);
    if (sfState.contactEmail) tid('storefront-contact').textContent = String(sfState.contactEmail);
    const open = tid('storefront-open');
    if (sfState.storeActive !== undefined) {
      open.dataset.open = String(Boolean(sfState.storeActive));
      open.textContent = sfState.storeActive ? 'open' : 'closed';
    }
    const privacy = tid('storefront-privacy');
    const leaked = [...privateFields, ...privateChanged.keys()];
    privacy.dataset.privateFields = [...privateFields].join(',');
    privacy.dataset.privateChanged = [...privateChanged].join(',');
    privacy.dataset.leak = String(leaked.length > 0);
    privacy.replaceChildren('Private fields received by the visitor: ',
      el('strong', { text: leaked.length ? [...new Set(leaked)].join(', ') : 'none' }));
  }

  // ---------- Socket.IO panel ----------

  const sioState = tid('sio-state');
  const sioLog = tid('sio-log');
  tid('sio-version').textContent = `v${CFG.socketIoClientVersion || '4'}`;

  function setSio(state, detail) {
    sioState.dataset.state = state;
    sioState.textContent = detail ? `${state}: ${detail}` : state;
  }

  function startSocketIo() {
    if (typeof window.io !== 'function') {
      setSio('disconnected', 'socket.io client not loaded');
      return;
    }
    let sent = null; // the token of the last handshake: a refusal is about it
    const socket = window.io(location.origin, {
      // A function, so refreshed tokens are used on reconnect.
      auth: (cb) => { sent = CFG.storeToken; cb({ token: sent }); },
      reconnectionDelay: BACKOFF_MIN_MS,
      reconnectionDelayMax: BACKOFF_MAX_MS,
    });
    socket.on('connect', () => setSio('connected', socket.io.engine?.transport?.name));
    socket.io.engine?.on?.('upgrade', (t) => setSio('connected', t.name));
    socket.on('disconnect', (reason) => setSio('disconnected', reason));
    socket.on('connect_error', async (err) => {
      setSio('disconnected', err && err.message);
      // A refusal by the server (not an unreachable server) stops socket.io-client's own
      // retries. A restarted demo refuses the old token: fetch the new ones and retry once
      // they differ from the token that was refused.
      if (socket.active) return;
      const fresh = await fetchTokens();
      if (fresh && fresh.storeToken && fresh.storeToken !== sent) {
        Object.assign(CFG, fresh);
      } else if (CFG.storeToken === sent) {
        return; // the same token refused again: reloading the page is the way out
      }
      setTimeout(() => socket.connect(), BACKOFF_MIN_MS);
    });
    socket.onAny((name, ...args) => {
      if (name === 'position') return; // a recovery position, not an event (this panel does not recover)
      const d = args[0] && typeof args[0] === 'object' ? (args[0].data || args[0]) : {};
      const what = [
        d.orderNumber !== undefined ? `#${idStr(d.orderNumber)}` : '',
        d.status || '',
        d.previousStatus ? `(was ${d.previousStatus})` : '',
        d.section || '',
      ].filter(Boolean).join(' ');
      const li = el('li', { class: 'fresh', 'data-testid': 'sio-event', 'data-event': name },
        el('span', { class: 'time', text: clock(Date.now()) }),
        el('span', { class: 'ev', text: name }),
        el('span', { text: what }));
      sioLog.prepend(li);
      while (sioLog.children.length > MAX_SIO_LOG) sioLog.lastElementChild.remove();
    });
  }

  // ---------- operations panel ----------

  // Charts of what an operator watches, from the Prometheus text at /demo/metrics
  // (the registry `/metrics` serves on the operations listener). Rates are computed
  // here from successive scrapes, as Prometheus's rate() would: a counter that went
  // down means the server restarted, so the new value counts from zero.
  const OPS_SCRAPE_MS = 1000;
  const OPS_WINDOW_MS = 120000; // what the charts show; older points are dropped
  const OPS_MIN_SPAN_MS = 10000; // the x axis of a fresh page, so two points are not a full-width line
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const CHART_W = 300;
  const CHART_H = 90;

  // Prometheus / OpenMetrics text → Map(name → [{ labels, value }]). Comments,
  // HELP/TYPE and lines it cannot read are skipped, never thrown on.
  function parseMetrics(text) {
    const out = new Map();
    for (const raw of String(text).split('\n')) {
      const line = raw.trim();
      if (!line || line.startsWith('#')) continue;
      const m = /^([A-Za-z_:][A-Za-z0-9_:]*)/.exec(line);
      if (!m) continue;
      let i = m[1].length;
      const labels = {};
      let ok = true;
      if (line[i] === '{') {
        i += 1;
        while (ok && i < line.length && line[i] !== '}') {
          const eq = line.indexOf('=', i);
          if (eq < 0 || line[eq + 1] !== '"') { ok = false; break; }
          const key = line.slice(i, eq).trim();
          let v = '';
          i = eq + 2;
          while (i < line.length && line[i] !== '"') {
            if (line[i] === '\\' && i + 1 < line.length) {
              i += 1;
              v += line[i] === 'n' ? '\n' : line[i];
            } else {
              v += line[i];
            }
            i += 1;
          }
          if (i >= line.length) { ok = false; break; }
          labels[key] = v;
          i += 1; // closing quote
          if (line[i] === ',') i += 1;
        }
        if (line[i] !== '}') ok = false;
        i += 1;
      }
      if (!ok) continue;
      const field = line.slice(i).trim().split(/\s+/)[0];
      const value = field === '+Inf' ? Infinity : field === '-Inf' ? -Infinity : Number(field);
      if (field === undefined || field === '' || (Number.isNaN(value) && field !== 'NaN')) continue;
      if (!out.has(m[1])) out.set(m[1], []);
      out.get(m[1]).push({ labels, value });
    }
    return out;
  }

  const sumOf = (samples, name, by) => {
    const parts = {};
    let total = 0;
    let seen = false;
    for (const s of samples.get(name) || []) {
      if (!Number.isFinite(s.value)) continue;
      seen = true;
      total += s.value;
      if (by) parts[s.labels[by]] = (parts[s.labels[by]] || 0) + s.value;
    }
    return seen ? { total, parts } : null;
  };

  const fmt = (v) => {
    if (!Number.isFinite(v)) return '–';
    if (Number.isInteger(v)) return String(v);
    if (Math.abs(v) >= 100) return v.toFixed(0);
    if (Math.abs(v) >= 10) return v.toFixed(1);
    return v.toFixed(2).replace(/\.?0+$/, '') || '0';
  };

  const CHARTS = [
    { metric: 'deliveries', title: 'Deliveries/s', unit: '/s', hint: 'rate of changecast_deliveries_total' },
    { metric: 'lag', title: 'Change-stream lag', unit: ' s', hint: 'changecast_stream_lag_seconds' },
    { metric: 'connections', title: 'Connections', unit: '', hint: 'changecast_connections' },
    { metric: 'recoveries', title: 'Recoveries', unit: '', hint: 'changecast_recoveries_total' },
  ];
  const charts = new Map();

  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  }

  function buildCharts() {
    const box = tid('ops-charts');
    for (const c of CHARTS) {
      const svg = svgEl('svg', {
        viewBox: `0 0 ${CHART_W} ${CHART_H}`, preserveAspectRatio: 'none',
        role: 'img', 'aria-label': c.title, 'data-testid': 'ops-svg',
      });
      const grid = svgEl('path', { class: 'grid', d: '' });
      const area = svgEl('path', { class: 'area', d: '' });
      const line = svgEl('path', { class: 'line', d: '', 'data-testid': 'ops-line' });
      svg.append(grid, area, line);
      const value = el('span', { class: 'chart-value', 'data-testid': 'ops-value', text: '–' });
      const max = el('span', { class: 'chart-max', text: '' });
      const note = el('div', { class: 'chart-note muted', text: c.hint });
      const fig = el('figure', {
        class: 'chart', 'data-testid': 'ops-chart', 'data-metric': c.metric,
        'data-points': '0', 'data-scrapes': '0', 'data-last': '', 'data-min': '',
      }, el('figcaption', {}, el('span', { class: 'chart-title', text: c.title }), value), max, svg, note);
      box.append(fig);
      charts.set(c.metric, { def: c, fig, line, area, grid, value, max, note, points: [] });
    }
  }

  // A point per scrape; `null` marks a failed scrape, drawn as a gap.
  function push(metric, t, v, note) {
    const c = charts.get(metric);
    c.points.push({ t, v });
    while (c.points.length && c.points[0].t < t - OPS_WINDOW_MS) c.points.shift();
    // A failed scrape blanks the value: a figure from before an outage is not "now".
    c.fig.dataset.last = v === null ? '' : String(v);
    c.value.textContent = v === null ? '–' : `${fmt(v)}${c.def.unit}`;
    if (note !== undefined) c.note.textContent = note;
    c.fig.dataset.scrapes = String(Number(c.fig.dataset.scrapes) + 1);
  }

  function draw(now) {
    for (const c of charts.values()) {
      const real = c.points.filter((p) => p.v !== null);
      const max = real.length ? Math.max(...real.map((p) => p.v)) : 0;
      const top = Math.max(1, max) * 1.15;
      // The x axis spans what has been scraped, up to the window: a fresh page's
      // first seconds fill the chart instead of a sliver at its right edge.
      const span = Math.min(OPS_WINDOW_MS, Math.max(OPS_MIN_SPAN_MS, now - (c.points[0]?.t ?? now)));
      const x = (t) => ((t - (now - span)) / span) * CHART_W;
      const y = (v) => CHART_H - (v / top) * CHART_H;
      let d = '';
      let a = '';
      let run = [];
      const flush = () => {
        if (!run.length) return;
        d += run.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
        a += `M${x(run[0].t).toFixed(1)},${CHART_H}`
          + run.map((p) => `L${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('')
          + `L${x(run[run.length - 1].t).toFixed(1)},${CHART_H}Z`;
        run = [];
      };
      for (const p of c.points) {
        if (p.v === null) flush();
        else run.push(p);
      }
      flush();
      c.line.setAttribute('d', d);
      c.area.setAttribute('d', a);
      c.grid.setAttribute('d', [0.25, 0.5, 0.75].map((f) => `M0,${(CHART_H * f).toFixed(1)}H${CHART_W}`).join(''));
      c.max.textContent = `max ${fmt(max)}${c.def.unit} · last ${Math.round(span / 1000)} s`;
      c.fig.dataset.points = String(real.length);
      c.fig.dataset.min = real.length ? String(Math.min(...real.map((p) => p.v))) : '';
    }
  }

  const opsState = tid('ops-state');
  let prevScrape = null; // { t, deliveries }

  async function scrapeOnce() {
    const t = Date.now();
    let samples = null;
    try {
      const r = await fetch('/demo/metrics', { cache: 'no-store' });
      if (r.ok) samples = parseMetrics(await r.text());
    } catch {
      samples = null; // server down: a gap, and the next scrape tries again
    }
    const delivered = samples && sumOf(samples, 'changecast_deliveries_total', 'wire');
    if (!delivered) {
      opsState.dataset.state = 'disconnected';
      opsState.textContent = 'no metrics';
      for (const metric of charts.keys()) push(metric, t, null);
      prevScrape = null;
      draw(t);
      return;
    }
    opsState.dataset.state = 'connected';
    opsState.textContent = 'live';
    if (prevScrape && t > prevScrape.t) {
      const grew = delivered.total - prevScrape.deliveries;
      const since = grew >= 0 ? grew : delivered.total; // a reset: the server restarted
      const wires = Object.entries(delivered.parts).map(([w, n]) => `${w} ${fmt(n)}`).join(' · ');
      push('deliveries', t, (since * 1000) / (t - prevScrape.t), `total ${wires}`);
    }
    prevScrape = { t, deliveries: delivered.total };
    const lag = sumOf(samples, 'changecast_stream_lag_seconds');
    push('lag', t, lag ? lag.total : null);
    const conns = sumOf(samples, 'changecast_connections', 'wire');
    push('connections', t, conns ? conns.total : null,
      conns ? Object.entries(conns.parts).map(([w, n]) => `${w} ${fmt(n)}`).join(' · ') : undefined);
    const rec = sumOf(samples, 'changecast_recoveries_total', 'source');
    push('recoveries', t, rec ? rec.total : null,
      rec ? `since start: ${Object.entries(rec.parts).map(([s, n]) => `${s} ${fmt(n)}`).join(' · ')}` : undefined);
    draw(t);
  }

  function startOps() {
    buildCharts();
    // Sequential, not setInterval: a slow scrape never overlaps the next one.
    const loop = async () => {
      await scrapeOnce();
      setTimeout(loop, OPS_SCRAPE_MS);
    };
    loop();
  }

  // ---------- start ----------

  tid('board-store').textContent = CFG.storeId || '?';
  tid('board-room').textContent = `store:${CFG.storeId}`;
  tid('tracker-customer').textContent = CFG.customerId || '?';
  tid('tracker-room').textContent = `customer:${CFG.customerId}`;
  tid('storefront-room').textContent = `storefront:${CFG.storeId}`;
  tid('storefront-username').textContent = `@${CFG.storeId || '…'}`;
  if (CFG.expiresAt) tid('token-expiry').textContent = new Date(CFG.expiresAt * 1000).toLocaleString();
  renderStorefront();
  refreshCounts();
  startOps(); // needs no token: it reads metrics, not rooms

  if (!CFG.storeToken || !CFG.customerToken || !CFG.visitorToken) {
    connLabel.textContent = 'disconnected';
    connDetail.textContent = 'no demo tokens in the page';
    connBox.dataset.state = 'disconnected';
    return;
  }

  conns.push(
    new NativeConn('store', 'storeToken', { onEvent: onStoreEvent, onResync: onStoreResync }),
    new NativeConn('customer', 'customerToken', {
      onEvent: onCustomerEvent,
      onResync: () => toast('Tracker resynced', 'warn'),
    }),
    new NativeConn('visitor', 'visitorToken', {
      rooms: [`storefront:${CFG.storeId}`],
      onEvent: onStorefrontEvent,
      onError: (m) => { if (m.code === 'forbidden') toast(`Storefront: ${m.message || 'forbidden'}`, 'bad'); },
    }),
  );
  for (const c of conns) c.start();
  onConnChange();
  startSocketIo();
})();
