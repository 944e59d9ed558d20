// lib.mjs — shared by scenario.mjs and federation.mjs: a peer.mjs process
// wrapper and message accounting helpers.

import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let WORK = '.';
let log = (...a) => console.log(...a);

/** Where peer logs go and how to log. */
export function setup(work, logger) { WORK = work; log = logger; }

// ---- peer process wrapper -------------------------------------------------------
export class Peer {
  constructor(name) {
    this.name = name;
    this.events = [];
    this.waiters = [];
    this.pending = new Map();
    this.nextId = 1;
    this.gen = 0;
  }

  spawn() {
    this.gen++;
    const tag = `${this.name}.${this.gen}`;
    this.eventLog = fs.createWriteStream(path.join(WORK, `${tag}.events.jsonl`));
    const err = fs.openSync(path.join(WORK, `${tag}.stderr.log`), 'w');
    this.child = spawn(process.execPath, [path.join(HERE, 'peer.mjs')], { stdio: ['pipe', 'pipe', err] });
    this.exited = new Promise((r) => this.child.once('exit', (code, sig) => r({ code, sig })));
    const rl = readline.createInterface({ input: this.child.stdout });
    rl.on('line', (line) => {
      this.eventLog.write(line + '\n');
      let obj;
      try { obj = JSON.parse(line); } catch { log(`${this.name}: non-JSON stdout: ${line}`); return; }
      obj._gen = this.gen;
      if ('ok' in obj && obj.id !== undefined && this.pending.has(obj.id)) {
        const p = this.pending.get(obj.id); this.pending.delete(obj.id); p(obj); return;
      }
      if (obj.event === 'log' && obj.level !== 'debug') log(`${this.name} sdk ${obj.level}: ${obj.msg.slice(0, 300)}`);
      if (obj.event === 'error') log(`${this.name} sdk onError: ${obj.message}`);
      this.events.push(obj);
      for (const w of [...this.waiters]) w();
    });
    this.child.once('exit', (code, sig) => {
      for (const [, p] of this.pending) p({ ok: false, error: `peer exited (code ${code}, signal ${sig})` });
      this.pending.clear();
      for (const w of [...this.waiters]) w();
    });
    return this.waitEvent((e) => e.event === 'ready' && e._gen === this.gen, 15_000, `${this.name} ready`);
  }

  cmd(obj, timeoutMs = 30_000) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => { this.pending.delete(id); reject(new Error(`${this.name} ${obj.cmd}: no reply in ${timeoutMs} ms`)); }, timeoutMs);
      this.pending.set(id, (r) => { clearTimeout(t); resolve(r); });
      this.child.stdin.write(JSON.stringify({ ...obj, id }) + '\n');
    });
  }

  async must(obj, timeoutMs) {
    const r = await this.cmd(obj, timeoutMs);
    if (!r.ok) throw new Error(`${this.name} ${obj.cmd} failed: ${r.error}`);
    return r;
  }

  // Resolve when pred matches any recorded event (past or future); bounded.
  waitEvent(pred, timeoutMs, desc) {
    return new Promise((resolve, reject) => {
      const tryIt = () => {
        const e = this.events.find(pred);
        if (e) { cleanup(); resolve(e); return true; }
        if (!this.alive) {
          cleanup(); reject(new Error(`${desc}: peer ${this.name} exited`)); return true;
        }
        return false;
      };
      const t = setTimeout(() => { cleanup(); reject(new Error(`${desc}: timed out after ${timeoutMs} ms`)); }, timeoutMs);
      const cleanup = () => { clearTimeout(t); this.waiters = this.waiters.filter((w) => w !== tryIt); };
      if (!tryIt()) this.waiters.push(tryIt);
    });
  }

  // Poll status until pred(status) holds; bounded.
  async waitStatus(pred, timeoutMs, desc) {
    const deadline = Date.now() + timeoutMs;
    let s;
    while (Date.now() < deadline) {
      s = await this.must({ cmd: 'status' }, 5000);
      if (pred(s)) return s;
      await sleep(250);
    }
    throw new Error(`${desc}: timed out after ${timeoutMs} ms (last status ${JSON.stringify(s)})`);
  }

  get alive() { return !!this.child && this.child.exitCode === null && this.child.signalCode === null; }

  messages() { return this.events.filter((e) => e.event === 'message'); }

  async quit(timeoutMs = 15_000) {
    if (!this.alive) return this.exited;
    try { await this.cmd({ cmd: 'quit' }, timeoutMs); } catch (e) { log(`${this.name}: ${e.message}`); }
    const r = await Promise.race([this.exited, sleep(5000).then(() => null)]);
    if (r) return r;
    this.child.kill('SIGKILL');
    return this.exited;
  }

  kill() { if (this.alive) this.child.kill('SIGKILL'); }
}


export async function waitTexts(peer, texts, timeoutMs, desc) {
  const want = new Set(texts);
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const got = new Set(peer.messages().map((m) => m.text));
    if ([...want].every((t) => got.has(t))) return true;
    try {
      await peer.waitEvent((e) => e.event === 'message' && !got.has(e.text), Math.max(1, deadline - Date.now()), desc);
    } catch { break; }
  }
  const got = new Set(peer.messages().map((m) => m.text));
  const missing = [...want].filter((t) => !got.has(t));
  log(`${desc}: missing ${missing.length}/${want.size}: ${JSON.stringify(missing)}`);
  return false;
}

export function countTexts(peer, texts) {
  const counts = new Map(texts.map((t) => [t, 0]));
  for (const m of peer.messages()) if (counts.has(m.text)) counts.set(m.text, counts.get(m.text) + 1);
  return counts;
}

