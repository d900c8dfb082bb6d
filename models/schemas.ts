import { Type, type Static, type TSchema } from '@sinclair/typebox';

/** The JSON shape of every HTTP error. */
export const ErrorResponse = Type.Object(
  {
    statusCode: Type.Integer(),
    error: Type.String(),
    message: Type.String(),
  },
  { description: 'Every error the API returns' },
);
export type ErrorResponse = Static<typeof ErrorResponse>;

export const TokenizerName = Type.Union(
  [Type.Literal('byte'), Type.Literal('cl100k_base'), Type.Literal('o200k_base')],
  { description: 'How text becomes token ids; numTokens must cover its vocabulary' },
);
export type TokenizerName = Static<typeof TokenizerName>;

const Json = Type.Record(Type.String(), Type.Unknown(), {
  description:
    'A library model definition: {wrapper, numTokens, maxSeqLen, ..., attnLayers: {type, dim, depth, heads, ...}}, ' +
    'camelCase or snake_case keys',
});

export const CreateModelBody = Type.Object(
  {
    name: Type.String({ minLength: 1, maxLength: 200 }),
    config: Json,
    tokenizer: Type.Optional(TokenizerName),
  },
  { additionalProperties: false },
);
export type CreateModelBody = Static<typeof CreateModelBody>;

export const ParameterCountBody = Type.Object(
  {
    config: Json,
    tokenizer: Type.Optional(TokenizerName),
  },
  { additionalProperties: false },
);
export type ParameterCountBody = Static<typeof ParameterCountBody>;

export const ParameterCount = Type.Object({
  parameters: Type.Integer({ description: 'Number of parameters the model would have' }),
  numTokens: Type.Integer({ description: 'Vocabulary size of the built model' }),
  maxSeqLen: Type.Integer({ description: 'Context length of the built model' }),
});

export const ModelView = Type.Object({
  id: Type.String(),
  name: Type.String(),
  config: Json,
  parameters: Type.Integer({ description: 'Number of parameters' }),
  tokenizer: TokenizerName,
  createdAt: Type.String({ format: 'date-time' }),
});
export type ModelView = Static<typeof ModelView>;

/** What the registry stores for a model: the public view plus where its current weights live. */
export interface ModelRecord extends ModelView {
  /** Path of the current weights, relative to DATA_DIR. */
  weightsFile: string;
  /** Changes whenever the weights file changes (worker caches key on it). */
  weightsVersion: number;
  /** Vocabulary size and context length of the built model. */
  numTokens: number;
  maxSeqLen: number;
}

export const DatasetView = Type.Object({
  id: Type.String(),
  name: Type.String(),
  bytes: Type.Integer(),
  createdAt: Type.String({ format: 'date-time' }),
});
export type DatasetView = Static<typeof DatasetView>;

export const CheckpointView = Type.Object({
  id: Type.String(),
  modelId: Type.String(),
  jobId: Type.String(),
  step: Type.Integer(),
  loss: Type.Union([Type.Number(), Type.Null()]),
  createdAt: Type.String({ format: 'date-time' }),
});
export type CheckpointView = Static<typeof CheckpointView>;

/** A checkpoint as stored: the public view plus its folder relative to DATA_DIR. */
export interface CheckpointRecord extends CheckpointView {
  dir: string;
}

/** Defaults of the optional training settings (the API documents them in the OpenAPI schema). */
export const TRAIN_DEFAULTS = {
  batchSize: 8,
  learningRate: 3e-4,
  /** seqLen: the model's maxSeqLen, at most this. */
  maxDefaultSeqLen: 256,
} as const;

export const Precision = Type.Union([Type.Literal('fp32'), Type.Literal('bf16')], {
  description:
    'bf16: matrix products and attention in bfloat16, parameters, optimizer state and loss in float32 (needs the torch backend on the worker); default fp32',
});

export const TrainBody = Type.Object(
  {
    datasetId: Type.String({ minLength: 1 }),
    steps: Type.Integer({ minimum: 1 }),
    batchSize: Type.Optional(
      Type.Integer({ minimum: 1, description: `Sequences per step (default ${TRAIN_DEFAULTS.batchSize})` }),
    ),
    seqLen: Type.Optional(
      Type.Integer({
        minimum: 1,
        description: `Tokens per sequence (default: the model's maxSeqLen, at most ${TRAIN_DEFAULTS.maxDefaultSeqLen})`,
      }),
    ),
    learningRate: Type.Optional(
      Type.Number({
        exclusiveMinimum: 0,
        description: `Peak AdamW learning rate (default ${TRAIN_DEFAULTS.learningRate})`,
      }),
    ),
    warmupSteps: Type.Optional(Type.Integer({ minimum: 0 })),
    weightDecay: Type.Optional(Type.Number({ minimum: 0 })),
    gradClip: Type.Optional(Type.Number({ minimum: 0 })),
    gradAccumulation: Type.Optional(Type.Integer({ minimum: 1 })),
    evalEvery: Type.Optional(Type.Integer({ minimum: 0 })),
    checkpointEvery: Type.Optional(
      Type.Integer({
        minimum: 0,
        description:
          'Save a checkpoint every this many steps (default: a tenth of steps; 0: only at the end)',
      }),
    ),
    seed: Type.Optional(Type.Integer()),
    precision: Type.Optional(Precision),
  },
  { additionalProperties: false },
);
export type TrainBody = Static<typeof TrainBody>;

export const JobState = Type.Union([
  Type.Literal('waiting'),
  Type.Literal('active'),
  Type.Literal('completed'),
  Type.Literal('failed'),
  Type.Literal('cancelled'),
]);
export type JobState = Static<typeof JobState>;

export const JobType = Type.Union([Type.Literal('train'), Type.Literal('generate')]);
export type JobType = Static<typeof JobType>;

export const JobView = Type.Object({
  id: Type.String(),
  type: JobType,
  modelId: Type.String(),
  state: JobState,
  progress: Type.Record(Type.String(), Type.Unknown()),
  result: Type.Optional(Type.Record(Type.String(), Type.Unknown())),
  error: Type.Optional(Type.String()),
  createdAt: Type.String({ format: 'date-time' }),
});
export type JobView = Static<typeof JobView>;

export const JobAccepted = Type.Object({ jobId: Type.String() });

export const GenerateBody = Type.Object(
  {
    prompt: Type.Optional(Type.String()),
    promptTokens: Type.Optional(Type.Array(Type.Integer({ minimum: 0 }), { minItems: 1 })),
    maxTokens: Type.Integer({ minimum: 1 }),
    temperature: Type.Optional(Type.Number({ minimum: 0 })),
    topK: Type.Optional(Type.Integer({ minimum: 1 })),
    topP: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 1 })),
    minP: Type.Optional(Type.Number({ minimum: 0, maximum: 1 })),
    stop: Type.Optional(Type.Array(Type.String({ minLength: 1 }), { maxItems: 16 })),
    seed: Type.Optional(Type.Integer()),
    cacheKv: Type.Optional(
      Type.Boolean({ description: 'Key/value cache (default: on while prompt + maxTokens fits maxSeqLen)' }),
    ),
    stream: Type.Optional(Type.Boolean()),
    precision: Type.Optional(Precision),
  },
  { additionalProperties: false },
);
export type GenerateBody = Static<typeof GenerateBody>;

export const GenerateResult = Type.Object({
  jobId: Type.String(),
  tokens: Type.Array(Type.Integer()),
  text: Type.String(),
  tokensPerSecond: Type.Number(),
  timeToFirstTokenMs: Type.Number(),
  finishReason: Type.Union([Type.Literal('length'), Type.Literal('stop'), Type.Literal('eos')]),
});
export type GenerateResult = Static<typeof GenerateResult>;

export const IdParams = Type.Object({ id: Type.String() });
export type IdParams = Static<typeof IdParams>;

export const Health = Type.Object({ status: Type.String() });
export const CudaDevice = Type.Object(
  {
    name: Type.Optional(Type.String()),
    memoryUsedBytes: Type.Optional(Type.Number({ description: 'In use on the device, by every process' })),
    memoryTotalBytes: Type.Optional(Type.Number()),
  },
  { description: 'The CUDA device a tensor engine computes on' },
);

export const WorkerPresence = Type.Object({
  id: Type.String({ description: 'host:pid' }),
  host: Type.String(),
  pid: Type.Integer(),
  backend: Type.Union([Type.String(), Type.Null()]),
  device: Type.Union([Type.String(), Type.Null()]),
  queues: Type.Array(Type.String()),
  cuda: Type.Optional(CudaDevice),
  updatedAt: Type.String({ format: 'date-time' }),
});

export const Ready = Type.Object({
  status: Type.Union([Type.Literal('ok'), Type.Literal('unavailable')]),
  backend: Type.Union([Type.String(), Type.Null()]),
  device: Type.Union([Type.String(), Type.Null()]),
  cuda: Type.Optional(CudaDevice),
  redis: Type.Union([Type.Literal('ok'), Type.Literal('down')]),
  engine: Type.Optional(Type.String()),
  workers: Type.Optional(
    Type.Array(WorkerPresence, { description: 'Worker processes seen in Redis in the last 30 s' }),
  ),
});

/** Standard error responses for a route's schema. */
export function errors(...codes: number[]): Record<number, TSchema> {
  const out: Record<number, TSchema> = {};
  for (const c of codes) out[c] = ErrorResponse;
  return out;
}
