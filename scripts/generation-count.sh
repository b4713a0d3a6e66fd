#!/usr/bin/env bash
# GET /generation-count: jobs finished successfully, ever (a bare integer; survives restarts).
. "$(dirname "$0")/_common.sh"
call -X GET "$BRIDGE/generation-count"
