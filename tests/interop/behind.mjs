#!/usr/bin/env node
// ============================================================================
// behind.mjs — a JS SDK client that falls behind still gets everything, at
// once, without asking. The relay under test runs with a tiny live queue
// (limits.client_queue = 2), so a burst of messages overflows it: the
// packets that did not fit stay stored, and the relay must drain them to
// the client as soon as its queue empties. The JS SDK never sends "pull",
// so a relay that only drains on hello/pull leaves them stored until the
// client reconnects.
//
//   node behind.mjs http://127.0.0.1:PORT
//
// Exit code 0 = PASS, 1 = FAIL, 2 = setup error.
// ============================================================================

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { Peer, waitTexts, countTexts, sleep, setup } from './lib.mjs';

const RELAY = (process.argv[2] ?? '').replace(/\/+$/, '');
if (!/^http:\/\//.test(RELAY)) {
  console.error('usage: node behind.mjs http://relay');
  process.exit(2);
}
const N = Number(process.env.MESSAGES ?? 60);
const RUN = randomBytes(3).toString('hex');
const NAMESPACE = `com.meshwhisper.behind.${RUN}`;
const WORK = fs.mkdtempSync(path.join(os.tmpdir(), 'mw-behind-'));
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s]`, ...a);
setup(WORK, log);

const checks = [];
function check(name, pass, detail = '') {
  checks.push({ name, pass: !!pass, detail });
  log(`${pass ? 'ok  ' : 'FAIL'} ${name}${detail ? ' — ' + detail : ''}`);
  return !!pass;
}

async function metric(name) {
  const text = await (await fetch(`${RELAY}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  return line ? Number(line.split(' ')[1]) : NaN;
}

const alice = new Peer('alice');
const bob = new Peer('bob');
const initCmd = (name) => ({
  cmd: 'init', relay: RELAY.replace(/^http:\/\//, 'ws://'), http: RELAY, namespace: NAMESPACE,
  profileDir: path.join(WORK, `profile-${name}`), username: name,
});

async function main() {
  await Promise.all([alice.spawn(), bob.spawn()]);
  const [ai, bi] = await Promise.all([alice.must(initCmd('alice'), 40_000), bob.must(initCmd('bob'), 40_000)]);
  check('alice and bob connected', ai.connected && bi.connected);
  const { qr } = await bob.must({ cmd: 'qr' });
  await alice.must({ cmd: 'acceptQr', qr, name: 'bob' }, 20_000);
  await bob.waitEvent((e) => e.event === 'contact' && e.peerId === ai.peerId, 60_000, 'bob sees alice');
  await alice.waitStatus((s) => s.contacts.some((c) => c.peerId === bi.peerId && c.canSend), 60_000, 'alice can send to bob');
  const full0 = await metric('meshwhisper_live_queue_full_total');
  const reconnects0 = bob.events.filter((e) => e.event === 'connection' && e.status === 'connected').length;

  // A burst: every send at once.
  const texts = Array.from({ length: N }, (_, i) => `burst-${i + 1}-${RUN}`);
  await Promise.all(texts.map((t) => alice.must({ cmd: 'send', to: bi.peerId, text: t }, 30_000)));
  check(`bob received ${N}/${N} without asking`, await waitTexts(bob, texts, 30_000, 'bob receives the burst'));
  const full = await metric('meshwhisper_live_queue_full_total');
  check('the burst overflowed bob\'s live queue (so the drain was exercised)', full > full0, `${full0} -> ${full}`);
  const reconnects = bob.events.filter((e) => e.event === 'connection' && e.status === 'connected').length;
  check('bob did not reconnect', reconnects === reconnects0, `${reconnects0} -> ${reconnects}`);
  await sleep(2000);
  const dupes = [...countTexts(bob, texts)].filter(([, n]) => n !== 1).map(([t, n]) => `${t}×${n}`);
  check('each arrived exactly once', dupes.length === 0, dupes.join(', '));
}

const overall = setTimeout(() => { log('FAIL overall timeout'); alice.kill(); bob.kill(); process.exit(1); }, 180_000);
overall.unref();
let fatal = null;
try { await main(); } catch (e) { fatal = e; log(`ERROR ${e.message}`); }
await Promise.allSettled([alice.child && alice.quit(), bob.child && bob.quit()]);
alice.kill(); bob.kill();
clearTimeout(overall);
const failed = checks.filter((c) => !c.pass);
const pass = !fatal && failed.length === 0 && checks.length > 0;
console.log('\n==================== SUMMARY (behind) ====================');
for (const c of checks) console.log(`${c.pass ? 'PASS' : 'FAIL'}  ${c.name}${c.detail && !c.pass ? '  [' + c.detail + ']' : ''}`);
if (fatal) console.log(`FAIL  aborted: ${fatal.message}`);
console.log(`RESULT: ${pass ? 'PASS' : 'FAIL'}  (${checks.length - failed.length}/${checks.length} checks passed${fatal ? ', aborted' : ''})`);
console.log(`logs: ${WORK}`);
process.exit(pass ? 0 : (checks.length ? 1 : 2));
