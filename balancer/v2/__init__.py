"""Comfy API v2 over the bridge's own core: a second surface, not a second core.

A v2 job is a `Job` like any other (the same queue, scheduler, runs, job database, metrics,
/status), under a clientId of its own (`v2.<job id>`) with `Job.v2` holding what only v2 knows
(metadata, the submitted workflow, whether it was cancelled, its outputs' hashes). `view.py`
shapes a job as the contract's Job object; `intake.py` turns a whole graph into a Job;
`idempotency.py` keeps the Idempotency-Key answers; `events.py` follows jobs for the SSE
streams; `surface.py` is what the handlers call.
"""
