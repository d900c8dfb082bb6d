import { adamwCases } from './adamw-cases.js';

adamwCases('AdamW update');
