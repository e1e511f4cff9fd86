"""Admission: running slots, a bounded waiting queue, FCFS order, and no slot lost to a cancelled waiter."""

from __future__ import annotations

import asyncio

import pytest

from specrelay.services.gateway.admission import Admission, AdmissionFull, FcfsPolicy, SchedulingPolicy, Ticket


def ticket(i: int, slo: str = "interactive") -> Ticket:
    return Ticket(f"r{i}", slo, arrival_s=float(i), deadline_s=None, num_prompt_tokens=10, max_tokens=10)


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fcfs_admits_in_arrival_order_and_refuses_beyond_the_queue():
    admission = Admission(FcfsPolicy(), max_running=1, max_queued=2)
    order: list[str] = []
    await admission.admit(ticket(0))

    async def wait(i: int):
        await admission.admit(ticket(i))
        order.append(f"r{i}")

    waiters = [asyncio.create_task(wait(i)) for i in (1, 2)]
    await _settle()
    assert (admission.num_running, admission.num_waiting) == (1, 2)
    with pytest.raises(AdmissionFull):
        await admission.admit(ticket(3))
    admission.release(ticket(0))
    await _settle()
    assert order == ["r1"]
    admission.release(ticket(1))
    await asyncio.gather(*waiters)
    assert order == ["r1", "r2"]
    assert (admission.num_running, admission.num_waiting) == (1, 0)


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot():
    admission = Admission(FcfsPolicy(), max_running=1, max_queued=4)
    await admission.admit(ticket(0))
    gone = asyncio.create_task(admission.admit(ticket(1)))
    stays = asyncio.create_task(admission.admit(ticket(2)))
    await _settle()
    gone.cancel()
    await _settle()
    assert admission.num_waiting == 1
    admission.release(ticket(0))
    await asyncio.wait_for(stays, 1)
    assert admission.num_running == 1


async def test_a_policy_picks_who_goes_next():
    class BatchLast(SchedulingPolicy):
        name = "batch-last"

        def pick(self, waiting):
            return next((i for i, t in enumerate(waiting) if t.slo_class != "batch"), 0)

    admission = Admission(BatchLast(), max_running=1, max_queued=4)
    await admission.admit(ticket(0))
    order: list[str] = []

    async def wait(t: Ticket):
        async with admission.slot(t):
            order.append(t.request_id)

    tasks = [asyncio.create_task(wait(ticket(1, "batch"))), asyncio.create_task(wait(ticket(2)))]
    await _settle()
    admission.release(ticket(0))
    await asyncio.gather(*tasks)
    assert order == ["r2", "r1"]
    assert admission.num_running == 0
