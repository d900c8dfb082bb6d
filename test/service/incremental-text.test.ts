import { describe, expect, it } from 'vitest';
import { createTokenizer } from '../../src/io/tokenizer.js';
import { IncrementalText } from '../../workers/generate.js';

// A generation's text streams in pieces, one push per token; the pieces must add up to the whole
// text, never show a broken multi-byte character, and wait for the rest of one.
describe('IncrementalText', () => {
  const text = 'héllo wörld € 😀 ok';

  for (const name of ['byte', 'cl100k_base'] as const) {
    it(`${name}: pieces concatenate to the decoded text, each made of whole characters`, () => {
      const tok = createTokenizer(name);
      const ids = tok.encode(text);
      const inc = new IncrementalText((x) => tok.decode(x));
      const pieces: string[] = [];
      for (let n = 1; n <= ids.length; n++) pieces.push(inc.push(ids.slice(0, n)));
      expect(pieces.join('')).toBe(text);
      expect(inc.text).toBe(text);
      for (const p of pieces) expect(p).not.toContain('\uFFFD');
      if (name === 'byte') {
        // the 4 bytes of the emoji: nothing until the last one, then the whole character
        const at = ids.length - ' ok'.length - 4;
        expect(pieces.slice(at, at + 4)).toEqual(['', '', '', '😀']);
      }
    });
  }

  it('a character left incomplete at the end stays out of the text', () => {
    const tok = createTokenizer('byte');
    const ids = tok.encode('a€');
    const inc = new IncrementalText((x) => tok.decode(x));
    expect(inc.push(ids.slice(0, 1))).toBe('a');
    expect(inc.push(ids.slice(0, 2))).toBe('');
    expect(inc.push(ids.slice(0, 3))).toBe('');
    expect(inc.text).toBe('a');
  });
});
