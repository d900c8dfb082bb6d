import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { paritySuite } from './parity/suite.js';

// Every visible reference case, one test each.
const here = path.dirname(fileURLToPath(import.meta.url));
paritySuite(
  'parity with x-transformers 2.0.1',
  path.resolve(here, '..', '..', 'shared', 'parity', 'visible'),
);
