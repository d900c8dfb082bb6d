import type { FastifyInstance } from 'fastify';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { notFound } from './errors.js';

// beside routes/ in the package; from the compiled dist/routes/, two folders up
const DASHBOARD_DIR = [
  new URL('../dashboard/', import.meta.url),
  new URL('../../dashboard/', import.meta.url),
]
  .map((u) => fileURLToPath(u))
  .find((dir) => existsSync(path.join(dir, 'index.html')))!;
const UPLOT_DIR = path.dirname(createRequire(import.meta.url).resolve('uplot/dist/uPlot.esm.js'));

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
};

/** The files the dashboard serves under /dashboard/: its own folder, and uPlot from node_modules. */
function resolveFile(name: string): string | null {
  if (name === 'vendor/uPlot.esm.js' || name === 'vendor/uPlot.min.css')
    return path.join(UPLOT_DIR, name.slice('vendor/'.length));
  // a flat folder: one plain file name, no path separators or dot segments
  if (/^[a-z][a-z0-9-]*\.(js|css|html)$/.test(name)) return path.join(DASHBOARD_DIR, name);
  return null;
}

/**
 * The web dashboard: `/` is its page, `/dashboard/*` its scripts and styles (ES modules loaded as
 * they are, no bundling) and uPlot from node_modules; nothing comes from another host. The page
 * calls the /v1 API with the key a user types in, so these routes are open like /docs.
 */
export default async function dashboardRoutes(app: FastifyInstance): Promise<void> {
  const send = async (name: string, reply: import('fastify').FastifyReply) => {
    const file = resolveFile(name);
    if (!file) throw notFound('dashboard file', name);
    let body: Buffer;
    try {
      body = await readFile(file);
    } catch {
      throw notFound('dashboard file', name);
    }
    return reply
      .type(TYPES[path.extname(file)] ?? 'application/octet-stream')
      .header('cache-control', 'no-cache')
      .send(body);
  };
  app.get('/', { schema: { hide: true } }, async (_request, reply) => send('index.html', reply));
  app.get<{ Params: { '*': string } }>('/dashboard/*', { schema: { hide: true } }, async (request, reply) =>
    send(request.params['*'], reply),
  );
}
