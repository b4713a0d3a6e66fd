#!/usr/bin/env bash
# GET /workflow-list: the workflow aliases this bridge offers.
. "$(dirname "$0")/_common.sh"
call -X GET "$BRIDGE/workflow-list"
