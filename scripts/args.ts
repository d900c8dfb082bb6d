/** Command-line options of the benchmark scripts: `--name value`. */

/** The value after `--name`, or `fallback` when the option is absent or has no value. */
export function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}

/** `value` (of option `--name`) as a positive integer; else an error naming the option. */
export function positiveInt(name: string, value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name}: expected a positive integer, got ${value}`);
  return n;
}

/** Option `--name` as a comma-separated list of positive integers. */
export function positiveInts(name: string, fallback: string): number[] {
  return option(name, fallback)
    .split(',')
    .map((v) => positiveInt(name, v));
}

/** `value` (of option `--name`) as a finite number >= 0; else an error naming the option. */
export function nonNegativeNumber(name: string, value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0)
    throw new Error(`--${name}: expected a number of 0 or more, got ${value}`);
  return n;
}
