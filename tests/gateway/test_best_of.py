"""best_of on /v1/completions: best_of candidates decoded, the n likeliest per token returned, all of them billed."""
from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from services.common import errors
from services.common.runtime import running_service
from services.gateway.config import Settings
from services.gateway.core.best_of import mean_logprob, rank_best
from services.gateway.core.openai_compat import OpenAICompat, plan_completion
from services.gateway.core.ports import GenerationChunk, GenerationParams, TokenLogprob
from services.gateway.server import build_app, running_gateway

# Candidate i of the fake node: (text, log-probability of each of its tokens, one token per word).
CANDIDATES = [
    ("plain answer", [-1.0, -1.0]),                      # mean -1.0
    ("the best one", [-0.1, -0.2, -0.3]),                # mean -0.2
    ("short", [-0.5]),                                   # mean -0.5 (the best sum of all)
    ("a long but sure answer", [-0.3] * 5),              # mean -0.3 (a worse sum than "short")
    ("worst", [-3.0]),                                   # mean -3.0
]
# The candidates by mean log-probability per token, best first.
BEST_FIRST = ["the best one", "a long but sure answer", "short", "plain answer", "worst"]
PROMPT_TOKENS = 5


def tokens(logprobs: list[float]) -> list[TokenLogprob]:
    return [TokenLogprob(b"x", lp) for lp in logprobs]


class CandidateGenerator:
    """A TextGenerator whose choice i is ``CANDIDATES[i]``, word by word, interleaved as a node's forks are.

    Like a node, it reports logprobs only when asked and refuses more choices than it has sequences (``max_n``),
    naming ``n``.
    """

    def __init__(self, max_n: int = 8) -> None:
        self.max_n = max_n
        self.requests: list[GenerationParams] = []

    async def generate(self, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        self.requests.append(params)
        errors.require(params.n <= self.max_n, "n", f"must be within [1, {self.max_n}] on this node")
        words = {choice: CANDIDATES[choice][0].split(" ") for choice in range(params.n)}
        for i in range(max(len(w) for w in words.values())):
            for choice, choice_words in words.items():
                if i >= len(choice_words):
                    continue
                last = i == len(choice_words) - 1
                text = choice_words[i] if i == 0 else " " + choice_words[i]
                logprob = CANDIDATES[choice][1][i]
                top = ((text.encode(), logprob), (b"?", logprob - 1))[:params.top_logprobs]
                yield GenerationChunk(
                    text=text, finish_reason="stop" if last else None,
                    prompt_tokens=PROMPT_TOKENS if last else 0, generated_tokens=len(choice_words) if last else 0,
                    tokens=(TokenLogprob(text.encode(), logprob, top),) if params.logprobs else (), index=choice)

    async def list_models(self) -> list[str]:
        return ["gemma-3-270m"]


async def complete(generator: CandidateGenerator, **body) -> dict:
    return await OpenAICompat(generator).completion(plan_completion({"model": "gemma-3-270m", "prompt": "Q:", **body}))


def error_of(caught: pytest.ExceptionInfo[openai.BadRequestError]) -> dict[str, Any]:
    """The OpenAI error body of a 400."""
    body = caught.value.body
    assert isinstance(body, dict), body
    return body


# --- the ranking (core/best_of.py) ------------------------------------------------------------------------------

def test_candidates_rank_by_mean_logprob_per_token_best_first():
    ranked = rank_best([tokens(lps) for _, lps in CANDIDATES], len(CANDIDATES))
    assert [CANDIDATES[i][0] for i in ranked] == BEST_FIRST
    assert rank_best([tokens(lps) for _, lps in CANDIDATES], 2) == [1, 3]
    assert mean_logprob(tokens([-0.1, -0.2, -0.3])) == pytest.approx(-0.2)


def test_ties_keep_the_candidates_order_and_unscored_candidates_rank_last():
    assert rank_best([tokens([-0.5]), [], tokens([-0.25, -0.75]), tokens([-0.1])], 4) == [3, 0, 2, 1]
    assert mean_logprob([]) == -math.inf
    assert mean_logprob(tokens([math.nan])) == -math.inf
    assert rank_best([], 2) == [] and rank_best([tokens([-1.0])], 0) == []


# --- the completion ---------------------------------------------------------------------------------------------

async def test_the_n_likeliest_candidates_come_back_reindexed_and_usage_counts_them_all():
    generator = CandidateGenerator()
    reply = await complete(generator, n=2, best_of=5)
    assert [(c["index"], c["text"]) for c in reply["choices"]] == [(0, "the best one"), (1, "a long but sure answer")]
    assert all(c["finish_reason"] == "stop" for c in reply["choices"])
    generated = sum(len(text.split(" ")) for text, _ in CANDIDATES)
    assert reply["usage"]["completion_tokens"] == generated, "every candidate's tokens count, not only the kept"
    assert reply["usage"]["prompt_tokens"] == PROMPT_TOKENS, "the prompt counts once"
    assert reply["usage"]["total_tokens"] == PROMPT_TOKENS + generated
    sent = generator.requests[0]
    assert (sent.n, sent.logprobs, sent.top_logprobs) == (5, True, 0), "the node decodes every candidate, scored"


async def test_logprobs_come_back_only_when_asked():
    plain = await complete(CandidateGenerator(), best_of=3)
    assert [c["text"] for c in plain["choices"]] == ["the best one"]
    assert plain["choices"][0]["logprobs"] is None
    generator = CandidateGenerator()
    asked = await complete(generator, best_of=3, logprobs=1)
    logprobs = asked["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["the", " best", " one"]
    assert logprobs["token_logprobs"] == [-0.1, -0.2, -0.3]
    assert logprobs["top_logprobs"] == [{"the": -0.1}, {" best": -0.2}, {" one": -0.3}]
    assert logprobs["text_offset"] == [0, 3, 8]
    assert generator.requests[0].top_logprobs == 1


async def test_best_of_equal_to_n_is_n_choices_in_the_nodes_order():
    generator = CandidateGenerator()
    reply = await complete(generator, n=3, best_of=3)
    assert [c["text"] for c in reply["choices"]] == [text for text, _ in CANDIDATES[:3]]
    assert (generator.requests[0].n, generator.requests[0].logprobs) == (3, False)
    single = await complete(generator, best_of=1)
    assert [c["text"] for c in single["choices"]] == ["plain answer"] and generator.requests[1].n == 1


# --- refusals, as OpenAI errors naming best_of --------------------------------------------------------------------

@pytest.fixture
async def gateway_url(authenticator) -> AsyncIterator[tuple[str, CandidateGenerator]]:
    generator = CandidateGenerator(max_n=4)
    app = build_app(Settings(port=0), authenticator=authenticator, generator=generator)
    async with running_gateway(app) as url:
        yield url, generator


@pytest.mark.parametrize("body, message", [
    ({"n": 3, "best_of": 2}, "best_of: must be at least n (3)"),
    ({"best_of": 2, "stream": True}, "best_of: must be 1 with stream: true"),
    ({"n": 2, "best_of": 2, "stream": True}, "best_of: must be 1 with stream: true"),
    ({"best_of": 9}, "best_of: must be an integer between 1 and 8"),
    ({"best_of": 0}, "best_of: must be an integer between 1 and 8"),
    ({"best_of": 2.5}, "best_of: must be an integer between 1 and 8"),
    ({"best_of": "3"}, "best_of: must be an integer between 1 and 8"),
    ({"best_of": True}, "best_of: must be an integer between 1 and 8"),
    # More candidates than the node has sequences: the node names its n, the client's field is best_of.
    ({"best_of": 5}, "best_of: must be within [1, 4] on this node"),
])
async def test_bad_best_of_is_a_400_naming_it(gateway_url, keys, body: dict, message: str):
    url, _ = gateway_url
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="gemma-3-270m", prompt="Q:", extra_body=body)
    error = error_of(caught)
    assert error["param"] == "best_of" and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(message), error


async def test_best_of_over_http_and_on_chat(gateway_url, keys):
    url, generator = gateway_url
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client:
        reply = await client.completions.create(model="gemma-3-270m", prompt="Q:", n=2, best_of=4, logprobs=0)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}],
                                                 extra_body={"best_of": 2})
        # Too many choices without best_of still names n.
        with pytest.raises(openai.BadRequestError) as too_many:
            await client.completions.create(model="gemma-3-270m", prompt="Q:", n=5)
    assert [c.text for c in reply.choices] == ["the best one", "a long but sure answer"]
    assert reply.choices[1].logprobs is not None and reply.choices[1].logprobs.token_logprobs == [-0.3] * 5
    assert reply.usage is not None and reply.usage.completion_tokens == 2 + 3 + 1 + 5
    assert (error_of(caught)["param"], error_of(caught)["code"]) == ("best_of", "UNKNOWN_FIELD")
    assert error_of(too_many)["param"] == "n"
    assert [r.n for r in generator.requests] == [4, 5]


# --- a real (synthetic) inference node ----------------------------------------------------------------------------

async def test_a_real_node_decodes_best_of_forks_of_one_prefill(keys, authenticator):
    from prometheus_client import REGISTRY

    from services.inference.config import Settings as InferenceSettings
    from services.inference.server import build_app as build_inference

    def counted(name: str) -> float:
        return sum(s.value for metric in REGISTRY.collect() if metric.name == name
                   for s in metric.samples if s.name == name + "_total")

    node_settings = InferenceSettings(port=0, backend="synthetic", n_ctx=1024, n_seq_max=3,
                                      synthetic_tokens_per_s=0.0)
    async with running_service(build_inference(node_settings), node_settings) as node:
        app = build_app(Settings(port=0, inference_nodes=(f"127.0.0.1:{node.port}",)), authenticator=authenticator)
        async with running_gateway(app) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client:
                before = (counted("llmesh_inference_prompt_tokens"), counted("llmesh_inference_cached_tokens"))
                reply = await client.completions.create(model="", prompt="Once upon a time", max_tokens=4, best_of=3)
                after = (counted("llmesh_inference_prompt_tokens"), counted("llmesh_inference_cached_tokens"))
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.completions.create(model="", prompt="Once", max_tokens=4, n=2, best_of=4)
    assert reply.usage is not None
    prompt = reply.usage.prompt_tokens
    assert len(reply.choices) == 1 and reply.choices[0].text and reply.choices[0].logprobs is None
    assert reply.usage.completion_tokens == 3 * 4, "three candidates of four tokens each"
    prompted, cached = after[0] - before[0], after[1] - before[1]
    assert prompted == 3 * prompt and prompted - cached == prompt + 2, "one prefill, then one token per fork"
    error = error_of(caught)
    assert error["param"] == "best_of" and "on this node" in error["message"], error
