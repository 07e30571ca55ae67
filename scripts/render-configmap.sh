#!/usr/bin/env bash
# Prints deploy/kubernetes/configmap.yaml from config/default.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
cat <<'HEAD'
# Generated from config/default.toml (keep in sync: deploy/README.md shows the command).
apiVersion: v1
kind: ConfigMap
metadata:
  name: llama-serve-config
  labels:
    app.kubernetes.io/name: llama-serve
data:
  config.toml: |
HEAD
sed 's/^/    /; s/^    $//' config/default.toml
