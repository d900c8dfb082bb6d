/**
 * TF.js op tests (from @tensorflow/tfjs-core's package) left out of the torch run, each with its
 * reason. A spec is left out when its full name contains `match`.
 */
export interface Exclusion {
  match: string;
  reason: string;
}

const COMPLEX = 'complex64 is not a torch-backend dtype (float32, int32, bool only)';
const STRING = 'string tensors are not a torch-backend dtype (float32, int32, bool only)';

export const EXCLUSIONS: Exclusion[] = [
  { match: 'complex', reason: COMPLEX },
  { match: 'upcasts when dtypes dont match', reason: COMPLEX },
  { match: 'string', reason: STRING },
  { match: 'squeeze torch {} default', reason: STRING + ' (the spec squeezes a string tensor)' },
  { match: 'squeeze torch {} specific dimension', reason: STRING + ' (the spec squeezes a string tensor)' },
  { match: 'squeeze torch {} all ones', reason: STRING + ' (the spec squeezes a string tensor)' },
  { match: 'squeeze torch {} squeeze only ones', reason: STRING + ' (the spec squeezes a string tensor)' },
  { match: 'IFFT', reason: COMPLEX },
  { match: 'FFT', reason: COMPLEX },
  {
    match: 'einsum torch {} 2d matrix calculate trace: duplicate axes not implemented yet',
    reason:
      'LibTorch einsum supports repeated subscripts (a trace), which TF.js rejects; the result is valid',
  },
  {
    match: 'einsum torch {} more than two input tensors throws error',
    reason: 'LibTorch einsum accepts more than two operands, which TF.js rejects; the result is valid',
  },
  {
    match: 'einsum torch {} mismatched dimensions throws error',
    reason: 'throws as expected, with LibTorch einsum wording instead of TF.js wording',
  },
  {
    match: 'einsum torch {} incorrect equation throws error',
    reason: 'throws as expected, with LibTorch einsum wording instead of TF.js wording',
  },
  {
    match: 'einsum torch {} incorrect number of tensors throws error',
    reason: 'throws as expected, with LibTorch einsum wording instead of TF.js wording',
  },
  {
    match: 'einsum torch {} nonexistent dimension throws error',
    reason: 'throws as expected, with LibTorch einsum wording instead of TF.js wording',
  },
  {
    match: 'einsum torch {} two arrows in equation throws error',
    reason: 'throws as expected, with LibTorch einsum wording instead of TF.js wording',
  },
];
