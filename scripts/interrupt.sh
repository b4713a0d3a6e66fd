#!/usr/bin/env bash
# POST /interrupt?clientId=ID: cancel that job (queued: dropped; running: interrupted).
. "$(dirname "$0")/_common.sh"
[ $# -eq 1 ] || usage "CLIENT_ID"
call -X POST "$BRIDGE/interrupt?clientId=$1"
