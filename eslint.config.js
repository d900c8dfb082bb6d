import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  {
    ignores: [
      'dist/**',
      'build/**',
      'node_modules/**',
      'native/**',
      'coverage/**',
      'tmp/**',
      '.data/**',
      'data/**',
    ],
  },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/no-non-null-assertion': 'off',
    },
  },
  {
    // the dashboard's scripts run in the browser
    files: ['dashboard/**/*.js'],
    languageOptions: {
      globals: Object.fromEntries(
        [
          'window',
          'document',
          'fetch',
          'sessionStorage',
          'localStorage',
          'performance',
          'confirm',
          'setTimeout',
          'clearTimeout',
          'AbortController',
          'XMLHttpRequest',
          'FormData',
          'URL',
          'TextDecoderStream',
          'Event',
        ].map((name) => [name, 'readonly']),
      ),
    },
  },
  {
    files: ['test/**', 'scripts/**', 'bench/**'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
);
