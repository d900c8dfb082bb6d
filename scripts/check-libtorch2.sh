#!/usr/bin/env bash
# Checks that the LibTorch addon (native/xt_torch.cc) compiles against LibTorch 2.x headers, on a
# machine whose own LibTorch may be older (Debian bookworm's libtorch-dev is 1.13).
#
# By default it takes the headers of Debian trixie's libtorch-dev (LibTorch 2.6) from Debian's
# mirror with a private apt state (nothing is installed system-wide: the package lists, apt's cache
# and the unpacked package stay under build/libtorch2/), then runs `g++ -fsyntax-only` over the
# addon twice, as a CPU build and as a CUDA build (-DXT_HAS_CUDA=1), and checks that no LibTorch
# header came from outside the unpacked tree.
#
#   scripts/check-libtorch2.sh                      # trixie's libtorch-dev
#   scripts/check-libtorch2.sh --include DIR        # headers already on disk, e.g. a pip torch's
#                                                   #   include/ or an official LibTorch's include/
#   XT_LIBTORCH2_SUITE=forky scripts/check-libtorch2.sh    # another Debian suite
#   XT_DEBIAN_MIRROR=http://mirror.example/debian scripts/check-libtorch2.sh
#
# A check that cannot run has not passed: exit status 0 when the addon compiles, 1 when it does not,
# 2 when the headers could not be had (no apt-get, no network access to the mirror, no Debian
# keyring, no g++ or Node headers); the message says which. There is no switch that turns a failed
# download into a pass. Delete build/libtorch2/ to download again.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'check-libtorch2: %s\n' "$*"; }
cannot() {
  printf 'check-libtorch2: CANNOT CHECK: %s\n' "$*" >&2
  exit 2
}

include=""
while [ $# -gt 0 ]; do
  case "$1" in
    --include)
      [ $# -ge 2 ] || cannot "--include expects a folder holding ATen/ATen.h, got nothing"
      include="$2"
      shift 2
      ;;
    *) cannot "unknown argument '$1' (expected --include DIR)" ;;
  esac
done

command -v g++ >/dev/null 2>&1 || cannot "g++ is not installed (Debian: apt-get install g++)"
command -v node >/dev/null 2>&1 || cannot "node is not installed"

# --- the headers -------------------------------------------------------------------------------
if [ -z "$include" ]; then
  suite="${XT_LIBTORCH2_SUITE:-trixie}"
  mirror="${XT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  work="$PWD/build/libtorch2/$suite"
  include="$work/root/usr/include"
  if [ ! -f "$include/ATen/ATen.h" ]; then
    command -v apt-get >/dev/null 2>&1 || cannot "apt-get is not available: this check downloads Debian's libtorch-dev (or pass --include DIR)"
    command -v dpkg >/dev/null 2>&1 || cannot "dpkg is not available (or pass --include DIR)"
    [ -f "$keyring" ] || cannot "$keyring is missing (apt-get install debian-archive-keyring)"
    rm -rf "$work"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
    echo "deb [signed-by=$keyring] $mirror $suite main" >"$work/sources.list"
    apt_opts=(
      -o "Dir::State::Lists=$work/lists"
      -o "Dir::Etc::SourceList=$work/sources.list"
      -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::Cache=$work/cache"
      -o "Dir::State::status=/dev/null"
      -o "Debug::NoLocking=1"
    )
    # apt drops to the _apt user when it runs as root, who may not write into this tree
    [ "$(id -u)" -ne 0 ] || apt_opts+=(-o "APT::Sandbox::User=root")
    say "downloading libtorch-dev from $mirror $suite (private apt state under ${work#"$PWD"/})"
    if ! apt-get "${apt_opts[@]}" -q update >"$work/apt-update.log" 2>&1; then
      cat "$work/apt-update.log" >&2
      cannot "apt-get update of $mirror $suite failed (network access to the mirror is needed)"
    fi
    # trixie's libtorch-dev holds ATen/, c10/ and torch/ headers in one package; a suite that splits
    # them fails the header check below, which names the missing file
    if ! (cd "$work/debs" && apt-get "${apt_opts[@]}" -q download libtorch-dev >"$work/apt-download.log" 2>&1); then
      cat "$work/apt-update.log" "$work/apt-download.log" >&2
      cannot "apt-get download libtorch-dev from $suite failed"
    fi
    for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/root"; done
  fi
fi
for h in ATen/ATen.h c10/core/Allocator.h torch/csrc/api/include/torch/version.h; do
  [ -f "$include/$h" ] || cannot "expected $include/$h, found no such file"
done
include="$(cd "$include" && pwd)"
# the version as the preprocessor sees it (later releases define it in torch/headeronly/version.h)
read -r major minor < <(printf '#include <torch/version.h>\nTORCH_VERSION_MAJOR TORCH_VERSION_MINOR\n' |
  g++ -E -P -x c++ -I"$include" -I"$include/torch/csrc/api/include" - 2>/dev/null | tail -n 1) || true
[[ "${major:-}" =~ ^[0-9]+$ && "${minor:-}" =~ ^[0-9]+$ ]] ||
  cannot "torch/version.h under $include defines no TORCH_VERSION_MAJOR/MINOR (got '${major:-} ${minor:-}')"
[ "$major" -ge 2 ] || cannot "expected LibTorch 2.x headers, got $major.$minor in $include"

# --- node-addon-api and Node's headers, as node-gyp finds them ------------------------------------
napi="$(node -p "require('node-addon-api').include_dir" 2>/dev/null)" ||
  cannot "node-addon-api is not installed (run npm ci first)"
node_version="$(node -p process.versions.node)"
node_prefix="$(node -p "require('path').resolve(process.execPath, '..', '..')")"
node_inc=""
for d in ${npm_config_nodedir:+"$npm_config_nodedir/include/node"} "$node_prefix/include/node" \
  "${XDG_CACHE_HOME:-$HOME/.cache}/node-gyp/$node_version/include/node" /usr/include/node; do
  if [ -f "$d/node_api.h" ]; then
    node_inc="$d"
    break
  fi
done
[ -n "$node_inc" ] || cannot "Node's headers (node_api.h) not found beside $(node -p process.execPath) nor in node-gyp's cache; run \`npx node-gyp install\`"

# --- the check ---------------------------------------------------------------------------------
# LibTorch's own CMake config names the C++ standard its headers expect (17, or 20 in later releases)
std=17
for cfg in "$include/../share/cmake/Torch/TorchConfig.cmake" "$include/../lib/cmake/Torch/TorchConfig.cmake" \
  "$include/../lib/x86_64-linux-gnu/cmake/Torch/TorchConfig.cmake"; do
  if [ -f "$cfg" ] && grep -q 'CXX_STANDARD 20' "$cfg"; then std=20; fi
done
out="$PWD/build/libtorch2"
mkdir -p "$out"
say "g++ -std=c++$std -fsyntax-only native/xt_torch.cc against LibTorch $major.$minor ($include)"
status=0
for variant in cpu cuda; do
  defines=(-DNAPI_VERSION=8 -DNAPI_CPP_EXCEPTIONS)
  [ "$variant" = cpu ] || defines+=(-DXT_HAS_CUDA=1)
  deps="$out/deps-$variant.txt"
  if g++ -std=c++"$std" -fsyntax-only -fexceptions -frtti -Wno-deprecated-declarations "${defines[@]}" \
    -I"$napi" -I"$node_inc" -I"$include" -I"$include/torch/csrc/api/include" \
    -MD -MF "$deps" native/xt_torch.cc; then
    # a header missing from the tree could be found in /usr/include instead (another LibTorch)
    leaked="$(tr ' \\' '\n\n' <"$deps" | grep -E '/(ATen|c10|torch|caffe2)/' | grep -v "^$include/" || true)"
    if [ -n "$leaked" ]; then
      say "$variant: FAILED: LibTorch headers came from outside $include:"
      printf '%s\n' "$leaked" | head -n 5
      status=1
    else
      say "$variant: ok"
    fi
  else
    say "$variant: FAILED: native/xt_torch.cc does not compile against LibTorch $major.$minor"
    status=1
  fi
done
exit "$status"
