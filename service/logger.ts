import pino, { type Logger } from 'pino';
import pretty from 'pino-pretty';

export type LogFormat = 'pretty' | 'json';

/** `pretty` when standard output is a terminal, `json` otherwise (log collectors read JSON lines). */
export function defaultLogFormat(stream: NodeJS.WriteStream = process.stdout): LogFormat {
  return stream.isTTY ? 'pretty' : 'json';
}

/**
 * The service's logger: pino, as JSON lines, or (format `pretty`) as coloured one-line messages for a
 * person at a terminal. Written synchronously to standard output either way, so that nothing logged
 * just before an exit is lost.
 */
export function createLogger(options: { level: string; name: string; format: LogFormat }): Logger {
  if (options.format === 'json') return pino({ level: options.level, name: options.name });
  const stream = pretty({
    colorize: true,
    sync: true,
    translateTime: 'SYS:HH:MM:ss.l',
    ignore: 'pid,hostname',
  });
  return pino({ level: options.level, name: options.name }, stream);
}
