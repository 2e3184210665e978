#!/usr/bin/env bash
# Join this on-prem GPU machine to a Spillway cluster whose head runs in the cloud
# (cluster_configs/ray/aws-hybrid.yaml) or on-prem.
#
#   cluster_configs/onprem/join.sh <head-ip> [extra `ray start` arguments]
#
# Needs, on this machine: the same Python minor version and the same Spillway checkout as the
# cluster (`pip install -e ".[gpu]"` pins Ray 2.60.0 and vLLM: every node must run the same Ray),
# NVIDIA drivers, and a route to the head's private IP (a site-to-site VPN or a private link:
# Ray's ports are not authenticated and must never face the internet).
#
# Ports (TCP) that must be open in both directions between this node and every other node:
#   6379         GCS (head)
#   8076         object manager (fixed here, so a firewall rule can name it)
#   10002-19999  Ray's worker ports (--min-worker-port / --max-worker-port below)
#   8265         dashboard (head; operators only)
#   8000         Spillway's routers (on-prem nodes; clients only); with http.ingress haproxy
#                or direct also 8100+, the routers' own ports
#   engine ports from spillway's engine_port settings (router to engine replicas)
#
# SPILLWAY_CONFIG (default cluster_configs/hybrid-gpu.yaml): the Spillway config the cluster serves;
# its ingress settings are exported to Ray here, as on every other node (`spillway ingress-env`).
set -euo pipefail
head="${1:?usage: join.sh <head-ip> [ray start args]}"
shift
cd "$(dirname "$0")/../.."
config="${SPILLWAY_CONFIG:-cluster_configs/hybrid-gpu.yaml}"
ingress_env="$(spillway ingress-env --config "$config")"  # (empty for the default, shared ingress)
if [ -n "$ingress_env" ]; then export $ingress_env; fi
gpus=0
accelerator=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L | wc -l)"
  accelerator="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print $2}')"
fi
resources="{\"site:onprem\": 1000${accelerator:+, \"accelerator:$accelerator\": $gpus}}"
ray stop --force >/dev/null 2>&1 || true
ulimit -n 65536 || true
exec ray start --address="$head:6379" --num-gpus="$gpus" --resources="$resources" \
  --object-manager-port=8076 --min-worker-port=10002 --max-worker-port=19999 "$@"
