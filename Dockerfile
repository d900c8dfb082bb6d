# x-transformers-ts service image: the API and the workers (the same image, different commands).
# Build:  docker build -t x-transformers-ts .
# Run:    docker compose up --scale worker=3     (see docker-compose.yml)

# ---- build: dependencies and the LibTorch addon (Debian's libtorch-dev) ----
FROM node:20-bookworm AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtorch-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# the install script builds native/ against LibTorch, so these come before `npm ci`
COPY package.json package-lock.json binding.gyp ./
COPY scripts/build-native.mjs scripts/libtorch.mjs scripts/
COPY native native
RUN npm ci
COPY . .
RUN npm prune --omit=dev

# ---- runtime: LibTorch shared libraries only, non-root ----
FROM node:20-bookworm-slim AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtorch1.13 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown node:node /data
WORKDIR /app
COPY --from=build --chown=node:node /app/package.json /app/package-lock.json /app/tsconfig.json ./
COPY --from=build --chown=node:node /app/scripts scripts
COPY --from=build --chown=node:node /app/node_modules node_modules
COPY --from=build --chown=node:node /app/build/Release build/Release
COPY --from=build --chown=node:node /app/src src
COPY --from=build --chown=node:node /app/routes routes
COPY --from=build --chown=node:node /app/workers workers
COPY --from=build --chown=node:node /app/models models
COPY --from=build --chown=node:node /app/service service
COPY --from=build --chown=node:node /app/openapi openapi
USER node
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=3000 \
    DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
  CMD node -e "fetch('http://127.0.0.1:'+(process.env.PORT||3000)+'/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"
# API + worker in one process; docker-compose.yml runs service/api.ts and service/worker.ts instead.
# (node directly, not npm, so SIGTERM reaches the service and it drains.)
CMD ["node", "--import", "tsx", "service/start.ts"]
