import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { describe, expect, it } from 'vitest';

const read = (f: string) => readFileSync(new URL(`../../${f}`, import.meta.url), 'utf8');

interface ComposeService {
  image?: string;
  command?: string[];
  environment?: Record<string, string>;
  volumes?: string[];
  ports?: string[];
  container_name?: string;
  depends_on?: Record<string, { condition: string }>;
}

describe('deployment files', () => {
  it('docker-compose.yml: redis with append-only, an API and scalable workers sharing a data volume', () => {
    const doc = parse(read('docker-compose.yml'), { merge: true }) as {
      services: Record<string, ComposeService>;
      volumes: object;
    };
    const { redis, api, worker } = doc.services;
    expect(redis!.command).toEqual(expect.arrayContaining(['--appendonly', 'yes']));
    expect(api!.command).toEqual(['node', '--import', 'tsx', 'service/api.ts']);
    expect(worker!.command).toEqual(['node', '--import', 'tsx', 'service/worker.ts']);
    for (const s of [api!, worker!]) {
      expect(s.environment!.REDIS_URL).toBe('redis://redis:6379');
      expect(s.environment!.DATA_DIR).toBe('/data');
      expect(s.volumes).toContain('xt-data:/data');
      expect(s.depends_on!.redis!.condition).toBe('service_healthy');
    }
    // `--scale worker=N` needs no fixed name or host port on the worker
    expect(worker!.container_name).toBeUndefined();
    expect(worker!.ports).toBeUndefined();
    expect(Object.keys(doc.volumes)).toEqual(expect.arrayContaining(['xt-data', 'redis-data']));
  });

  it('Dockerfile: multi-stage on node:20-bookworm, Debian LibTorch, non-root, entrypoints exist', () => {
    const df = read('Dockerfile');
    expect(df).toMatch(/^FROM node:20-bookworm AS build$/m);
    expect(df).toMatch(/^FROM node:20-bookworm-slim AS runtime$/m);
    expect(df).toContain('libtorch-dev');
    expect(df).toMatch(/^USER node$/m);
    const cmd = /^CMD (.+)$/m.exec(df)![1]!;
    const script = (JSON.parse(cmd) as string[]).at(-1)!;
    expect(() => read(script)).not.toThrow();
    for (const c of ['service/api.ts', 'service/worker.ts']) expect(() => read(c)).not.toThrow();
  });

  it('Dockerfile: the addon build’s scripts are copied before `npm ci` runs them', () => {
    const df = read('Dockerfile');
    const beforeInstall = df.slice(0, df.indexOf('RUN npm ci'));
    const imported = [...read('scripts/build-native.mjs').matchAll(/from '\.\/([\w-]+\.mjs)'/g)].map(
      (m) => m[1],
    );
    expect(imported).toContain('libtorch.mjs');
    for (const f of ['build-native.mjs', ...imported]) expect(beforeInstall).toContain(`scripts/${f}`);
  });
});
