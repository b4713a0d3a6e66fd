#!/usr/bin/env bash
# GET /workflow-list: the workflow aliases this bridge offers.
SCRIPT_USAGE=""
. "$(dirname "$0")/_common.sh"
[ $# -eq 0 ] || usage "takes no arguments"
call -X GET "$BRIDGE/workflow-list"
