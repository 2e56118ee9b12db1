#!/usr/bin/env bash
# Lint the protos and check them for breaking changes against the last commit.
#
#   scripts/buf_check.sh            # from anywhere in the repository
#   BUF_AGAINST_REF=origin/main scripts/buf_check.sh   # compare with another ref
#
# Breaking changes are checked against HEAD when protos/ has uncommitted changes
# (a developer editing them), otherwise against HEAD~1 (CI, a fresh clone).
# When that commit has no protos (the first commit) or is missing from a shallow
# clone that cannot be deepened, the breaking check is skipped with a notice:
# there is nothing to break. The buf binary comes from npm (@bufbuild/buf in
# clients/node); set BUF to use another one.
set -euo pipefail
root=${BUF_CHECK_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root"

buf=${BUF:-$root/clients/node/node_modules/.bin/buf}
if [ ! -x "$buf" ]; then
  echo "buf_check: installing @bufbuild/buf (npm ci in clients/node)" >&2
  # Under the lock the tests take too (tests/support/node.py): never two installs at once.
  (cd "$root/clients/node" && flock .npm-install.lock \
    sh -c '[ -x node_modules/.bin/buf ] || npm ci --no-audit --no-fund --loglevel=error' >&2)
fi

"$buf" lint
echo "buf lint: ok"

if [ -n "${BUF_AGAINST_REF:-}" ]; then
  against=$BUF_AGAINST_REF
elif git diff --quiet HEAD -- protos 2>/dev/null; then
  against=HEAD~1
else
  against=HEAD
fi

if ! git rev-parse --verify -q "$against^{commit}" >/dev/null; then
  if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    git fetch -q --deepen=1 2>/dev/null || true
  fi
  if ! git rev-parse --verify -q "$against^{commit}" >/dev/null; then
    echo "buf breaking: skipped, $against does not exist (first commit or shallow clone)"
    exit 0
  fi
fi
if ! git cat-file -e "$against:protos" 2>/dev/null; then
  echo "buf breaking: skipped, $against has no protos/ to compare with"
  exit 0
fi

# subdir=protos: the old commit may predate buf.yaml, so point buf at the module
# root directly; file paths then match the current module's.
"$buf" breaking --against ".git#ref=$against,subdir=protos"
echo "buf breaking against $against: ok"
