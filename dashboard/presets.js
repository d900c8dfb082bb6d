// Model definitions offered as starting points. They are the library's JSON definitions; the
// LLaMA-like one is written with the reference's snake_case keys, which the service accepts too.

export const PRESETS = {
  'tiny-gpt': {
    label: 'Tiny GPT (decoder, learned positions)',
    name: 'tiny-gpt',
    tokenizer: 'byte',
    config: {
      wrapper: 'TransformerWrapper',
      numTokens: 256,
      maxSeqLen: 128,
      attnLayers: { type: 'Decoder', dim: 64, depth: 2, heads: 4 },
    },
  },
  'llama-like': {
    label: 'LLaMA-like decoder (rotary, SwiGLU, RMSNorm, grouped-query attention)',
    name: 'llama-like',
    tokenizer: 'byte',
    config: {
      wrapper: 'TransformerWrapper',
      num_tokens: 256,
      max_seq_len: 256,
      use_abs_pos_emb: false,
      attn_layers: {
        type: 'Decoder',
        dim: 128,
        depth: 4,
        heads: 4,
        attn_dim_head: 32,
        attn_kv_heads: 2,
        rotary_pos_emb: true,
        ff_glu: true,
        ff_swish: true,
        use_rmsnorm: true,
      },
    },
  },
  'bert-like': {
    label: 'BERT-like encoder',
    name: 'bert-like',
    tokenizer: 'byte',
    config: {
      wrapper: 'TransformerWrapper',
      numTokens: 256,
      maxSeqLen: 128,
      attnLayers: { type: 'Encoder', dim: 128, depth: 4, heads: 4 },
    },
  },
};
