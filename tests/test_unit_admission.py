"""The gateway's admission policy against a real Redis: names, who may generate, field limits,
seeding, deadline, tenant, live replicas, and what ListModels shows to whom."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.admission import Admission, access_of, check_request_id, request_id, visible_models
from shared import catalog, redis_conn
from shared import redis_keys as keys
from shared.catalog import Alias, ReplicaHeartbeat
from shared.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from shared.generation import GenRequest
from shared.model_registry import ModelRegistry
from shared.tenancy import OPEN, Caller

ACME, BETA, OPS = Caller("acme", False), Caller("beta", False), Caller("ops", True)


def run(coro):
    return asyncio.run(coro)


def _alias(name: str, pool: str = "cpu") -> Alias:
    return Alias(name, f"b-{name}", pool, "fp32", 64, 4, time.time())


async def _setup(url: str, pools=("cpu",)):
    r = redis_conn.client(url)
    await r.flushdb()
    reg = ModelRegistry(r)
    await reg.publish(_alias("acme-m"), ACME)  # owned by acme, private
    await catalog.publish_alias(r, _alias("legacy"))  # published before owners existed
    for i, pool in enumerate(pools):
        await catalog.put_heartbeat(r, ReplicaHeartbeat(f"{pool}-{i}", pool, f"10.0.0.{i}:50053", 4, 1,
                                                        {"acme-m": "b-acme-m", "legacy": "b-legacy"}), 30)
    return r, reg, Admission(r, reg)


def _req(model="acme-m", **kw) -> GenRequest:
    return GenRequest(request_id="r1", model=model, prompt="hi", max_tokens=4, **kw)


def test_owner_admin_and_readers_may_generate_others_get_the_unknown_answer(redis_url):
    async def body():
        r, reg, adm = await _setup(redis_url)
        for caller in (ACME, OPS, OPEN):
            assert (await adm.admit(_req(), caller, None)).name == "acme-m"
        with pytest.raises(NotFound) as hidden:
            await adm.admit(_req(), BETA, None)
        with pytest.raises(NotFound) as unknown:
            await adm.admit(_req("nope-m"), BETA, None)
        assert hidden.value.message == unknown.value.message.replace("nope-m", "acme-m")
        await reg.set_readers("acme-m", ["beta"], ACME)
        assert (await adm.admit(_req(), BETA, None)).name == "acme-m"
        await reg.set_readers("acme-m", ["*"], ACME)
        assert (await adm.admit(_req(), Caller("gamma", False), None)).name == "acme-m"
        assert (await adm.admit(_req("legacy"), BETA, None)).name == "legacy"  # old names stay open
        await r.aclose()

    run(body())


@pytest.mark.parametrize("name", ["x" * 5_000_000, "dеmo", "ｄｅｍｏ", ".", "..", "a/b", "-a", "", "a" * 65])
def test_bad_model_names_are_refused_briefly(redis_url, name):
    async def body():
        r, _, adm = await _setup(redis_url)
        with pytest.raises(InvalidArgument) as info:
            await adm.admit(_req(name), ACME, None)
        assert info.value.message.startswith("model") and len(info.value.message) < 300
        await r.aclose()

    run(body())


def test_admit_completes_the_request(redis_url):
    async def body():
        r, _, adm = await _setup(redis_url)
        req = _req(temperature=0.8)
        await adm.admit(req, ACME, 12.5)
        assert req.tenant == "acme" and 0 <= req.seed < 2**31 and req.deadline_s == 12.5
        greedy = _req()
        await adm.admit(greedy, ACME, None)
        assert greedy.seed is None and greedy.tenant == "acme"
        with pytest.raises(InvalidArgument, match="^seed"):
            await adm.admit(_req(temperature=0.8, seed=2**31), ACME, None)
        with pytest.raises(InvalidArgument, match="^stop"):
            await adm.admit(_req(stop=["x" * 3_000_000]), ACME, None)
        with pytest.raises(InvalidArgument, match="^max_tokens"):
            await adm.admit(GenRequest("r", "acme-m", "hi", 65), ACME, None)
        await r.aclose()

    run(body())


def test_no_live_replica_of_the_pool_is_unavailable(redis_url):
    async def body():
        r, reg, adm = await _setup(redis_url, pools=("cuda",))
        with pytest.raises(Unavailable, match="cpu pool"):
            await adm.admit(_req(), ACME, None)
        await r.aclose()

    run(body())


def test_request_ids_are_bounded():
    assert request_id("", "") and request_id("", "from-md") == "from-md" and request_id("mine", "md") == "mine"
    for bad in ("x" * 10_000_000, "a b", "a\nb", "x" * 129):
        with pytest.raises(InvalidArgument) as info:
            check_request_id(bad)
        assert len(info.value.message) < 100
    assert check_request_id("x" * 128)


def test_changing_access_needs_the_owner_and_hides_invisible_models(redis_url):
    async def body():
        r, reg, _ = await _setup(redis_url)
        with pytest.raises(NotFound):
            await access_of(reg, "acme-m", BETA)  # beta cannot see it: as if unknown
        await reg.set_readers("acme-m", ["beta"], ACME)
        assert (await access_of(reg, "acme-m", BETA)).owner == "acme"
        with pytest.raises(PermissionDenied):
            await reg.set_readers("acme-m", ["*"], BETA)  # a reader is not the owner
        with pytest.raises(PermissionDenied):
            await reg.delete("acme-m", BETA)
        with pytest.raises(PermissionDenied):
            await reg.set_readers("legacy", ["beta"], BETA)  # old names: admins only
        await reg.delete("acme-m", ACME)
        assert await reg.access("acme-m") is None and await catalog.get_alias(r, "acme-m") is None
        announced = (await r.xrevrange(keys.ANNOUNCE, count=1))[0][1]
        assert (announced["name"], announced["build_id"]) == ("acme-m", "")  # watchers stop serving it
        await r.aclose()

    run(body())


def test_list_shows_only_usable_models_and_replica_internals_to_admins(redis_url):
    async def body():
        r, reg, _ = await _setup(redis_url)
        aliases = await catalog.list_aliases(r)
        access = await reg.all_access()
        replicas = await catalog.live_replicas(r)
        beta = visible_models(aliases, access, replicas, BETA)
        assert [v.alias.name for v in beta] == ["legacy"]
        assert beta[0].replicas == [] and beta[0].served_build_ids == ["b-legacy"]
        ops = visible_models(aliases, access, replicas, OPS)
        assert [v.alias.name for v in ops] == ["acme-m", "legacy"]
        assert ops[0].access.owner == "acme" and ops[0].replicas[0].address == "10.0.0.0:50053"
        await r.aclose()

    run(body())
