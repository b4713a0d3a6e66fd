#!/usr/bin/env bash
# POST /free[?clientId=ID]: ask backends to unload models and free memory. Safe while jobs run.
#   free.sh          every backend           -> {"detail": "server memory free now / ALL"}
#   free.sh demo-1   only the backend of that clientId's job
. "$(dirname "$0")/_common.sh"
[ $# -le 1 ] || usage "[CLIENT_ID]"
if [ $# -eq 1 ]; then
  call -X POST "$BRIDGE/free?clientId=$1"
else
  call -X POST "$BRIDGE/free"
fi
