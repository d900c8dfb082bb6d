import { attentionDefaults } from '../src/attention/types.js';
import { camelKey } from '../src/io/config.js';
import { attentionLayersDefaults } from '../src/layers/options.js';
import { feedForwardDefaults } from '../src/nn/feedforward.js';

/** A lower bound of a definition's parameter count, by the part that holds them. */
export interface ParameterBound {
  total: number;
  /** Token embedding: numTokens x (embDim ?? dim). */
  embedding: number;
  /** Query projections: attention layers x dim x heads x attnDimHead (less with latent queries). */
  attention: number;
  /** Feedforward projections: feedforward layers x 2 x dim x floor(dim x ffMult). */
  feedforward: number;
}

const positive = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v) && v > 0;

function camel(o: unknown): Record<string, unknown> {
  if (!o || typeof o !== 'object' || Array.isArray(o)) return {};
  return Object.fromEntries(Object.entries(o).map(([k, v]) => [camelKey(k), v]));
}

/**
 * The fewest parameters a TransformerWrapper definition can build into, read from the JSON alone:
 * the token embedding, each attention's query projection and each feedforward's two projections
 * (the sizes the definition gives, else the library's defaults). Everything else a model holds only
 * adds to it, so a bound over MAX_PARAMETERS refuses a model before anything is allocated, and never
 * refuses one under the limit. Values the library would reject count as nothing here (the build
 * names them).
 */
export function parameterLowerBound(config: Record<string, unknown>): ParameterBound {
  const top = camel(config);
  const layers = camel(top.attnLayers);
  const dim = positive(layers.dim) ? Math.floor(layers.dim) : 0;
  const numTokens = positive(top.numTokens) ? Math.floor(top.numTokens) : 0;
  const embDim = positive(top.embDim) ? Math.floor(top.embDim) : dim;
  const heads = Math.min(
    positive(layers.heads) ? Math.floor(layers.heads) : attentionLayersDefaults.heads,
    positive(layers.attnHeads) ? Math.floor(layers.attnHeads) : Infinity,
  );
  const dimHead = positive(layers.attnDimHead) ? Math.floor(layers.attnDimHead) : attentionDefaults.dimHead;
  const mult = positive(layers.ffMult) ? layers.ffMult : feedForwardDefaults.mult;
  const inner = Math.floor(dim * mult);

  // layers: `customLayers` lists them; otherwise depth x (attention, feedforward), plus a
  // cross-attention per block with crossAttend; `parRatio` / `sandwichCoef` rearrange them (not counted)
  let nAttn = 0;
  let nFf = 0;
  if (Array.isArray(layers.customLayers)) {
    nAttn = layers.customLayers.filter((t) => t === 'a' || t === 'c').length;
    nFf = layers.customLayers.filter((t) => t === 'f').length;
  } else if (positive(layers.depth) && layers.parRatio == null && layers.sandwichCoef == null) {
    const depth = Math.floor(layers.depth);
    nAttn = depth * (layers.crossAttend === true ? 2 : 1);
    nFf = depth;
  }
  const embedding = numTokens * embDim;
  // latent queries (attnUseLatentQ) replace dim x (heads x dimHead) by dimLatentQ x (dim + heads x dimHead)
  let perAttn = dim * heads * dimHead;
  for (const p of ['attn', 'crossAttn'])
    if (layers[`${p}UseLatentQ`] === true) {
      const latent = layers[`${p}DimLatentQ`];
      const d = positive(latent) ? Math.floor(latent) : 0;
      perAttn = Math.min(perAttn, d * (dim + heads * dimHead));
    }
  const attention = nAttn * perAttn;
  const feedforward = inner >= 1 && Number.isSafeInteger(inner) ? nFf * 2 * dim * inner : 0;
  return { total: embedding + attention + feedforward, embedding, attention, feedforward };
}
