#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs): installs what
# the tests need on a fresh machine, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests start the real `llama-serve` binary; build it first so
# its build time is not charged to the first test's timeout.
cargo build --locked -p llama-server --bin llama-serve
cargo test --locked --workspace
