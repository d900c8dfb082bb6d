import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { checkId } from './ids.js';

/**
 * Files under DATA_DIR, shared by API and workers (a volume in docker compose):
 *   datasets/<id>.txt, datasets/<id>.<tokenizer>.tokens, models/<id>/<version>.safetensors, checkpoints/<modelId>/<jobId>/step-<n>/.
 * Records in Redis keep paths relative to DATA_DIR so every process resolves them the same way.
 */
export class Storage {
  constructor(readonly dataDir: string) {}

  abs(rel: string): string {
    if (rel.includes('\0')) throw new Error(`path: expected no NUL byte, got ${JSON.stringify(rel)}`);
    const p = path.resolve(this.dataDir, rel);
    if (!p.startsWith(path.resolve(this.dataDir) + path.sep)) {
      throw new Error(`path: expected a file under DATA_DIR, got "${rel}"`);
    }
    return p;
  }

  datasetFile(id: string): string {
    return path.join('datasets', `${checkId('datasetId', id)}.txt`);
  }

  /** A dataset's tokens under one tokenizer (the worker's cache; see workers/token-file.ts). */
  tokensFile(id: string, tokenizer: string): string {
    if (!/^[a-z0-9_]+$/.test(tokenizer))
      throw new Error(
        `tokenizer: expected lower-case letters, digits and _, got ${JSON.stringify(tokenizer)}`,
      );
    return path.join('datasets', `${checkId('datasetId', id)}.${tokenizer}.tokens`);
  }

  weightsFile(modelId: string, version: string): string {
    if (!/^[A-Za-z0-9-]+$/.test(version))
      throw new Error(`version: expected letters, digits and -, got ${JSON.stringify(version)}`);
    return path.join('models', checkId('modelId', modelId), `${version}.safetensors`);
  }

  checkpointDir(modelId: string, jobId: string, step: number): string {
    if (!Number.isSafeInteger(step) || step < 0)
      throw new Error(`step: expected a non-negative integer, got ${step}`);
    const name = `step-${String(step).padStart(8, '0')}`;
    return path.join('checkpoints', checkId('modelId', modelId), checkId('jobId', jobId), name);
  }

  /** The folders of one model: its weights and its checkpoints. */
  modelDirs(modelId: string): string[] {
    checkId('modelId', modelId);
    return [path.join('models', modelId), path.join('checkpoints', modelId)];
  }

  /** Writes a file atomically (temporary name, then rename): readers never see half a file. */
  async write(rel: string, data: Uint8Array | string): Promise<void> {
    const file = this.abs(rel);
    await mkdir(path.dirname(file), { recursive: true });
    const tmp = `${file}.${process.pid}.${Date.now()}.tmp`;
    await writeFile(tmp, data);
    await rename(tmp, file);
  }

  async read(rel: string): Promise<Buffer> {
    return readFile(this.abs(rel));
  }

  async remove(rel: string): Promise<void> {
    await rm(this.abs(rel), { recursive: true, force: true });
  }
}
