#!/usr/bin/env node
// ============================================================================
// federation.mjs — two @meshwhisper/sdk clients homed on two different relays
// of a federated mesh (e.g. testnet/up.sh 3).
//
//   node federation.mjs http://127.0.0.1:A http://127.0.0.1:B
//
// alice uses relay A, bob relay B. They meet by exchanging the SDK's contact
// QR strings (no shared directory), exchange N messages each way live, then
// bob quits, alice sends N while bob is offline, bob restarts: bob must get
// exactly those N, each once. The SDK sends no home-relay hint, so every
// packet crosses the mesh by flooding and is stored only where the
// recipient is homed (B remembers bob's registered hashes while he is away).
// Exit code 0 = PASS, 1 = FAIL, 2 = setup error.
// ============================================================================

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { Peer, waitTexts, countTexts, sleep, setup } from './lib.mjs';

const [A, B] = process.argv.slice(2).map((u) => (u ?? '').replace(/\/+$/, ''));
if (!/^http:\/\//.test(A ?? '') || !/^http:\/\//.test(B ?? '')) {
  console.error('usage: node federation.mjs http://relayA http://relayB');
  process.exit(2);
}
const N = Number(process.env.MESSAGES ?? 20);
const RUN = randomBytes(3).toString('hex');
const NAMESPACE = `com.meshwhisper.federation.${RUN}`;
const WORK = fs.mkdtempSync(path.join(os.tmpdir(), 'mw-federation-'));
const OVERALL_TIMEOUT_MS = Number(process.env.SCENARIO_TIMEOUT_MS ?? 300_000);
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s]`, ...a);
setup(WORK, log);

const checks = [];
function check(name, pass, detail = '') {
  checks.push({ name, pass: !!pass, detail });
  log(`${pass ? 'ok  ' : 'FAIL'} ${name}${detail ? ' — ' + detail : ''}`);
  return !!pass;
}

const alice = new Peer('alice');
const bob = new Peer('bob');
const ws = (http) => http.replace(/^http:\/\//, 'ws://');
const initCmd = (name, http) => ({
  cmd: 'init', relay: ws(http), http, namespace: NAMESPACE,
  profileDir: path.join(WORK, `profile-${name}`), username: name,
});

async function main() {
  log(`alice on ${A}, bob on ${B}, work=${WORK}`);
  await Promise.all([alice.spawn(), bob.spawn()]);
  const [ai, bi] = await Promise.all([alice.must(initCmd('alice', A), 40_000), bob.must(initCmd('bob', B), 40_000)]);
  check('alice and bob connected to their own relays', ai.connected && bi.connected);

  // Meet by QR: alice scans bob's code; bob learns alice from the handshake.
  const { qr } = await bob.must({ cmd: 'qr' });
  const acc = await alice.must({ cmd: 'acceptQr', qr, name: 'bob' }, 20_000);
  check('alice accepted bob\'s QR string', acc.peerId === bi.peerId, acc.peerId);
  await bob.waitEvent((e) => e.event === 'contact' && e.peerId === ai.peerId, 60_000, 'bob sees alice (X3DH across relays)');
  await bob.waitStatus((s) => s.contacts.some((c) => c.peerId === ai.peerId && c.canSend), 60_000, 'bob can send to alice');
  await alice.waitStatus((s) => s.contacts.some((c) => c.peerId === bi.peerId && c.canSend), 60_000, 'alice can send to bob');

  const a2b = Array.from({ length: N }, (_, i) => `a2b-${i + 1}-${RUN}`);
  const b2a = Array.from({ length: N }, (_, i) => `b2a-${i + 1}-${RUN}`);
  await Promise.all([
    (async () => { for (const t of a2b) await alice.must({ cmd: 'send', to: bi.peerId, text: t }, 20_000); })(),
    (async () => { for (const t of b2a) await bob.must({ cmd: 'send', to: ai.peerId, text: t }, 20_000); })(),
  ]);
  check(`bob received ${N}/${N} live messages across relays`, await waitTexts(bob, a2b, 60_000, 'bob receives a2b'));
  check(`alice received ${N}/${N} live messages across relays`, await waitTexts(alice, b2a, 60_000, 'alice receives b2a'));
  await alice.waitStatus((s) => s.pendingPings === 0 || s.pendingPings === null, 20_000, 'alice session ping settled');

  const bobExit = await bob.quit();
  check('bob exited cleanly', bobExit.code === 0, JSON.stringify(bobExit));
  // B notices bob's socket is gone (bounded).
  const dl = Date.now() + 10_000;
  while (Date.now() < dl) {
    const h = await (await fetch(`${B}/health`)).json();
    if (h.clients === 0) break;
    await sleep(100);
  }
  const offline = Array.from({ length: N }, (_, i) => `offline-${i + 1}-${RUN}`);
  for (const t of offline) await alice.must({ cmd: 'send', to: bi.peerId, text: t }, 20_000);

  await bob.spawn();
  const bi2 = await bob.must(initCmd('bob', B), 40_000);
  check('bob restarted with the same identity', bi2.peerId === bi.peerId && bi2.restoredIdentity);
  check(`bob received ${N}/${N} messages sent while he was offline`, await waitTexts(bob, offline, 60_000, 'bob receives offline'));
  const after = `b2a-after-${RUN}`;
  await bob.must({ cmd: 'send', to: ai.peerId, text: after }, 20_000);
  check('alice received bob\'s reply after his restart', await waitTexts(alice, [after], 30_000, 'alice receives reply'));

  // Settle, then exactly-once accounting.
  await sleep(3000);
  const dupes = [];
  for (const [peer, texts] of [[bob, [...a2b, ...offline]], [alice, [...b2a, after]]]) {
    for (const [t, n] of countTexts(peer, texts)) if (n !== 1) dupes.push(`${peer.name}:${t}×${n}`);
  }
  check(`every message (${3 * N + 1}) arrived exactly once`, dupes.length === 0, dupes.join(', '));
  const [sa, sb] = await Promise.all([alice.must({ cmd: 'status' }), bob.must({ cmd: 'status' })]);
  check('no SDK decrypt failures', sa.decryptFailures === 0 && sb.decryptFailures === 0,
    `alice=${sa.decryptFailures} bob=${sb.decryptFailures}`);
}

const overall = setTimeout(() => {
  log(`FAIL overall timeout ${OVERALL_TIMEOUT_MS} ms`);
  alice.kill(); bob.kill();
  process.exit(1);
}, OVERALL_TIMEOUT_MS);
overall.unref();

let fatal = null;
try { await main(); } catch (e) { fatal = e; log(`ERROR ${e.message}`); }
await Promise.allSettled([alice.child && alice.quit(), bob.child && bob.quit()]);
alice.kill(); bob.kill();
clearTimeout(overall);
const failed = checks.filter((c) => !c.pass);
const pass = !fatal && failed.length === 0 && checks.length > 0;
console.log('\n==================== SUMMARY (federation) ====================');
for (const c of checks) console.log(`${c.pass ? 'PASS' : 'FAIL'}  ${c.name}${c.detail && !c.pass ? '  [' + c.detail + ']' : ''}`);
if (fatal) console.log(`FAIL  aborted: ${fatal.message}`);
console.log(`RESULT: ${pass ? 'PASS' : 'FAIL'}  (${checks.length - failed.length}/${checks.length} checks passed${fatal ? ', aborted' : ''})`);
console.log(`logs: ${WORK}`);
process.exit(pass ? 0 : (checks.length ? 1 : 2));
