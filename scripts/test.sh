#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs): installs what
# the tests need on a fresh machine, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The load-balancer test (tests/tests/ops_nginx.rs) runs the repository's
# deploy/nginx/nginx.conf with a real nginx: install it when it is missing.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
    else
        echo "nginx is not installed: the load-balancer test will be skipped" >&2
    fi
fi

# The chat page's browser test (tests/tests/web_ui.rs) drives Debian's Chromium
# with playwright-core from tests/web: install both when missing (the test
# skips without them, except under CI, where it fails).
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || echo "could not install chromium: the browser test cannot run" >&2
    else
        echo "chromium is not installed: the browser test will not run" >&2
    fi
fi
if [ ! -f tests/web/node_modules/.package-lock.json ] \
    || [ tests/web/package-lock.json -nt tests/web/node_modules/.package-lock.json ]; then
    if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; } \
            || echo "could not install node and npm" >&2
    fi
    if command -v npm >/dev/null 2>&1; then
        (cd tests/web && npm ci --no-audit --no-fund --loglevel=error) \
            || echo "npm ci failed in tests/web: the browser test cannot run" >&2
    else
        echo "npm is not installed: the browser test will not run" >&2
    fi
fi

# The end-to-end tests start the real `llama-serve` binary; build it first so
# its build time is not charged to the first test's timeout.
cargo build --locked -p llama-server --bin llama-serve
cargo test --locked --workspace
