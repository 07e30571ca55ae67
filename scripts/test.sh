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

# The end-to-end tests start the real `llama-serve` binary; build it first so
# its build time is not charged to the first test's timeout.
cargo build --locked -p llama-server --bin llama-serve
cargo test --locked --workspace
