/**
 * Input names of row r of the XtCachedAttentionRows kernel (see src/attention/attention.ts):
 * k{r}, v{r}, cos{r}, sin{r}. Made once per r: a decoding step names them for every row.
 */
const ROW_INPUT_NAMES: [string, string, string, string][] = [];

export function rowInputNames(r: number): [string, string, string, string] {
  while (ROW_INPUT_NAMES.length <= r) {
    const n = ROW_INPUT_NAMES.length;
    ROW_INPUT_NAMES.push([`k${n}`, `v${n}`, `cos${n}`, `sin${n}`]);
  }
  return ROW_INPUT_NAMES[r]!;
}
