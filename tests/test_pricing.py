import pytest

from pipeline.job import PricingSpec
from pipeline.pricing import Price, Rate, Usage, lookup_price
from pipeline.providers.registry import DESCRIPTORS

OPENAI = DESCRIPTORS["openai"].price_ids  # genai-prices' ids of OpenAI's models


def test_table_prices_for_gpt_4o_mini():
    p = lookup_price("gpt-4o-mini", price_ids=OPENAI)
    assert p is not None
    assert (p.input.base, p.cached_input.base, p.output.base) == (0.15, 0.075, 0.6)
    assert (p.batch_input.base, p.batch_output.base) == (0.075, 0.3)
    assert p.source.startswith("genai-prices ")
    assert p.context_window == 128000


def test_unknown_model_has_no_price():
    assert lookup_price("my-local-model-7b", price_ids=OPENAI) is None


def test_job_override_wins_and_batch_is_half():
    p = lookup_price("my-local-model-7b", PricingSpec(input_per_mtok=1.0, output_per_mtok=4.0), price_ids=OPENAI)
    assert p is not None and p.source == "job [pricing] table"
    assert p.cost(Usage(prompt_tokens=1_000_000, completion_tokens=500_000)) == pytest.approx(3.0)
    assert p.cost(Usage(prompt_tokens=1_000_000, completion_tokens=500_000), batch=True) == pytest.approx(1.5)


def test_cost_counts_cached_prompt_at_cached_rate():
    p = lookup_price("gpt-4o-mini", price_ids=OPENAI)
    assert p is not None
    u = Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=400, reasoning_tokens=50)
    assert p.cost(u) == pytest.approx((600 * 0.15 + 400 * 0.075 + 200 * 0.6) / 1e6)


def test_tiers_apply_to_all_tokens_past_the_cliff():
    r = Rate(2.0, ((200_000, 4.0),))
    p = Price("m", r, r, Rate(10.0, ((200_000, 15.0),)), r, r, r, source="t", source_date=None)
    assert p.cost(Usage(100_000, 1000)) == pytest.approx((100_000 * 2 + 1000 * 10) / 1e6)
    assert p.cost(Usage(300_000, 1000)) == pytest.approx((300_000 * 4 + 1000 * 15) / 1e6)
