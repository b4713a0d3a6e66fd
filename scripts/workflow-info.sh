#!/usr/bin/env bash
# GET /workflow-info?workflow=ALIAS: the inputs a client may set, keyed "<node id>/<input name>".
SCRIPT_USAGE="WORKFLOW_ALIAS"
. "$(dirname "$0")/_common.sh"
[ $# -eq 1 ] || usage
call -G -X GET "$BRIDGE/workflow-info" --data-urlencode "workflow=$1"
