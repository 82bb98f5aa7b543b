"""The model deployments' batch wait: a lone request runs at once, concurrent ones may wait to batch."""

import asyncio

from medisee.serving.deployments import MLLMDeployment


class RecordingBatcher:
    def __init__(self):
        self.waits: list[float] = []
        self.release = asyncio.Event()

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def __call__(self, *request):
        await self.release.wait()
        return request


def replica(batch_wait_s: float):
    cls = MLLMDeployment.func_or_class
    obj = cls.__new__(cls)  # no model: only the wait logic of __call__ is under test
    obj.batch_wait_s, obj.in_flight, obj._batched = batch_wait_s, 0, RecordingBatcher()
    return obj


def test_lone_requests_do_not_wait_and_concurrent_ones_do():
    async def scenario():
        r = replica(0.01)
        r._batched.release.set()
        assert await r("image", ["q"]) == ("image", ["q"])
        assert await r("image", ["q"]) == ("image", ["q"])
        assert r._batched.waits == [0.0, 0.0] and r.in_flight == 0

        r = replica(0.01)
        calls = [asyncio.create_task(r(i, ["q"])) for i in range(3)]
        await asyncio.sleep(0)
        assert r.in_flight == 3
        r._batched.release.set()
        assert [await c for c in calls] == [(i, ["q"]) for i in range(3)]
        assert r._batched.waits == [0.0, 0.01, 0.01] and r.in_flight == 0

    asyncio.run(scenario())
