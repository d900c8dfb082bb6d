import type { FastifyInstance } from 'fastify';
import { Type, type Static } from '@sinclair/typebox';
import { isUtf8 } from 'node:buffer';
import { randomUUID } from 'node:crypto';
import { DatasetView, IdParams, errors } from '../models/schemas.js';
import { TOKENIZER_NAMES } from '../src/index.js';
import { firstInvalidUtf8 } from '../models/utf8.js';
import { badRequest, notFound } from './errors.js';
import { uploadedBytes } from './models.js';

const DatasetQuery = Type.Object({ name: Type.Optional(Type.String({ minLength: 1, maxLength: 200 })) });
type DatasetQuery = Static<typeof DatasetQuery>;

/** Training text: upload (text/plain body or multipart file), list, delete. */
export default async function datasetRoutes(app: FastifyInstance): Promise<void> {
  const { registry, storage, limits } = app.svc;

  app.post<{ Querystring: DatasetQuery }>(
    '/datasets',
    {
      bodyLimit: limits.maxUploadBytes,
      schema: {
        tags: ['datasets'],
        summary: 'Upload training text: a text/plain body, or a multipart/form-data file (UTF-8)',
        querystring: DatasetQuery,
        consumes: ['text/plain', 'multipart/form-data', 'application/octet-stream'],
        response: { 201: DatasetView, ...errors(400, 401, 413) },
      },
    },
    async (request, reply) => {
      const { bytes, filename, fields } = await uploadedBytes(request, limits.maxUploadBytes);
      if (bytes.byteLength === 0) throw badRequest('body: expected non-empty text, got 0 bytes');
      const bad = isUtf8(bytes) ? -1 : firstInvalidUtf8(bytes);
      if (bad >= 0) {
        const got = [...bytes.subarray(bad, bad + 4)].map((b) => b.toString(16).padStart(2, '0')).join(' ');
        throw badRequest(`body: expected UTF-8 text, got bytes ${got} at byte ${bad}`);
      }
      const name = request.query.name ?? fields.name ?? filename ?? 'dataset';
      const id = randomUUID();
      await storage.write(storage.datasetFile(id), bytes);
      const view = { id, name, bytes: bytes.byteLength, createdAt: new Date().toISOString() };
      await registry.putDataset(view);
      return reply.status(201).send(view);
    },
  );

  app.get(
    '/datasets',
    {
      schema: {
        tags: ['datasets'],
        summary: 'List datasets',
        response: { 200: Type.Object({ datasets: Type.Array(DatasetView) }), ...errors(401) },
      },
    },
    async () => ({ datasets: await registry.listDatasets() }),
  );

  app.delete<{ Params: IdParams }>(
    '/datasets/:id',
    {
      schema: {
        tags: ['datasets'],
        summary: 'Delete a dataset',
        params: IdParams,
        response: { 204: Type.Null(), ...errors(401, 404) },
      },
    },
    async (request, reply) => {
      const d = await registry.getDataset(request.params.id);
      if (!d) throw notFound('dataset', request.params.id);
      await registry.deleteDataset(d.id);
      await storage.remove(storage.datasetFile(d.id));
      for (const t of TOKENIZER_NAMES) await storage.remove(storage.tokensFile(d.id, t));
      return reply.status(204).send();
    },
  );
}
