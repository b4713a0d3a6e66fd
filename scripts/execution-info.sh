#!/usr/bin/env bash
# GET /execution-info?clientId=ID: the job's status, for clients that poll instead of using /ws.
# status: connected (queued), progress ("12.62%"), closed (done: fetch /history), error.
SCRIPT_USAGE="CLIENT_ID"
. "$(dirname "$0")/_common.sh"
[ $# -eq 1 ] || usage
call -X GET "$BRIDGE/execution-info?clientId=$1"
