// Starts the whole gateway with `scripts/run --detach` on a free loopback port, for
// Node tests (the official openai SDK, the browser tests). Stops it with `--stop`.
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const AFR = join(REPO, 'target', 'release', 'afr');
const KEY_RE = /afr_[A-Za-z0-9]{32,}/;

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Starts a stack; returns {base, home, demoKey, env, newKey(id, ...args), stop()}. */
export async function startGateway({ mockArgs } = {}) {
  const home = mkdtempSync(join(tmpdir(), 'afr-node-'));
  // mkdtemp makes it 0700; as root, nginx's workers run unprivileged and must reach
  // keys.toml and the sidecar socket inside.
  chmodSync(home, 0o755);
  const port = await freePort();
  const env = { ...process.env, AFR_HOME: home, AFR_PORT: String(port) };
  delete env.OPENAI_API_KEY;
  delete env.ANTHROPIC_API_KEY;
  if (mockArgs) env.AFR_MOCK_ARGS = mockArgs;
  const run = spawnSync(join(REPO, 'scripts', 'run'), ['--detach'], { env, encoding: 'utf8', timeout: 900_000 });
  if (run.status !== 0) {
    spawnSync(join(REPO, 'scripts', 'run'), ['--stop'], { env });
    throw new Error(`scripts/run --detach failed:\n${run.stdout}\n${run.stderr}`);
  }
  const base = `http://127.0.0.1:${port}`;
  const keysFile = join(home, 'keys.toml');
  return {
    base,
    home,
    env,
    demoKey: (run.stdout.match(KEY_RE) || [])[0],
    /** Creates a key with `afr key new` and waits until nginx has reloaded it. */
    async newKey(id, ...args) {
      const out = execFileSync(AFR, ['key', 'new', '--id', id, '--name', `node ${id}`, ...args, '--file', keysFile], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const key = out.match(KEY_RE)[0];
      const deadline = Date.now() + 3000;
      while (Date.now() < deadline) {
        const r = await fetch(`${base}/v1/models`, { headers: { Authorization: `Bearer ${key}` } });
        if (r.status !== 401) break;
        await new Promise((res) => setTimeout(res, 50));
      }
      // Each nginx worker re-reads keys.toml on its own 1 s timer: once one worker knows
      // the key, the others know it within another interval.
      await new Promise((res) => setTimeout(res, 1100));
      return key;
    },
    stop() {
      spawnSync(join(REPO, 'scripts', 'run'), ['--stop'], { env, timeout: 60_000 });
      rmSync(home, { recursive: true, force: true });
    },
  };
}
