#!/usr/bin/env node
// ============================================================================
// peer.mjs — one @meshwhisper/sdk client as a long-lived process, driven over
// stdin/stdout with line-delimited JSON (one JSON object per line each way).
//
// The SDK is a process-wide singleton (MeshWhisper.init / static API), hence
// one client per process. Everything protocol-related is done by the SDK's
// public API; this file only translates JSON lines into SDK calls.
//
// stdout carries ONLY JSON lines: replies ({"ok":...}) and events ({"event":...}).
// Anything the SDK prints through console.* is turned into {"event":"log"} lines.
//
// Commands (each may carry an "id", echoed in the reply; replies are sent in
// command order because commands are executed one at a time):
//   {"cmd":"init","relay":"ws://127.0.0.1:PORT","http":"http://127.0.0.1:PORT",
//    "profileDir":"/path","username":"alice","namespace":"com.example.app",
//    "developerKey"?:<base64>,"lan"?:false,"chaffRate"?:"low"|"normal"|"high",
//    "connectTimeoutMs"?:10000}
//        -> {"ok":true,"cmd":"init","peerId":<X25519 hex>,"edPublicKey":<hex>,
//            "username":..,"restoredIdentity":bool,"connected":bool,"contacts":[..]}
//   {"cmd":"qr"}                           -> {"qr": the SDK's contact QR string}
//   {"cmd":"acceptQr","qr":Q,"name":N}     accept a contact's QR (starts X3DH)
//   {"cmd":"addContact","username":"bob"}    (directory lookup by username,
//        i.e. MeshWhisper.addContactByKey('@bob'))
//        -> {"ok":true,"peerId":..,"username":"bob"}
//   {"cmd":"send","to":"bob"|<peerId hex>,"text":"..."}
//        -> {"ok":true,"to":<peerId>,"messageId":..,"queued":bool}
//   {"cmd":"status"}   -> connection, contacts, session/diagnostic counters
//   {"cmd":"messages","with":"bob","limit"?:n} -> stored history (SDK getMessages)
//   {"cmd":"ping"}     -> {"ok":true}
//   {"cmd":"quit"}     -> graceful SDK shutdown (persists state), reply, exit 0
// Events:
//   {"event":"ready"}                                (process up, before init)
//   {"event":"message","from":<username|peerId>,"fromPeerId":..,"text":..,"id":..,"timestamp":..}
//   {"event":"contact","peerId":..,"username":..}    (new contact, e.g. inbound X3DH)
//   {"event":"connection","status":"connected"|"disconnected"}
//   {"event":"messageStatus","messageId":..,"status":..}
//   {"event":"error","message":..}                   (SDK onError)
//   {"event":"log","level":..,"msg":..}              (SDK console output)
//   {"event":"http","method":..,"path":..,"status":..} (every SDK HTTP request to the relay)
// EOF on stdin and SIGTERM/SIGINT behave like "quit".
// ============================================================================

import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { createHash } from 'node:crypto';
import { format } from 'node:util';

// ---- stdout discipline: JSON lines only ------------------------------------
function emit(obj) {
  process.stdout.write(JSON.stringify({ ...obj, ts: Date.now() }) + '\n');
}

const counters = {
  decryptFailures: 0,
  sessionPingUnanswered: 0,
  wire: { rx: {}, tx: {}, rxDuplicates: 0, rxText: 0, txErrors: 0 },
};

for (const level of ['log', 'info', 'debug', 'warn', 'error', 'trace']) {
  console[level] = (...args) => {
    const msg = format(...args);
    if (msg.includes('decrypt failed for inbound packet')) counters.decryptFailures++;
    if (msg.includes('session_ping') && msg.includes('unanswered')) counters.sessionPingUnanswered++;
    emit({ event: 'log', level, msg });
  };
}

process.on('unhandledRejection', (err) => {
  emit({ event: 'log', level: 'unhandledRejection', msg: String(err?.stack ?? err) });
});
process.on('uncaughtException', (err) => {
  emit({ event: 'log', level: 'uncaughtException', msg: String(err?.stack ?? err) });
});

// HTTP trace: the SDK talks to the relay's HTTP API with global fetch and
// swallows most failures (OPK upload/purge/claim fall back silently), so every
// request is reported as {"event":"http"} to make status differences visible.
const origFetch = globalThis.fetch;
const httpLog = [];
globalThis.fetch = async (input, init) => {
  const url = typeof input === 'string' ? input : (input?.url ?? String(input));
  const method = (init?.method ?? input?.method ?? 'GET').toUpperCase();
  let p = url;
  try { const u = new URL(url); p = u.pathname + u.search; } catch { /* keep */ }
  const started = Date.now();
  try {
    const res = await origFetch(input, init);
    let body = null;
    if (!res.ok) { try { body = (await res.clone().text()).slice(0, 300); } catch { /* ignore */ } }
    const rec = { method, path: p, status: res.status, ms: Date.now() - started, ...(body !== null ? { body } : {}) };
    httpLog.push(rec);
    emit({ event: 'http', ...rec });
    return res;
  } catch (e) {
    const rec = { method, path: p, status: null, error: String(e?.message ?? e) };
    httpLog.push(rec);
    emit({ event: 'http', ...rec });
    throw e;
  }
};

// Import the SDK only after console is redirected (it logs from module scope
// in some code paths).
const { MeshWhisper, NodeStorage, NodeTransport } = await import('@meshwhisper/sdk/node');

// ---- state ------------------------------------------------------------------
let mw = null;             // MeshWhisper instance
let cfg = null;            // init command
let connected = false;
let connWaiters = [];      // resolve fns waiting for 'connected'
let driverFile = null;     // <profileDir>/interop-driver.json (driver-only state)
let names = {};            // peerId -> username
const knownContacts = new Set();
let contactPoll = null;
let emitChain = Promise.resolve(); // keeps message/contact events in order
const seenRawPackets = new Map(); // sha256(raw packet) -> count
const FLAG_NAMES = { 1: 'data', 2: 'ack', 3: 'chaff', 4: 'handshake', 5: 'route_request', 6: 'route_offer' };

const HEX64 = /^[0-9a-f]{64}$/;
const textDecoder = new TextDecoder();
const textEncoder = new TextEncoder();

function saveDriverState() {
  if (!driverFile) return;
  const tmp = driverFile + '.tmp';
  fs.writeFileSync(tmp, JSON.stringify({ names }, null, 2));
  fs.renameSync(tmp, driverFile);
}

function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: timed out after ${ms} ms`)), ms); }),
  ]).finally(() => clearTimeout(t));
}

function waitConnected(ms) {
  if (connected) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => { connWaiters = connWaiters.filter((f) => f !== done); resolve(false); }, ms);
    const done = () => { clearTimeout(t); resolve(true); };
    connWaiters.push(done);
  });
}

// Username for a peerId: cached, else the SDK's own directory lookup
// (GET /directory?namespace=&publicKey=<ed25519 hex>), bounded.
async function usernameFor(peerId) {
  if (names[peerId]) return names[peerId];
  try {
    const u = await withTimeout(MeshWhisper.resolveUsername(peerId), 3000, 'resolveUsername');
    if (u) { names[peerId] = u; saveDriverState(); return u; }
  } catch { /* fall through */ }
  return undefined;
}

function resolveRecipient(to) {
  if (typeof to !== 'string' || !to) throw new Error('"to" must be a username or peerId');
  const bare = to.startsWith('@') ? to.slice(1) : to;
  if (HEX64.test(bare)) return bare;
  const entry = Object.entries(names).find(([, u]) => u === bare.toLowerCase());
  if (!entry) throw new Error(`unknown contact "${to}" (run addContact first)`);
  return entry[0];
}

// Diagnostic-only access to SDK internals (TypeScript-private fields). Never
// used to send/receive; only to report state. Guarded so an SDK change only
// degrades the diagnostics.
function internals() {
  const i = mw ?? {};
  return {
    sessionManager: i.sessionManager,
    pendingPings: i.pendingPings,
    outboundQueue: i.outboundQueue,
    identity: i.identity,
  };
}

// Wire tap: wrap the SDK NodeTransport's frame handler and send() (prototype,
// installed before init) to count raw frames from/to the relay. Observation
// only; the SDK processes every frame exactly as it would without the tap.
function tapWire() {
  const proto = NodeTransport?.prototype;
  if (!proto || typeof proto.handleMessage !== 'function') {
    emit({ event: 'log', level: 'driver', msg: 'wire tap unavailable (SDK internals changed)' });
    return;
  }
  const origHandle = proto.handleMessage;
  proto.handleMessage = function (raw) {
    try {
      if (raw instanceof ArrayBuffer) {
        const b = new Uint8Array(raw);
        const f = b.length >= 31 ? (FLAG_NAMES[b[1]] ?? `0x${b[1].toString(16)}`) : 'short';
        counters.wire.rx[f] = (counters.wire.rx[f] ?? 0) + 1;
        if (f !== 'chaff') {
          const h = createHash('sha256').update(b).digest('hex');
          const n = (seenRawPackets.get(h) ?? 0) + 1;
          seenRawPackets.set(h, n);
          if (n > 1) {
            counters.wire.rxDuplicates++;
            emit({ event: 'log', level: 'driver', msg: `relay delivered an identical ${f} packet ${n} times` });
          }
        }
      } else {
        counters.wire.rxText++;
        emit({ event: 'log', level: 'driver', msg: `relay sent a non-binary frame: ${String(raw).slice(0, 300)}` });
      }
    } catch { /* never interfere */ }
    return origHandle.call(this, raw);
  };
  const origSend = proto.send;
  proto.send = async function (packet, dest) {
    const f = FLAG_NAMES[packet.flags] ?? `0x${packet.flags.toString(16)}`;
    counters.wire.tx[f] = (counters.wire.tx[f] ?? 0) + 1;
    try { return await origSend.call(this, packet, dest); } catch (e) { counters.wire.txErrors++; throw e; }
  };
}
tapWire();

function contactSummary() {
  const sm = internals().sessionManager;
  return MeshWhisper.getContacts().map((peerId) => {
    const s = sm?.getSession?.(peerId);
    return {
      peerId,
      username: names[peerId] ?? null,
      hasSession: !!s,
      canSend: s ? s.sendingChainKey !== null : false,
    };
  });
}

function startContactPoll() {
  for (const p of MeshWhisper.getContacts()) knownContacts.add(p);
  contactPoll = setInterval(() => {
    if (!mw) return;
    let list;
    try { list = MeshWhisper.getContacts(); } catch { return; }
    for (const peerId of list) {
      if (knownContacts.has(peerId)) continue;
      knownContacts.add(peerId);
      emitChain = emitChain.then(async () => {
        const username = await usernameFor(peerId);
        emit({ event: 'contact', peerId, username: username ?? null });
      });
    }
  }, 250);
  contactPoll.unref();
}

// ---- commands ---------------------------------------------------------------
const handlers = {
  async ping() { return {}; },

  async init(c) {
    if (mw) throw new Error('already initialised');
    for (const k of ['relay', 'profileDir', 'username', 'namespace']) {
      if (typeof c[k] !== 'string' || !c[k]) throw new Error(`init: missing "${k}"`);
    }
    if (!/^wss?:\/\//.test(c.relay)) throw new Error('init: "relay" must be a ws:// or wss:// URL');
    // The SDK derives its HTTP base (directory, OPKs, media, archive) from the
    // relay URL (ws:// -> http://, wss:// -> https://); it has no separate
    // setting. Refuse a mismatching "http" instead of silently ignoring it.
    const derivedHttp = c.relay.replace(/^wss:\/\//, 'https://').replace(/^ws:\/\//, 'http://').replace(/\/+$/, '');
    if (c.http && c.http.replace(/\/+$/, '') !== derivedHttp) {
      throw new Error(`init: the SDK derives the HTTP base from "relay" (${derivedHttp}); "http" (${c.http}) differs`);
    }
    cfg = c;
    fs.mkdirSync(c.profileDir, { recursive: true });
    driverFile = path.join(path.resolve(c.profileDir), 'interop-driver.json');
    try { names = JSON.parse(fs.readFileSync(driverFile, 'utf8')).names ?? {}; } catch { names = {}; }
    const restoredIdentity = fs.existsSync(path.join(c.profileDir, 'identity'));

    mw = await withTimeout(MeshWhisper.init({
      namespace: c.namespace,
      node: c.relay,
      username: c.username,
      ...(c.developerKey ? { developerKey: c.developerKey } : {}),
      storage: new NodeStorage(c.profileDir),
      // LAN bearer off by default so that every packet goes through the relay
      // under test (the SDK otherwise also delivers over UDP/TCP on the LAN).
      transports: { lan: c.lan === true },
      ...(c.chaffRate ? { config: { chaffRate: c.chaffRate } } : {}),
      onMessage: (m) => {
        const text = textDecoder.decode(new Uint8Array(m.payload));
        emitChain = emitChain.then(async () => {
          const username = await usernameFor(m.senderId);
          emit({
            event: 'message', from: username ?? m.senderId, fromPeerId: m.senderId,
            text, id: m.id, timestamp: m.timestamp,
            ...(m.groupId ? { groupId: m.groupId } : {}),
          });
        });
      },
      onMessageStatus: (messageId, status) => emit({ event: 'messageStatus', messageId, status }),
      onError: (err) => emit({ event: 'error', message: String(err?.message ?? err) }),
      onConnectionStatus: (status) => {
        connected = status === 'connected';
        emit({ event: 'connection', status });
        if (connected) { const w = connWaiters; connWaiters = []; w.forEach((f) => f()); }
      },
    }), c.initTimeoutMs ?? 20000, 'MeshWhisper.init');

    const isUp = await waitConnected(c.connectTimeoutMs ?? 10000);
    if (!isUp) throw new Error(`init: could not connect to ${c.relay} within ${c.connectTimeoutMs ?? 10000} ms`);

    // start() already publishes the bundle + username fire-and-forget; make the
    // registration deterministic with the SDK's awaited call (POST /directory),
    // then confirm the directory resolves the username to us (GET /directory).
    await withTimeout(MeshWhisper.setIdentifier(c.username), 10000, 'setIdentifier');
    const mine = await withTimeout(MeshWhisper.checkIdentifierAvailable(c.username), 10000, 'checkIdentifierAvailable');
    if (!mine) throw new Error(`init: directory does not resolve "${c.username}" to this identity after registration`);

    startContactPoll();
    const idn = internals().identity;
    let edPublicKey = null;
    try { edPublicKey = Buffer.from(idn.getEdPublicKey()).toString('hex'); } catch { /* diagnostic only */ }
    return {
      peerId: MeshWhisper.getLocalPeerId(),
      edPublicKey,
      username: c.username,
      restoredIdentity,
      connected,
      contacts: contactSummary(),
    };
  },

  async addContact(c) {
    if (!mw) throw new Error('not initialised');
    const username = String(c.username ?? '').replace(/^@/, '').toLowerCase();
    if (!username) throw new Error('addContact: missing "username"');
    const peerId = await withTimeout(MeshWhisper.addContactByKey('@' + username), c.timeoutMs ?? 15000, 'addContactByKey');
    if (!peerId) throw new Error(`addContact: "${username}" not found in the relay directory`);
    names[peerId] = username;
    saveDriverState();
    knownContacts.add(peerId); // we report it in the reply, not as an event
    return { peerId, username };
  },

  // The SDK's contact QR string (base64 of our peerId and prekey bundle).
  async qr() {
    if (!mw) throw new Error('not initialised');
    return { qr: MeshWhisper.generateContactQR() };
  },

  // Accept a contact's QR string: sets their bundle and starts X3DH.
  async acceptQr(c) {
    if (!mw) throw new Error('not initialised');
    if (typeof c.qr !== 'string' || !c.qr) throw new Error('acceptQr: missing "qr"');
    await withTimeout(MeshWhisper.acceptContact(c.qr), c.timeoutMs ?? 15000, 'acceptContact');
    const raw = Buffer.from(c.qr, 'base64');
    const len = raw.readUInt16BE(0);
    const peerId = raw.subarray(2, 2 + len).toString('utf8');
    if (c.name) { names[peerId] = String(c.name).toLowerCase(); saveDriverState(); }
    knownContacts.add(peerId);
    return { peerId };
  },

  async send(c) {
    if (!mw) throw new Error('not initialised');
    if (typeof c.text !== 'string') throw new Error('send: "text" must be a string');
    const peerId = resolveRecipient(c.to);
    const queued = !connected;
    await withTimeout(MeshWhisper.send(peerId, textEncoder.encode(c.text)), c.timeoutMs ?? 15000, 'send');
    let messageId = null;
    if (!queued) {
      try {
        const last = await MeshWhisper.getMessages(peerId, { limit: 1 });
        if (last[0] && last[0].direction === 'outbound') messageId = last[0].id;
      } catch { /* best effort */ }
    }
    return { to: peerId, messageId, queued };
  },

  async messages(c) {
    if (!mw) throw new Error('not initialised');
    const peerId = resolveRecipient(c.with);
    const list = await MeshWhisper.getMessages(peerId, c.limit ? { limit: c.limit } : undefined);
    return {
      messages: list.map((m) => ({
        id: m.id, direction: m.direction, status: m.status, timestamp: m.timestamp,
        text: textDecoder.decode(new Uint8Array(m.payload)),
      })),
    };
  },

  async status() {
    const i = internals();
    return {
      initialised: !!mw,
      connected,
      peerId: mw ? MeshWhisper.getLocalPeerId() : null,
      username: cfg?.username ?? null,
      contacts: mw ? contactSummary() : [],
      pendingPings: i.pendingPings?.size ?? null,
      outboundQueue: i.outboundQueue?.length ?? null,
      decryptFailures: counters.decryptFailures,
      sessionPingUnanswered: counters.sessionPingUnanswered,
      wire: counters.wire,
      http: httpLog.map((r) => `${r.method} ${r.path.split('?')[0]} ${r.status}`),
    };
  },

  async quit() {
    await shutdown();
    return { exiting: true };
  },
};

let shuttingDown = false;
async function shutdown() {
  if (shuttingDown) return;
  shuttingDown = true;
  if (contactPoll) clearInterval(contactPoll);
  try { await withTimeout(emitChain, 3000, 'flush events'); } catch { /* ignore */ }
  if (mw) {
    try { await withTimeout(mw.shutdown(), 5000, 'MeshWhisper.shutdown'); } catch (e) {
      emit({ event: 'log', level: 'driver', msg: `shutdown: ${e.message}` });
    }
  }
  saveDriverState();
}

function exitSoon(code) {
  // Let stdout drain before exiting.
  process.stdout.write('', () => process.exit(code));
  setTimeout(() => process.exit(code), 2000).unref();
}

// ---- main loop: one command at a time ----------------------------------------
let chain = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  if (!line.trim()) return;
  chain = chain.then(async () => {
    let c;
    try { c = JSON.parse(line); } catch {
      emit({ ok: false, error: 'invalid JSON', line });
      return;
    }
    const h = handlers[c?.cmd];
    const base = { cmd: c?.cmd, ...(c?.id !== undefined ? { id: c.id } : {}) };
    if (!h) { emit({ ok: false, ...base, error: `unknown cmd ${JSON.stringify(c?.cmd)}` }); return; }
    if (shuttingDown && c.cmd !== 'quit') { emit({ ok: false, ...base, error: 'shutting down' }); return; }
    try {
      const res = await h(c);
      emit({ ok: true, ...base, ...res });
    } catch (e) {
      emit({ ok: false, ...base, error: String(e?.message ?? e) });
    }
    if (c.cmd === 'quit') exitSoon(0);
  });
});
rl.on('close', () => { chain = chain.then(async () => { await shutdown(); exitSoon(0); }); });
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => { shutdown().finally(() => exitSoon(0)); });
}

emit({ event: 'ready', pid: process.pid, sdk: '0.5.0' });
