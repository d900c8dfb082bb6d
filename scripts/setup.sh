#!/usr/bin/env bash
# Set-up (`npm run setup`): installs what the project needs and is missing, on Debian/Ubuntu (apt-get)
# or macOS (Homebrew; Redis only): redis-server (the service's queue; `npm start` runs a private one), chromium
# (the dashboard's browser test) and LibTorch
# (the fast `torch` backend; without it the library falls back to wasm/cpu). It installs them itself
# when it may (root, or sudo without a password, or brew); otherwise it prints the exact command and,
# for Redis, which `npm start` needs unless REDIS_URL is set, stops. Then `npm ci`, which builds the
# LibTorch addon. Idempotent: a second run with nothing missing installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
die() {
  printf 'setup: %s\n' "$*" >&2
  exit 1
}

# Node: package.json's engines (>= 20.19)
if ! command -v node >/dev/null 2>&1; then
  die "Node.js >= 20.19 is not installed. Debian 13: \`sudo apt-get install nodejs npm\`; macOS: \`brew install node@20\`; elsewhere: https://nodejs.org or \`nvm install 20\`."
fi
if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)'; then
  die "Node.js $(node --version) is too old: this project needs >= 20.19 (vitest and vite need it). Debian 13: \`sudo apt-get install nodejs npm\`; macOS: \`brew install node@20\`; elsewhere: https://nodejs.org or \`nvm install 20\`."
fi

# system packages: what is missing, and how this machine installs it
missing=()
case "$(uname -s)" in
  Darwin)
    # the LibTorch addon builds on Linux (or against an official LibTorch folder named by LIBTORCH)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis)
    install_cmd="brew install ${missing[*]:-}"
    can_install() { command -v brew >/dev/null 2>&1; }
    run_install() { brew install "${missing[@]}"; }
    ;;
  *)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    # chromium: the dashboard's browser test drives it (CHROMIUM_PATH names another browser)
    if [ -z "${CHROMIUM_PATH:-}" ] && ! command -v chromium >/dev/null 2>&1 &&
      ! command -v chromium-browser >/dev/null 2>&1; then
      missing+=(chromium)
    fi
    # LibTorch: LIBTORCH, a Python torch's or libtorch-dev (scripts/libtorch.mjs looks for the last two)
    if [ -z "${LIBTORCH:-}" ] && ! dpkg -s libtorch-dev >/dev/null 2>&1 &&
      ! node -e 'import("./scripts/libtorch.mjs").then((m) => process.exit(m.findLibTorch().lib ? 0 : 1))' >/dev/null 2>&1; then
      missing+=(libtorch-dev)
    fi
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    install_cmd="${SUDO:+sudo }apt-get update && ${SUDO:+sudo }apt-get install -y --no-install-recommends ${missing[*]:-}"
    can_install() {
      command -v apt-get >/dev/null 2>&1 || return 1
      [ -z "$SUDO" ] || sudo -n true 2>/dev/null
    }
    run_install() {
      export DEBIAN_FRONTEND=noninteractive
      $SUDO apt-get update -q
      $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    }
    ;;
esac

if [ ${#missing[@]} -gt 0 ]; then
  if can_install; then
    say "installing ${missing[*]}"
    run_install
  else
    say "missing: ${missing[*]}. Install with:"
    printf '\n    %s\n\n' "$install_cmd"
    if ! command -v redis-server >/dev/null 2>&1 && [ -z "${REDIS_URL:-}" ]; then
      die "Redis is needed by \`npm start\` and \`npm test\` (or set REDIS_URL=redis://host:6379); run the command above, then \`npm run setup\` again."
    fi
    say "continuing without LibTorch: the library will run on the wasm/cpu backends (slower)."
  fi
fi

# npm packages, and the LibTorch addon (built by the package's install script); `npm ci` is skipped
# when the lockfile is unchanged since the last successful one
stamp=node_modules/.setup-lock
if [ -f "$stamp" ] && cmp -s package-lock.json "$stamp"; then
  say "npm packages are up to date"
  # LibTorch may have arrived since: build the addon alone
  [ -f build/Release/xt_torch.node ] || node scripts/build-native.mjs
else
  npm ci
  cp package-lock.json "$stamp"
fi

if [ -f build/Release/xt_torch.node ]; then
  say "ready: the torch backend is built (build/Release/xt_torch.node)"
else
  say "ready without the torch backend (see build/xt_torch-build.log); the library uses wasm/cpu"
fi
