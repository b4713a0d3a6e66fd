#!/usr/bin/env bash
# POST /generate-based-workflow?clientId=ID: queue a job. Answers {"detail": "queued / N"}.
#   generate.sh demo-1 '{"workflow": "invert", "1/image": "<saved name from upload.sh>"}'
#   generate.sh demo-2 blank-image        (just an alias: every input keeps its default)
SCRIPT_USAGE="CLIENT_ID JSON_BODY|WORKFLOW_ALIAS"
. "$(dirname "$0")/_common.sh"
[ $# -eq 2 ] || usage
body=$2
if [[ $body != \{* ]]; then
  body="{\"workflow\": \"$body\"}"
fi
call -X POST "$BRIDGE/generate-based-workflow?clientId=$1" \
  -H "Content-Type: application/json" \
  -d "$body"
