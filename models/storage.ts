import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

/**
 * Files under DATA_DIR, shared by API and workers (a volume in docker compose):
 *   datasets/<id>.txt, models/<id>/<version>.safetensors, checkpoints/<modelId>/<jobId>/step-<n>/.
 * Records in Redis keep paths relative to DATA_DIR so every process resolves them the same way.
 */
export class Storage {
  constructor(readonly dataDir: string) {}

  abs(rel: string): string {
    const p = path.resolve(this.dataDir, rel);
    if (!p.startsWith(path.resolve(this.dataDir) + path.sep)) {
      throw new Error(`path: expected a file under DATA_DIR, got "${rel}"`);
    }
    return p;
  }

  datasetFile(id: string): string {
    return path.join('datasets', `${id}.txt`);
  }

  weightsFile(modelId: string, version: string): string {
    return path.join('models', modelId, `${version}.safetensors`);
  }

  checkpointDir(modelId: string, jobId: string, step: number): string {
    return path.join('checkpoints', modelId, jobId, `step-${String(step).padStart(8, '0')}`);
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
