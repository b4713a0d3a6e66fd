#!/usr/bin/env bash
# GET /generation-count: jobs finished successfully, ever (a bare integer; survives restarts).
SCRIPT_USAGE=""
. "$(dirname "$0")/_common.sh"
[ $# -eq 0 ] || usage "takes no arguments"
call -X GET "$BRIDGE/generation-count"
