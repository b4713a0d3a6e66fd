#!/usr/bin/env bash
# POST /free[?clientId=ID]: ask backends to unload models and free memory. Safe while jobs run.
#   free.sh --all    every backend           -> {"detail": "server memory free now / ALL"}
#   free.sh demo-1   only the backend of that clientId's job
# Without an argument it refuses (exit 2): freeing every backend is asked for with --all.
SCRIPT_USAGE="CLIENT_ID | --all"
SCRIPT_OPTIONS="--all"
. "$(dirname "$0")/_common.sh"
if [ -n "${OPT_ALL:-}" ] && [ $# -eq 0 ]; then
  call -X POST "$BRIDGE/free"
elif [ -z "${OPT_ALL:-}" ] && [ $# -eq 1 ]; then
  call -X POST "$BRIDGE/free?clientId=$1"
elif [ -z "${OPT_ALL:-}" ] && [ $# -eq 0 ]; then
  usage "give a CLIENT_ID (frees that job's backend), or --all to free every backend"
else
  usage "give either a CLIENT_ID or --all"
fi
