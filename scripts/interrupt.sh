#!/usr/bin/env bash
# POST /interrupt?clientId=ID: cancel that job (queued: dropped; running: interrupted).
SCRIPT_USAGE="CLIENT_ID"
. "$(dirname "$0")/_common.sh"
[ $# -eq 1 ] || usage
call -X POST "$BRIDGE/interrupt?clientId=$1"
