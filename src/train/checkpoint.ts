/**
 * Checkpoint directories written atomically: every file goes to a fresh temporary directory, which
 * then replaces the old one by renames, so a failure at any point leaves the last good checkpoint
 * readable (under its own name, or under `<dir>.old-*` while the swap was under way).
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';

/** Writes `files` (name -> bytes) as the directory `dir`, replacing it atomically. */
export async function writeDirAtomic(dir: string, files: Record<string, Uint8Array | string>): Promise<void> {
  const abs = path.resolve(dir);
  const parent = path.dirname(abs);
  const base = path.basename(abs);
  await fs.mkdir(parent, { recursive: true });
  const tag = `${process.pid}-${randomBytes(4).toString('hex')}`;
  const tmp = path.join(parent, `${base}.tmp-${tag}`);
  await fs.mkdir(tmp);
  try {
    for (const [name, data] of Object.entries(files)) {
      const fh = await fs.open(path.join(tmp, name), 'w');
      try {
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
    }
  } catch (e) {
    await fs.rm(tmp, { recursive: true, force: true });
    throw e;
  }
  const old = path.join(parent, `${base}.old-${tag}`);
  let moved = false;
  try {
    await fs.rename(abs, old);
    moved = true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
      await fs.rm(tmp, { recursive: true, force: true });
      throw e;
    }
  }
  await fs.rename(tmp, abs);
  if (moved) await fs.rm(old, { recursive: true, force: true });
}

/**
 * The directory holding the checkpoint called `dir`: `dir` itself, or, when a swap was interrupted
 * (dir missing), the newest `<dir>.old-*` beside it. Throws when neither exists.
 */
export async function resolveCheckpointDir(dir: string): Promise<string> {
  const abs = path.resolve(dir);
  try {
    if ((await fs.stat(abs)).isDirectory()) return abs;
  } catch {
    // fall through to an interrupted swap
  }
  const parent = path.dirname(abs);
  const base = path.basename(abs);
  let names: string[];
  try {
    names = (await fs.readdir(parent)).filter((n) => n.startsWith(`${base}.old-`));
  } catch {
    names = [];
  }
  if (!names.length)
    throw new Error(`dir: expected a checkpoint directory, got ${JSON.stringify(dir)} (not found)`);
  const stats = await Promise.all(
    names.map(async (n) => [n, (await fs.stat(path.join(parent, n))).mtimeMs] as const),
  );
  stats.sort((a, b) => b[1] - a[1]);
  return path.join(parent, stats[0]![0]);
}

/** Hex sha256 of bytes. */
export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}
