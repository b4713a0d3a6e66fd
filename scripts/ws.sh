#!/usr/bin/env bash
# WS /ws?clientId=ID: a job's status messages, live. curl cannot speak websocket here, so this
# runs wscat when it is installed and otherwise prints how to get it (and a Python alternative).
SCRIPT_USAGE="CLIENT_ID"
. "$(dirname "$0")/_common.sh"
[ $# -eq 1 ] || usage
url="ws${BRIDGE#http}/ws?clientId=$1"       # http:// -> ws://, https:// -> wss://
if command -v wscat >/dev/null 2>&1; then
  if [ -n "${BRIDGE_API_KEY:-}" ]; then
    exec wscat -c "$url" -H "Authorization: Bearer $BRIDGE_API_KEY"
  fi
  exec wscat -c "$url"
fi
cat <<NOTE
wscat is not installed. With Node.js it is:
  sudo apt install nodejs npm && sudo npm install -g wscat
  wscat -c "$url"
Open it before (or after) generate.sh with the same clientId; it prints lines such as
  < {"status": "connected", "detail": "server connected"}
  < {"status": "progress", "detail": "12.62%"}
  < {"status": "closed", "detail": "Execution is done"}
Closing it while the job is queued or running cancels the job.
Without Node.js, clients/ws_example.py does the whole flow over the websocket:
  .venv/bin/python clients/ws_example.py --server $BRIDGE --workflow ALIAS --file KEY=PATH
NOTE
