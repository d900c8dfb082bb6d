import { PARITY_CASES } from '../scripts/parity/paths.js';
import { paritySuite } from './parity/suite.js';

// Every reference case of the parity specification (test/fixtures/parity), one test each.
paritySuite('parity with x-transformers 2.0.1', PARITY_CASES);
