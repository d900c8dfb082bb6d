import type { FastifyInstance, FastifyRequest } from 'fastify';
import { randomUUID } from 'node:crypto';
import { parameterLowerBound } from '../models/parameter-bound.js';
import { checkpointView, modelView } from '../models/registry.js';
import {
  CheckpointView,
  CreateModelBody,
  IdParams,
  ModelView,
  ParameterCount,
  ParameterCountBody,
  errors,
  type ModelRecord,
  type TokenizerName,
} from '../models/schemas.js';
import { Type } from '@sinclair/typebox';
import { loadSafetensors, saveSafetensors } from '../src/index.js';
import {
  buildModel,
  DefinitionError,
  EngineUnavailableError,
  getTokenizer,
  loadWeights,
} from '../workers/engine.js';
import { badRequest, conflict, HttpError, notFound, unavailable } from './errors.js';

/** Turns library errors into 400 (bad definition) / 503 (engine missing). */
export function engineCall<T>(fn: () => T): T {
  const mapped = (e: unknown): unknown => {
    if (e instanceof DefinitionError) return badRequest(`config.${e.message}`);
    if (e instanceof EngineUnavailableError) return unavailable(`engine not ready: ${e.message}`);
    return e;
  };
  try {
    const r = fn();
    // a promise's rejection is mapped the same way
    if (r instanceof Promise) return r.catch((e: unknown) => Promise.reject(mapped(e))) as T;
    return r;
  } catch (e) {
    throw mapped(e);
  }
}

/**
 * Reads an uploaded file: multipart (first file) or a raw body (octet-stream / text). A multipart
 * file over `fileSize` is refused (413) as soon as it passes the limit: the rest is not read.
 */
export async function uploadedBytes(
  request: FastifyRequest,
  fileSize: number,
): Promise<{ bytes: Buffer; filename?: string; fields: Record<string, string> }> {
  if (request.isMultipart()) {
    const fields: Record<string, string> = {};
    let out: { bytes: Buffer; filename?: string } | null = null;
    try {
      for await (const part of request.parts({ limits: { fileSize } })) {
        if (part.type === 'file') {
          const chunks: Buffer[] = [];
          // past the limit the parser skips the part's data until its boundary: stop reading at once
          part.file.once('limit', () => part.file.destroy(uploadTooLarge(fileSize)));
          for await (const chunk of part.file as AsyncIterable<Buffer>) {
            if (part.file.truncated) throw uploadTooLarge(fileSize);
            chunks.push(chunk);
          }
          if (part.file.truncated) throw uploadTooLarge(fileSize);
          if (!out) out = { bytes: Buffer.concat(chunks), filename: part.filename };
        } else if (typeof part.value === 'string') {
          fields[part.fieldname] = part.value;
        }
      }
    } catch (e) {
      const status = (e as { statusCode?: number }).statusCode;
      if (e instanceof HttpError || (status !== undefined && status < 500)) throw e;
      throw badRequest(`file: expected a complete multipart/form-data body, got ${(e as Error).message}`);
    }
    if (!out) throw badRequest('file: expected a multipart file part, got none');
    return { ...out, fields };
  }
  const body = request.body;
  if (Buffer.isBuffer(body)) return { bytes: body, fields: {} };
  if (typeof body === 'string') return { bytes: Buffer.from(body, 'utf8'), fields: {} };
  throw badRequest(
    `body: expected text/plain, application/octet-stream or multipart/form-data, got ${request.headers['content-type'] ?? 'no content type'}`,
  );
}

const uploadTooLarge = (limit: number) =>
  new HttpError(413, `request body exceeds the upload limit MAX_UPLOAD_BYTES=${limit}`);

/**
 * Training checkpoints hold the AutoregressiveWrapper's state dict (keys under `net.`); downloads
 * give the model's own names, as the reference's TransformerWrapper.state_dict() has them.
 */
function unprefixed(bytes: Buffer): Uint8Array {
  const { metadata, tensors } = loadSafetensors(
    new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength),
  );
  try {
    const names = Object.keys(tensors);
    if (!names.length || !names.every((k) => k.startsWith('net.'))) return bytes;
    return saveSafetensors(Object.fromEntries(names.map((k) => [k.slice(4), tensors[k]!])), metadata);
  } finally {
    for (const t of Object.values(tensors)) t.dispose();
  }
}

/** Model definitions: create, list, read, delete, checkpoints, weights download/upload. */
export default async function modelRoutes(app: FastifyInstance): Promise<void> {
  const { registry, storage, limits } = app.svc;

  const getOr404 = async (id: string): Promise<ModelRecord> => {
    const m = await registry.getModel(id);
    if (!m) throw notFound('model', id);
    return m;
  };

  /**
   * Builds a definition as a create does (on the builder's thread) and checks it against the
   * tokenizer and MAX_PARAMETERS; a definition over the limit even at its lower bound is refused
   * before anything is allocated.
   */
  const buildChecked = async (config: Record<string, unknown>, tokenizerName: TokenizerName) => {
    const bound = parameterLowerBound(config);
    if (bound.total > limits.maxParameters) {
      throw badRequest(
        `config: the model would have at least ${bound.total} parameters (token embedding ${bound.embedding}, ` +
          `attention ${bound.attention}, feedforward ${bound.feedforward}), over the limit MAX_PARAMETERS=${limits.maxParameters}`,
      );
    }
    const tokenizer = engineCall(() => getTokenizer(tokenizerName));
    // weight initialisation runs on the builder's thread, not on this event loop
    const built = await engineCall(() => app.svc.builder.build(config));
    if (built.numTokens < tokenizer.vocabSize) {
      throw badRequest(
        `config.numTokens: expected at least ${tokenizer.vocabSize} (the ${tokenizerName} tokenizer's vocabulary), got ${built.numTokens}`,
      );
    }
    if (built.parameters > limits.maxParameters) {
      throw badRequest(
        `config: the model has ${built.parameters} parameters, over the limit MAX_PARAMETERS=${limits.maxParameters}`,
      );
    }
    return built;
  };

  app.post<{ Body: CreateModelBody }>(
    '/models',
    {
      schema: {
        tags: ['models'],
        summary: 'Create a model from a JSON definition (library config); weights are initialised',
        body: CreateModelBody,
        response: { 201: ModelView, ...errors(400, 401, 413, 503) },
      },
    },
    async (request, reply) => {
      const { name, config } = request.body;
      const tokenizerName: TokenizerName = request.body.tokenizer ?? 'byte';
      const built = await buildChecked(config, tokenizerName);
      const id = randomUUID();
      const weightsFile = storage.weightsFile(id, 'initial');
      await storage.write(weightsFile, built.bytes);
      const record: ModelRecord = {
        id,
        name,
        config,
        parameters: built.parameters,
        tokenizer: tokenizerName,
        createdAt: new Date().toISOString(),
        weightsFile,
        weightsVersion: Date.now(),
        numTokens: built.numTokens,
        maxSeqLen: built.maxSeqLen,
      };
      await registry.putModel(record);
      return reply.status(201).send(modelView(record));
    },
  );

  app.post<{ Body: ParameterCountBody }>(
    '/models/parameters',
    {
      schema: {
        tags: ['models'],
        summary:
          "Count a definition's parameters without creating the model (checked as a create is: 400 names the field)",
        body: ParameterCountBody,
        response: { 200: ParameterCount, ...errors(400, 401, 413, 503) },
      },
    },
    async (request) => {
      const built = await buildChecked(request.body.config, request.body.tokenizer ?? 'byte');
      return { parameters: built.parameters, numTokens: built.numTokens, maxSeqLen: built.maxSeqLen };
    },
  );

  app.get(
    '/models',
    {
      schema: {
        tags: ['models'],
        summary: 'List models',
        response: { 200: Type.Object({ models: Type.Array(ModelView) }), ...errors(401) },
      },
    },
    async () => ({ models: (await registry.listModels()).map(modelView) }),
  );

  app.get<{ Params: IdParams }>(
    '/models/:id',
    {
      schema: {
        tags: ['models'],
        summary: 'Read a model',
        params: IdParams,
        response: { 200: ModelView, ...errors(401, 404) },
      },
    },
    async (request) => modelView(await getOr404(request.params.id)),
  );

  app.delete<{ Params: IdParams }>(
    '/models/:id',
    {
      schema: {
        tags: ['models'],
        summary: 'Delete a model, its weights and checkpoints (409 while a job uses it)',
        params: IdParams,
        response: { 204: Type.Null(), ...errors(401, 404, 409) },
      },
    },
    async (request, reply) => {
      const m = await getOr404(request.params.id);
      const jobs = await registry.activeModelJobs(m.id);
      if (jobs.length)
        throw conflict(`model ${m.id} is in use by job(s) ${jobs.join(', ')}; cancel them first`);
      await registry.deleteModel(m.id);
      for (const dir of storage.modelDirs(m.id)) await storage.remove(dir);
      return reply.status(204).send();
    },
  );

  app.get<{ Params: IdParams }>(
    '/models/:id/checkpoints',
    {
      schema: {
        tags: ['models'],
        summary: 'List the checkpoints training saved for a model, oldest first',
        params: IdParams,
        response: { 200: Type.Object({ checkpoints: Type.Array(CheckpointView) }), ...errors(401, 404) },
      },
    },
    async (request) => {
      const m = await getOr404(request.params.id);
      return { checkpoints: (await registry.listCheckpoints(m.id)).map(checkpointView) };
    },
  );

  app.get<{ Params: IdParams }>(
    '/models/:id/weights',
    {
      schema: {
        tags: ['models'],
        summary:
          'Download the current weights (the latest checkpoint, or the initial/uploaded weights) as safetensors',
        params: IdParams,
        produces: ['application/octet-stream'],
        response: { ...errors(401, 404) },
      },
    },
    async (request, reply) => {
      const m = await getOr404(request.params.id);
      const bytes = unprefixed(await storage.read(m.weightsFile));
      return reply
        .type('application/octet-stream')
        .header('content-disposition', `attachment; filename="${m.id}.safetensors"`)
        .send(bytes);
    },
  );

  app.put<{ Params: IdParams }>(
    '/models/:id/weights',
    {
      bodyLimit: limits.maxUploadBytes,
      schema: {
        tags: ['models'],
        summary:
          'Upload weights (safetensors, e.g. exported from x-transformers): checked strictly against the model; ' +
          '400 lists missing, unexpected and mis-shaped keys',
        params: IdParams,
        consumes: ['application/octet-stream', 'multipart/form-data'],
        response: { 200: ModelView, ...errors(400, 401, 404, 409, 413, 503) },
      },
    },
    async (request) => {
      const m = await getOr404(request.params.id);
      const { bytes } = await uploadedBytes(request, limits.maxUploadBytes);
      const jobs = await registry.activeModelJobs(m.id);
      if (jobs.some((j) => j)) {
        const running = [];
        for (const j of jobs) if ((await registry.getJob(j))?.type === 'train') running.push(j);
        if (running.length) throw conflict(`model ${m.id} is being trained by job(s) ${running.join(', ')}`);
      }
      const built = engineCall(() => buildModel(m.config));
      try {
        try {
          loadWeights(
            built.model,
            new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength),
            'upload',
          );
        } catch (e) {
          throw badRequest(`weights: ${(e as Error).message}`);
        }
      } finally {
        built.model.dispose();
      }
      const file = storage.weightsFile(m.id, `upload-${Date.now()}`);
      await storage.write(file, bytes);
      const updated = await registry.setModelWeights(m.id, file);
      return modelView(updated ?? m);
    },
  );
}
