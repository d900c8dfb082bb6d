import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

/** A redis-server child process this program started and owns. */
export interface RedisChild {
  /** redis://127.0.0.1:port */
  url: string;
  /**
   * What clients on this machine connect to: the server's Unix socket (unix:///…), cheaper per
   * command than loopback TCP, where it has one; else `url`.
   */
  localUrl: string;
  port: number;
  process: ChildProcess;
  /** Stops the server (SIGTERM, then SIGKILL after 5 s) and waits for it to exit. */
  stop(): Promise<void>;
}

export interface RedisChildOptions {
  /** Folder for its data; persistence is append-only there when set, off otherwise. */
  dir?: string;
  /** Binary to run (default `redis-server` on PATH, then /usr/bin/redis-server). */
  bin?: string;
  /** Port to listen on (default: a free one), e.g. to restart a server where its clients expect it. */
  port?: number;
  /**
   * Also listen on a Unix socket (default true, except on Windows): under `dir` when its path is
   * short enough for one, else in the temporary folder, named after the port.
   */
  unixSocket?: boolean;
}

// the longest socket path every platform takes (sockaddr_un holds 104 bytes on macOS, 108 on Linux)
const MAX_SOCKET_PATH = 100;

/** Where a server on `port` keeps its Unix socket. */
function socketPath(dir: string | undefined, port: number): string {
  const inDir = dir ? path.join(dir, 'redis.sock') : null;
  if (inDir && Buffer.byteLength(inDir) <= MAX_SOCKET_PATH) return inDir;
  return path.join(os.tmpdir(), `xt-redis-${port}.sock`);
}

export const REDIS_INSTALL_HINT =
  'Redis was not found. `npm run setup` installs it (or prints the command: Debian/Ubuntu ' +
  '`sudo apt-get install redis-server`, macOS `brew install redis`); or point the service at a running ' +
  'Redis with REDIS_URL=redis://host:6379.';

/** The redis-server binary to use, or null when none is installed. */
export function findRedisServer(bin?: string): string | null {
  const candidates = bin ? [bin] : ['redis-server', '/usr/bin/redis-server', '/usr/local/bin/redis-server'];
  for (const c of candidates) {
    const r = spawnSync(c, ['--version'], { stdio: 'ignore' });
    if (r.status === 0) return c;
  }
  return null;
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Whether a server accepts a connection on 127.0.0.1:`port`, or on the Unix socket at `socket`. */
function canConnect(port: number, socket: string | null = null): Promise<boolean> {
  return new Promise((resolve) => {
    const s = socket ? net.connect(socket) : net.connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.end();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Starts a private redis-server on a free loopback port and waits until it accepts connections.
 * Throws with an install hint when redis-server is missing. A server that cannot open its Unix
 * socket (a folder where sockets cannot live) is started again without one.
 */
export async function startRedisChild(options: RedisChildOptions = {}): Promise<RedisChild> {
  const bin = findRedisServer(options.bin);
  if (!bin) throw new Error(REDIS_INSTALL_HINT);
  const port = options.port ?? (await freePort());
  const wanted = (options.unixSocket ?? process.platform !== 'win32') ? socketPath(options.dir, port) : null;
  const socket = wanted && Buffer.byteLength(wanted) <= MAX_SOCKET_PATH ? wanted : null;
  if (!socket) return launch(bin, port, options.dir, null);
  try {
    return await launch(bin, port, options.dir, socket);
  } catch (e) {
    if (!(e instanceof ExitedAtStart)) throw e;
    return launch(bin, port, options.dir, null);
  }
}

class ExitedAtStart extends Error {}

async function launch(
  bin: string,
  port: number,
  dir: string | undefined,
  socket: string | null,
): Promise<RedisChild> {
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', ''];
  if (socket) args.push('--unixsocket', socket, '--unixsocketperm', '700');
  if (dir) {
    mkdirSync(dir, { recursive: true });
    args.push('--dir', dir, '--appendonly', 'yes');
  } else {
    args.push('--appendonly', 'no');
  }
  const child = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  let exited = false;
  const exitPromise = new Promise<void>((resolve) =>
    child.once('exit', () => {
      exited = true;
      resolve();
    }),
  );
  const deadline = Date.now() + 10_000;
  // redis-server listens on TCP before it opens its socket, and exits when it cannot: it is ready
  // once both take connections
  const ready = async () => (await canConnect(port)) && (!socket || (await canConnect(port, socket)));
  while (!(await ready())) {
    if (exited) throw new ExitedAtStart(`redis-server exited at start: ${stderr.trim() || 'no message'}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`redis-server did not accept connections on port ${port} within 10 s`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  const url = `redis://127.0.0.1:${port}`;
  return {
    url,
    localUrl: socket ? `unix://${socket}` : url,
    port,
    process: child,
    async stop() {
      if (exited) return;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exitPromise;
      clearTimeout(t);
    },
  };
}
