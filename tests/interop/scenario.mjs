#!/usr/bin/env node
// ============================================================================
// scenario.mjs — end-to-end interop demo: two @meshwhisper/sdk clients
// (peer.mjs processes) talking through one relay.
//
//   node scenario.mjs ours        # our Rust relay   (MW_BIN, default: meshwhisper on PATH)
//   node scenario.mjs reference   # reference relay  (REF_RELAY: path to @meshwhisper/node's
//                                 #  dist/index.js; see docs/benchmarks.md for installing it)
//   node scenario.mjs url http://127.0.0.1:8080   # an already running relay
//   STOP_MODE=kill node scenario.mjs ours          # stop bob with SIGKILL instead of "quit"
//
// Steps: start relay; spawn alice + bob; each registers its username in the
// directory; alice finds bob by username, bob finds alice by username; 5
// messages each way; bob quits; alice sends 5 while bob is offline; bob
// restarts with the same profile dir; bob must get exactly those 5 once each,
// with the same identity; bob then replies once over the restored session.
// Every wait is bounded. Exit code 0 = PASS, 1 = FAIL, 2 = setup error.
// Work files (relay logs, peer event logs, profiles) stay in the printed dir.
// ============================================================================

import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const MODE = process.argv[2];
if (!['ours', 'reference', 'url'].includes(MODE)) {
  console.error('usage: node scenario.mjs ours|reference|url <http://host:port>');
  process.exit(2);
}
const MW_BIN = process.env.MW_BIN ?? 'meshwhisper';
const REF_RELAY = process.env.REF_RELAY ?? path.join(HERE, '../../target/reference/node_modules/@meshwhisper/node/dist/index.js');
const OVERALL_TIMEOUT_MS = Number(process.env.SCENARIO_TIMEOUT_MS ?? 240_000);
const N = 5;
const STOP_MODE = process.env.STOP_MODE === 'kill' ? 'kill' : 'quit'; // how bob is stopped
const RUN = randomBytes(3).toString('hex');
const NAMESPACE = `com.meshwhisper.interop.${RUN}`;
const WORK = fs.mkdtempSync(path.join(os.tmpdir(), `mw-interop-${MODE}-`));

const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s]`, ...a);
import { Peer, waitTexts, countTexts, sleep, setup } from './lib.mjs';
setup(WORK, log);

const checks = [];
function check(name, pass, detail = '') {
  checks.push({ name, pass: !!pass, detail });
  log(`${pass ? 'ok  ' : 'FAIL'} ${name}${detail ? ' — ' + detail : ''}`);
  return !!pass;
}

// ---- relay management --------------------------------------------------------
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

async function waitHealth(httpBase, ms) {
  const deadline = Date.now() + ms;
  let last = '';
  while (Date.now() < deadline) {
    try {
      const r = await fetch(`${httpBase}/health`, { signal: AbortSignal.timeout(1000) });
      if (r.ok) return await r.json();
      last = `HTTP ${r.status}`;
    } catch (e) { last = e.message; }
    await sleep(200);
  }
  throw new Error(`relay /health not ready within ${ms} ms (${last})`);
}

async function getHealth(httpBase) {
  try {
    const r = await fetch(`${httpBase}/health`, { signal: AbortSignal.timeout(2000) });
    return r.ok ? await r.json() : { httpStatus: r.status };
  } catch (e) { return { error: e.message }; }
}

async function startRelay() {
  if (MODE === 'url') {
    const httpBase = (process.argv[3] ?? '').replace(/\/+$/, '');
    if (!/^https?:\/\//.test(httpBase)) throw new Error('url mode needs an http(s):// base');
    await waitHealth(httpBase, 5000);
    return { httpBase, stop: async () => {}, logs: [] };
  }
  const outFile = path.join(WORK, 'relay.stdout.log');
  const errFile = path.join(WORK, 'relay.stderr.log');
  const out = fs.openSync(outFile, 'w');
  const err = fs.openSync(errFile, 'w');
  let child;
  let httpBase;
  if (MODE === 'ours') {
    const dataDir = path.join(WORK, 'relay-data');
    child = spawn(MW_BIN, ['relay', '--data-dir', dataDir, '--http', '127.0.0.1:0',
      '--listen', '/ip4/127.0.0.1/tcp/0'], { stdio: ['ignore', 'pipe', err] });
    httpBase = await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('our relay did not print http=... within 20 s')), 20_000);
      const rl = readline.createInterface({ input: child.stdout });
      rl.on('line', (line) => {
        fs.writeSync(out, line + '\n');
        const m = /^http=(\S+)/.exec(line);
        if (m) { clearTimeout(t); resolve(m[1].replace(/\/+$/, '')); }
      });
      child.once('exit', (code) => { clearTimeout(t); reject(new Error(`our relay exited early (code ${code})`)); });
    });
  } else {
    const port = await freePort();
    const dbDir = path.join(WORK, 'relay-data');
    fs.mkdirSync(dbDir, { recursive: true });
    child = spawn(process.execPath, [REF_RELAY], {
      cwd: dbDir,
      env: { ...process.env, PORT: String(port), LISTEN_HOST: '127.0.0.1',
        DB_PATH: path.join(dbDir, 'meshwhisper.db'), FEDERATION_MODE: 'off' },
      stdio: ['ignore', out, err],
    });
    child.once('exit', (code) => log(`reference relay exited (code ${code})`));
    httpBase = `http://127.0.0.1:${port}`;
  }
  const exited = new Promise((r) => child.once('exit', r));
  await waitHealth(httpBase, 20_000);
  return {
    httpBase,
    logs: [outFile, errFile],
    stop: async () => {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM');
      const done = await Promise.race([exited.then(() => true), sleep(5000).then(() => false)]);
      if (!done) { child.kill('SIGKILL'); await Promise.race([exited, sleep(2000)]); }
    },
  };
}

// ---- scenario ------------------------------------------------------------------
let relay = null;
const alice = new Peer('alice');
const bob = new Peer('bob');

async function main() {
  log(`mode=${MODE} stop=${STOP_MODE} work=${WORK} namespace=${NAMESPACE}`);
  relay = await startRelay();
  const wsUrl = relay.httpBase.replace(/^https:\/\//, 'wss://').replace(/^http:\/\//, 'ws://');
  log(`relay up: ${relay.httpBase}`);
  const initCmd = (name) => ({
    cmd: 'init', relay: wsUrl, http: relay.httpBase, namespace: NAMESPACE,
    profileDir: path.join(WORK, `profile-${name}`), username: name,
  });

  // 1. start both peers, register usernames
  await Promise.all([alice.spawn(), bob.spawn()]);
  const [ai, bi] = await Promise.all([alice.must(initCmd('alice'), 40_000), bob.must(initCmd('bob'), 40_000)]);
  check('alice and bob connected and registered their usernames', ai.connected && bi.connected,
    `alice=${ai.peerId.slice(0, 12)}… bob=${bi.peerId.slice(0, 12)}…`);

  // 2. alice finds bob by username (directory), X3DH starts
  const ac = await alice.must({ cmd: 'addContact', username: 'bob' }, 20_000);
  check('alice resolved "bob" via /directory to bob\'s peerId', ac.peerId === bi.peerId, ac.peerId);
  // bob learns alice through the inbound handshake, then wait until bob's
  // session can send (handshake_activate processed) before bob looks alice up,
  // so the SDK keeps the session instead of starting a competing handshake.
  await bob.waitEvent((e) => e.event === 'contact' && e.peerId === ai.peerId, 20_000, 'bob sees alice as contact (inbound X3DH via relay)');
  await bob.waitStatus((s) => s.contacts.some((c) => c.peerId === ai.peerId && c.canSend), 20_000, 'bob session with alice sendable');
  const bc = await bob.must({ cmd: 'addContact', username: 'alice' }, 20_000);
  check('bob resolved "alice" via /directory to alice\'s peerId', bc.peerId === ai.peerId, bc.peerId);

  // 3. 5 messages each way (both directions concurrently)
  const a2b = Array.from({ length: N }, (_, i) => `a2b-${i + 1}-${RUN}`);
  const b2a = Array.from({ length: N }, (_, i) => `b2a-${i + 1}-${RUN}`);
  await Promise.all([
    (async () => { for (const t of a2b) await alice.must({ cmd: 'send', to: 'bob', text: t }, 20_000); })(),
    (async () => { for (const t of b2a) await bob.must({ cmd: 'send', to: 'alice', text: t }, 20_000); })(),
  ]);
  const okA = await waitTexts(bob, a2b, 30_000, 'bob receives a2b');
  const okB = await waitTexts(alice, b2a, 30_000, 'alice receives b2a');
  check(`bob received all ${N} live messages from alice`, okA);
  check(`alice received all ${N} live messages from bob`, okB);

  // Let the SDK's session-health ping/pong finish (a ping left unanswered
  // while bob is offline would make alice re-handshake), bounded.
  await alice.waitStatus((s) => s.pendingPings === 0 || s.pendingPings === null, 20_000, 'alice session ping settled');

  // 4. stop bob (graceful: SDK shutdown persists state), then alice sends 5
  const hBefore = await getHealth(relay.httpBase);
  if (STOP_MODE === 'kill') {
    bob.kill(); // no SDK shutdown: state must already be on disk
    const bobExit = await Promise.race([bob.exited, sleep(5000).then(() => null)]);
    check('bob killed (SIGKILL)', bobExit && bobExit.sig === 'SIGKILL', JSON.stringify(bobExit));
  } else {
    const bobExit = await bob.quit();
    check('bob exited cleanly', bobExit.code === 0, JSON.stringify(bobExit));
  }
  // Wait (bounded, non-fatal) until the relay notices bob's socket is gone.
  const dl = Date.now() + 5000;
  let hAfter = await getHealth(relay.httpBase);
  while (Date.now() < dl && hAfter.clients === hBefore.clients) { await sleep(200); hAfter = await getHealth(relay.httpBase); }
  log(`relay /health clients: ${hBefore.clients} with bob, ${hAfter.clients} after bob left`);

  const offline = Array.from({ length: N }, (_, i) => `offline-${i + 1}-${RUN}`);
  for (const t of offline) {
    const r = await alice.must({ cmd: 'send', to: 'bob', text: t }, 20_000);
    if (r.queued) log(`note: alice queued "${t}" locally (alice not connected)`);
  }
  const hQueued = await getHealth(relay.httpBase);
  log(`relay /health after offline sends: storedBlobs=${hQueued.storedBlobs}`);

  // 5. restart bob with the same profile
  await bob.spawn();
  const bi2 = await bob.must(initCmd('bob'), 40_000);
  check('restarted bob kept its identity (same peerId, identity file reused)',
    bi2.peerId === bi.peerId && bi2.restoredIdentity, `${bi2.peerId.slice(0, 12)}… restored=${bi2.restoredIdentity}`);
  check('restarted bob kept its session with alice',
    bi2.contacts.some((c) => c.peerId === ai.peerId && c.hasSession), JSON.stringify(bi2.contacts));
  const okOff = await waitTexts(bob, offline, 30_000, 'bob receives offline messages');
  check(`restarted bob received all ${N} messages queued while offline`, okOff);

  // 6. bob answers over the restored session
  const after = `b2a-after-restart-${RUN}`;
  await bob.must({ cmd: 'send', to: 'alice', text: after }, 20_000);
  check('alice received bob\'s post-restart reply', await waitTexts(alice, [after], 20_000, 'alice receives post-restart reply'));

  // 7. settle window to catch late duplicates, then exactly-once accounting
  await sleep(3000);
  const bobGen2 = bob.messages().filter((m) => m._gen === 2);
  const gen2Texts = bobGen2.map((m) => m.text);
  const unexpected = gen2Texts.filter((t) => !offline.includes(t));
  check('restarted bob got exactly the offline messages, each once',
    offline.every((t) => gen2Texts.filter((x) => x === t).length === 1) && unexpected.length === 0,
    unexpected.length ? `unexpected: ${JSON.stringify(unexpected)}` : `${gen2Texts.length} messages`);
  const dupes = [];
  for (const [peer, texts] of [[bob, [...a2b, ...offline]], [alice, [...b2a, after]]]) {
    for (const [t, n] of countTexts(peer, texts)) if (n !== 1) dupes.push(`${peer.name}:${t}×${n}`);
  }
  check(`every message (${2 * N + N + 1}) arrived exactly once`, dupes.length === 0, dupes.join(', '));

  const [sa, sb] = await Promise.all([alice.must({ cmd: 'status' }), bob.must({ cmd: 'status' })]);
  for (const [n, s] of [['alice', sa], ['bob', sb]]) {
    log(`${n} wire: rx=${JSON.stringify(s.wire.rx)} tx=${JSON.stringify(s.wire.tx)} rxDup=${s.wire.rxDuplicates} rxText=${s.wire.rxText} txErr=${s.wire.txErrors} decryptFailures=${s.decryptFailures}`);
  }
  // HTTP calls the SDK made (all peer generations), aggregated.
  const agg = new Map();
  for (const peer of [alice, bob]) {
    for (const e of peer.events.filter((x) => x.event === 'http')) {
      const k = `${e.method} ${e.path.split('?')[0].replace(/[0-9a-f]{64}/g, '<hex64>')} -> ${e.status ?? 'ERR ' + e.error}`;
      agg.set(k, (agg.get(k) ?? 0) + 1);
    }
  }
  log('SDK HTTP calls to the relay (all peers):');
  for (const [k, n] of [...agg].sort()) log(`   ${String(n).padStart(3)} × ${k}`);
  const http5xx = [...agg.keys()].filter((k) => / -> (5\d\d|ERR)/.test(k));
  check('no HTTP 5xx / transport errors from the relay API', http5xx.length === 0, http5xx.join('; '));
  check('relay never delivered the same packet twice to a socket', sa.wire.rxDuplicates === 0 && sb.wire.rxDuplicates === 0,
    `alice=${sa.wire.rxDuplicates} bob=${sb.wire.rxDuplicates}`);
  check('no SDK decrypt failures', sa.decryptFailures === 0 && sb.decryptFailures === 0,
    `alice=${sa.decryptFailures} bob=${sb.decryptFailures}`);
}

async function cleanup() {
  await Promise.allSettled([alice.child && alice.quit(), bob.child && bob.quit()]);
  alice.kill(); bob.kill();
  if (relay) await relay.stop();
}

let fatal = null;
const overall = setTimeout(() => {
  log(`FAIL overall timeout ${OVERALL_TIMEOUT_MS} ms`);
  alice.kill(); bob.kill();
  relay?.stop().finally(() => process.exit(1));
  setTimeout(() => process.exit(1), 8000).unref();
}, OVERALL_TIMEOUT_MS);
overall.unref();

try { await main(); } catch (e) { fatal = e; log(`ERROR ${e.message}`); }
await cleanup();
clearTimeout(overall);

const failed = checks.filter((c) => !c.pass);
const pass = !fatal && failed.length === 0 && checks.length > 0;
console.log('\n==================== SUMMARY (' + MODE + ') ====================');
for (const c of checks) console.log(`${c.pass ? 'PASS' : 'FAIL'}  ${c.name}${c.detail && !c.pass ? '  [' + c.detail + ']' : ''}`);
if (fatal) console.log(`FAIL  aborted: ${fatal.message}`);
console.log(`RESULT: ${pass ? 'PASS' : 'FAIL'}  (${checks.length - failed.length}/${checks.length} checks passed${fatal ? ', aborted' : ''})`);
console.log(`logs: ${WORK}`);
if (!pass && relay?.logs?.length) {
  for (const f of relay.logs) {
    try {
      const lines = fs.readFileSync(f, 'utf8').trim().split('\n').slice(-15);
      console.log(`--- tail ${path.basename(f)} ---\n${lines.join('\n')}`);
    } catch { /* ignore */ }
  }
}
process.exit(pass ? 0 : (checks.length ? 1 : 2));
