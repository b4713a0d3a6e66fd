"""Who follows which v2 job (the SSE streams), and the nudges that wake them.

A stream does not carry events handed to it: each wake-up it derives what to send from the
job record (`view.py`) and sends what changed since its last frame. So a nudge lost or
coalesced costs nothing, and the end cannot be missed: a stream subscribes before it takes its
snapshot, and it also wakes on its keep-alive timer. Nudges come from the service's observers
(every transition) and from the status hub (`started`, `progressed`, the final message), where
one `JobFollowers` sink stands for all the streams of a job's clientId.
"""
from __future__ import annotations

import asyncio
import time


class Follower:
    """One stream's wake-up flag."""

    def __init__(self):
        self.woken = asyncio.Event()
        self.dropped = False   # its job's clientId was taken over: the stream ends

    async def wait(self, timeout: float) -> bool:
        """True when nudged, False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self.woken.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        self.woken.clear()
        return True


class _HubSink:
    """The status hub's sink for one v2 clientId: every message is a nudge."""

    def __init__(self, followers: "JobFollowers", client_id: str):
        self.followers = followers
        self.client_id = client_id
        self.last_sent = time.monotonic()

    def send_status(self, message: dict, final: bool) -> None:
        self.last_sent = time.monotonic()
        self.followers.nudge(self.client_id)

    def send_heartbeat(self) -> None:
        self.last_sent = time.monotonic()   # the streams send their own keep-alives

    def replaced(self) -> None:  # a websocket took this clientId: the streams end (clients reconnect)
        self.followers.drop(self.client_id)


class JobFollowers:
    def __init__(self, hub):
        self.hub = hub
        self._followers: dict[str, set[Follower]] = {}
        self._sinks: dict[str, _HubSink] = {}

    def follow(self, client_id: str) -> Follower:
        follower = Follower()
        if client_id not in self._followers:
            self._followers[client_id] = set()
            sink = self._sinks[client_id] = _HubSink(self, client_id)
            self.hub.attach(client_id, sink)
        self._followers[client_id].add(follower)
        return follower

    def unfollow(self, client_id: str, follower: Follower) -> None:
        followers = self._followers.get(client_id)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            self.drop(client_id, wake=False)

    def drop(self, client_id: str, wake: bool = True) -> None:
        followers = self._followers.pop(client_id, set())
        sink = self._sinks.pop(client_id, None)
        if sink is not None:
            self.hub.detach(client_id, sink)
        for follower in followers:
            follower.dropped = True
            if wake:
                follower.woken.set()

    def nudge(self, client_id: str) -> None:
        for follower in self._followers.get(client_id, ()):
            follower.woken.set()

    def count(self) -> int:
        return sum(len(f) for f in self._followers.values())
