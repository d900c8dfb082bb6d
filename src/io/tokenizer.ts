/**
 * Tokenizers: byte-level (UTF-8 bytes, vocabulary 256, the default) and byte-pair encodings
 * `cl100k_base` / `o200k_base` through gpt-tokenizer (loaded on first use).
 */
import { createRequire } from 'node:module';

/** Names `createTokenizer` accepts. */
export const TOKENIZER_NAMES = ['byte', 'cl100k_base', 'o200k_base'] as const;
export type TokenizerName = (typeof TOKENIZER_NAMES)[number];

/** Text <-> token ids. Ids are in `[0, vocabSize)`. */
export interface Tokenizer {
  readonly name: TokenizerName;
  readonly vocabSize: number;
  encode(text: string): number[];
  decode(ids: number[]): string;
  /** The end-of-text id, where the encoding has one. */
  readonly eosTokenId?: number;
}

const utf8 = new TextDecoder('utf-8');

/** UTF-8 bytes as tokens. Decoding replaces invalid byte sequences with U+FFFD. */
export class ByteTokenizer implements Tokenizer {
  readonly name = 'byte' as const;
  readonly vocabSize = 256;
  private readonly encoder = new TextEncoder();

  encode(text: string): number[] {
    if (typeof text !== 'string') throw new Error(`text: expected a string, got ${typeof text}`);
    return Array.from(this.encoder.encode(text));
  }

  decode(ids: number[]): string {
    const bytes = new Uint8Array(ids.length);
    ids.forEach((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= 256) {
        throw new Error(`ids[${i}]: expected an integer in [0, 256), got ${id}`);
      }
      bytes[i] = id;
    });
    return utf8.decode(bytes);
  }
}

interface GptEncodingModule {
  vocabularySize: number;
  encode(text: string, options?: { disallowedSpecial?: Set<string> }): number[];
  decode(ids: Iterable<number>): string;
  default: { specialTokensEncoder: Map<string, number> };
}

/**
 * A byte-pair encoding from gpt-tokenizer. Special-token strings in the input are encoded as plain
 * text (never rejected, never turned into control tokens).
 */
export class BpeTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly eosTokenId?: number;
  private readonly enc: GptEncodingModule;
  private readonly noSpecial = new Set<string>();

  constructor(readonly name: 'cl100k_base' | 'o200k_base') {
    const require = createRequire(import.meta.url);
    this.enc = require(`gpt-tokenizer/cjs/encoding/${name}`) as GptEncodingModule;
    const special = this.enc.default.specialTokensEncoder;
    const maxSpecial = Math.max(-1, ...special.values());
    this.vocabSize = Math.max(this.enc.vocabularySize, maxSpecial + 1);
    this.eosTokenId = special.get('<|endoftext|>');
  }

  encode(text: string): number[] {
    if (typeof text !== 'string') throw new Error(`text: expected a string, got ${typeof text}`);
    return this.enc.encode(text, { disallowedSpecial: this.noSpecial });
  }

  decode(ids: number[]): string {
    ids.forEach((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new Error(`ids[${i}]: expected an integer in [0, ${this.vocabSize}), got ${id}`);
      }
    });
    return this.enc.decode(ids);
  }
}

const cache = new Map<TokenizerName, Tokenizer>();

/** The tokenizer called `name` (instances are shared: tokenizers are stateless). */
export function createTokenizer(name: TokenizerName | string = 'byte'): Tokenizer {
  if (!(TOKENIZER_NAMES as readonly string[]).includes(name)) {
    throw new Error(`tokenizer: expected one of ${TOKENIZER_NAMES.join(', ')}, got ${JSON.stringify(name)}`);
  }
  const key = name as TokenizerName;
  let t = cache.get(key);
  if (!t) {
    t = key === 'byte' ? new ByteTokenizer() : new BpeTokenizer(key);
    cache.set(key, t);
  }
  return t;
}
