import type { FastifyError, FastifyInstance, FastifyRequest } from 'fastify';
import { STATUS_CODES } from 'node:http';
import type { ServiceLimits } from '../service/config.js';

/** An error with an HTTP status; the app's error handler turns it into {statusCode, error, message}. */
export class HttpError extends Error {
  constructor(
    readonly statusCode: number,
    message: string,
  ) {
    super(message);
  }
}

export const badRequest = (m: string) => new HttpError(400, m);
export const notFound = (what: string, id: string) => new HttpError(404, `${what} ${id} not found`);
export const conflict = (m: string) => new HttpError(409, m);
export const unavailable = (m: string) => new HttpError(503, m);

/**
 * Installs the JSON error shape for every error (validation, limits, not found, crashes), with
 * body-size errors naming the limit that was hit.
 */
/** The status and message an error is answered with (body-size errors name the limit that was hit). */
export function errorStatus(
  err: FastifyError & { statusCode?: number },
  request: FastifyRequest,
  limits: ServiceLimits,
): { statusCode: number; message: string } {
  let statusCode = err.statusCode ?? 500;
  let message = err.message;
  if (err.validation) statusCode = 400;
  if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE' || err.code === 'FST_REQ_FILE_TOO_LARGE') {
    statusCode = 413;
    const upload =
      request.routeOptions.bodyLimit === limits.maxUploadBytes || err.code === 'FST_REQ_FILE_TOO_LARGE';
    message = upload
      ? `request body exceeds the upload limit MAX_UPLOAD_BYTES=${limits.maxUploadBytes}`
      : `request body exceeds the limit MAX_BODY_BYTES=${limits.maxBodyBytes}`;
  }
  return { statusCode, message };
}

/**
 * Installs the JSON error shape for every error (validation, limits, not found, crashes), with
 * body-size errors naming the limit that was hit.
 */
export function installErrorHandling(app: FastifyInstance, limits: ServiceLimits): void {
  app.setErrorHandler((err: FastifyError & { statusCode?: number }, request, reply) => {
    const { statusCode, message } = errorStatus(err, request, limits);
    // an oversized body is not read further: the connection closes after the answer
    if (statusCode === 413) reply.header('connection', 'close');
    if (statusCode >= 500) request.log.error({ err }, 'request failed');
    void reply
      .status(statusCode)
      .type('application/json')
      .send({ statusCode, error: STATUS_CODES[statusCode] ?? 'Error', message });
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({
      statusCode: 404,
      error: 'Not Found',
      message: `route ${request.method} ${request.url.split('?')[0]} not found`,
    });
  });
}
