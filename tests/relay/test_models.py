"""GET /v1/models/{id}: the openai SDK's ``models.retrieve``, in OpenAI's shape."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from tests.conftest import Gateway


def sdk(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0)


async def test_models_retrieve_returns_a_configured_model_in_openais_shape(
        gateway: Gateway) -> None:
    async with sdk(gateway) as client:
        model = await client.models.retrieve("gpt-4o-mini")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "flintproxy")


async def test_an_unknown_model_is_a_404_model_not_found(gateway: Gateway) -> None:
    async with sdk(gateway) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


async def test_retrieving_a_model_needs_a_key_and_survives_hostile_ids(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.base_url + "/models/gpt-4o-mini") as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {gateway.key}"}
        for hostile in ("%00", "a" * 5000, "..%2f..%2fetc", "%ff%fe", "gpt-4o-mini%20"):
            async with http.get(gateway.base_url + "/models/" + hostile, headers=auth) as resp:
                body = await resp.json()
                assert resp.status == 404, hostile
                assert body["error"]["code"] == "model_not_found"
                assert len(body["error"]["message"]) < 400
        async with http.post(gateway.base_url + "/models/gpt-4o-mini", headers=auth) as resp:
            assert resp.status in (404, 405)
        async with http.get(gateway.base_url + "/models/gpt-4o-mini", headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["id"] == "gpt-4o-mini"
