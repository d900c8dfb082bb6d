/**
 * Ids of models, datasets, jobs and checkpoints: the API makes them (randomUUID), so anything else a
 * client sends names nothing. Checked before an id reaches a Redis key or a path under DATA_DIR: no
 * `:` that would address another record, no `/`, `..` or NUL that would leave the folder.
 */
const ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** True for an id of the form the API gives out. */
export function isId(id: unknown): id is string {
  return typeof id === 'string' && ID.test(id);
}

/** Throws unless `id` is of the form the API gives out; `what` names the argument. */
export function checkId(what: string, id: string): string {
  if (!isId(id))
    throw new Error(`${what}: expected an id the service gave out (a UUID), got ${JSON.stringify(id)}`);
  return id;
}
