/**
 * Writes openapi/openapi.json from the app's routes (`npm run openapi`); a test keeps it in sync.
 */
import { writeFileSync } from 'node:fs';
import { generateOpenApi } from './openapi-doc.js';

const file = new URL('../openapi/openapi.json', import.meta.url);
writeFileSync(file, await generateOpenApi());
process.stdout.write(`wrote ${file.pathname}\n`);
process.exit(0);
